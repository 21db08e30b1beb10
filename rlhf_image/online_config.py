"""Configuration shared by the trainers that learn from their own samples ([`OnlineConfig`]): rollouts, rewards,
advantages, sample logging. [`~rlhf_image.GRPOConfig`] subclasses it, and so does every other online method."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .base_config import BaseConfig, Bound, integer, number

SCALE_REWARDS = ("group", "batch", "none")
REWARD_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


@dataclass
class OnlineConfig(BaseConfig):
    r"""
    Configuration of an online trainer ([`~rlhf_image.online_trainer.OnlineTrainer`]): what every method that samples
    its own rollouts, scores them and turns the rewards into group-relative advantages shares. See
    [`~rlhf_image.BaseConfig`] for the fields of every trainer and [`~transformers.TrainingArguments`] for the rest.

    One optimizer step trains on one slice of a *rollout batch*: each process samples
    `per_device_train_batch_size * gradient_accumulation_steps` images (whole groups of `num_generations` images
    per prompt), splits them into `gradient_accumulation_steps` micro-batches of `per_device_train_batch_size`
    images, and goes over the rollout batch `num_iterations` times (one optimizer step per pass).

    Parameters:
        > Parameters that control the rollouts (sampling)

        num_generations (`int`, *optional*, defaults to `4`):
            Group size: images sampled per prompt. The per-process rollout batch
            (`per_device_train_batch_size * gradient_accumulation_steps`) must be divisible by it.
        num_inference_steps (`int`, *optional*, defaults to `10`):
            Denoising steps per rollout (Flow-GRPO trains with 10, evaluates with 40).
        guidance_scale (`float`, *optional*, defaults to `4.5`):
            True classifier-free guidance scale used in rollouts (1.0 disables CFG).
        sde_type (`str`, *optional*, defaults to `"sde"`):
            Sampler: `"sde"` (Flow-GRPO's SDE step), `"cps"` (coefficient-preserving, used by Ovis-Image's GRPO
            stage) or, for methods that need no log-probs, `"ode"` (deterministic Euler). Each method lists the ones
            it accepts.
        noise_level (`float`, *optional*, defaults to `0.7`):
            Noise scale `a` of the SDE/CPS step (Flow-GRPO: 0.7).
        sde_window_size (`int`, *optional*, defaults to `0`):
            Flow-GRPO-Fast: number of consecutive stochastic (recorded) steps; the other steps are ODE steps. `0`
            makes every step stochastic (with `sde_type="ode"` none is).
        sde_window_range (`list[int]`, *optional*):
            `[low, high]`: the window lies inside steps `[low, high)`; its start is drawn uniformly, the same for the
            whole rollout batch, from a seed derived from `(seed, global step)`. Defaults to the whole schedule.
        same_noise_per_group (`bool`, *optional*, defaults to `False`):
            Start every image of a group from the same initial noise (Flow-GRPO's `sample.same_latent`): the images
            of a group then differ only by the stochastic steps' noise, so the advantage compares what the policy
            does from one start. Needs a stochastic sampler (with `"ode"` a group would be one image repeated).
        micro_batch_size (`int`, *optional*):
            Rows per transformer call when sampling. Must equal `per_device_train_batch_size` (and defaults to it):
            the same batch size in sampling and training is what makes an on-policy ratio exactly 1.
        num_iterations (`int`, *optional*, defaults to `1`):
            Passes (optimizer steps) over each rollout batch; the first is on-policy.
        skip_zero_advantage (`bool`, *optional*, defaults to `True`):
            Skip the forward and backward passes of a micro-batch whose advantages are all 0 (groups without reward
            spread, unscored samples) where the method's loss has no gradient there (GRPO with `beta = 0`): the
            update is the same, and the share of skipped micro-batches is logged as
            `frac_skipped_zero_advantage`. Only whole micro-batches are skipped, so every trained micro-batch keeps
            the sampler's rows (an on-policy ratio of exactly 1). With several processes a micro-batch is skipped
            only where it is all-zero on every process, and under DDP the last micro-batch of each optimizer step
            always runs (its backward all-reduces the step's gradients); under DeepSpeed ZeRO-3 nothing is skipped.

        > Parameters that control the advantages

        advantage_clip (`float`, *optional*, defaults to `5.0`):
            Advantages are clipped to `[-advantage_clip, advantage_clip]`; `None` disables clipping.
        scale_rewards (`str`, *optional*, defaults to `"group"`):
            Advantage normalisation: `"group"` divides by each prompt's reward std, `"batch"` by the std of the
            whole rollout batch over every process (the rewards are gathered, as Flow-GRPO's `global_std` does, so
            2 processes give the advantages of 1 process sampling both batches; the group mean is still
            subtracted), `"none"` only centres (Dr. GRPO).
        per_prompt_stat_tracking (`bool`, *optional*, defaults to `False`):
            Flow-GRPO's per-prompt statistics tracker: each prompt's mean and std are taken over every reward it
            received in the current epoch (every process's rollouts so far, this one included), not only over its
            group in this rollout, and reset at each epoch of the prompt dataset. It matters where a prompt comes
            back within an epoch (a dataset that repeats prompts); `scale_rewards` and `advantage_clip` apply as
            above. The statistics are saved in each checkpoint (`stat_tracker.json`), so a resume is exact.
        reward_weights (`list[float]`, *optional*):
            One weight per reward function; defaults to 1 each. The trainer's `reward_weights` argument is the
            same setting; pass one or the other.
        reward_aggregation (`str`, *optional*, defaults to `"sum_then_normalize"`):
            `"sum_then_normalize"`: weighted sum of raw rewards, then group normalisation (trl's behaviour);
            `"normalize_then_sum"`: each reward standardised over the batch first (rewards on different scales).

        > Parameters that control logging and safety

        log_samples_steps (`int`, *optional*, defaults to `50`):
            Every this many steps, log a table of sample images with their prompt and rewards (a `wandb.Table` when
            reporting to wandb, else a PNG grid and a JSON file under `output_dir/samples`). `0` disables it.
        num_log_samples (`int`, *optional*, defaults to `8`):
            Images in each sample table.
        max_consecutive_unscored (`int`, *optional*, defaults to `3`):
            A rollout batch in which no sample could be scored (every reward returned `None`) trains on zero
            advantages: the first one logs a warning, and this many in a row stop training with an error.
        peak_flops (`float`, *optional*):
            Peak FLOP/s of one device for the MFU metrics; measured once with a timed matmul when unset.
    """

    # The samplers a method accepts (methods that need log-probs refuse "ode").
    sde_types: ClassVar[tuple[str, ...]] = ("ode", "sde", "cps")

    logging_steps: float = field(
        default=1,
        metadata={"help": "Log every this many steps (an online step is expensive, so every step by default)."},
    )

    # > Rollouts
    num_generations: int = field(
        default=4, metadata={"help": "Group size: images sampled per prompt (at least 2)."}
    )
    num_inference_steps: int = field(default=10, metadata={"help": "Denoising steps per rollout."})
    guidance_scale: float = field(
        default=4.5, metadata={"help": "True classifier-free guidance scale in rollouts (1.0 disables CFG)."}
    )
    sde_type: str = field(
        default="sde",
        metadata={"help": "Sampler: 'sde' (Flow-GRPO), 'cps' (coefficient-preserving) or 'ode' where the method "
                          "needs no log-probs."},
    )
    noise_level: float = field(default=0.7, metadata={"help": "Noise scale `a` of the SDE/CPS step."})
    sde_window_size: int = field(
        default=0,
        metadata={"help": "Flow-GRPO-Fast: consecutive stochastic steps per rollout (0 = all steps)."},
    )
    sde_window_range: list[int] | None = field(
        default=None,
        metadata={"help": "[low, high]: the window lies in steps [low, high); its start is drawn per batch, seeded."},
    )
    same_noise_per_group: bool = field(
        default=False, metadata={"help": "Every image of a group starts from the same initial noise (needs sde/cps)."}
    )
    micro_batch_size: int | None = field(
        default=None,
        metadata={"help": "Rows per transformer call when sampling; must equal per_device_train_batch_size."},
    )
    num_iterations: int = field(
        default=1, metadata={"help": "Optimizer passes over each rollout batch (the first is on-policy)."}
    )
    skip_zero_advantage: bool = field(
        default=True,
        metadata={"help": "Skip micro-batches whose advantages are all 0 where the loss has no gradient there "
                          "(same update, less work)."},
    )

    # > Advantages
    advantage_clip: float | None = field(
        default=5.0, metadata={"help": "Clip advantages to [-advantage_clip, advantage_clip]; None disables."}
    )
    scale_rewards: str = field(
        default="group",
        metadata={"help": "Advantage std: 'group' (per prompt), 'batch' (whole rollout batch, every process) "
                          "or 'none'."},
    )
    per_prompt_stat_tracking: bool = field(
        default=False,
        metadata={"help": "Each prompt's reward mean/std over all its rollouts of the epoch (Flow-GRPO's tracker)."},
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per reward function (defaults to 1 each)."}
    )
    reward_aggregation: str = field(
        default="sum_then_normalize",
        metadata={"help": "'sum_then_normalize' (weighted raw sum) or 'normalize_then_sum' (standardise each first)."},
    )

    # > Logging and safety
    log_samples_steps: int = field(
        default=50, metadata={"help": "Log a table of sample images every this many steps (0 disables)."}
    )
    num_log_samples: int = field(default=8, metadata={"help": "Images in each sample table."})
    max_consecutive_unscored: int = field(
        default=3, metadata={"help": "Stop with an error after this many rollout batches in a row with no sample "
                                     "scored (the first one warns)."}
    )
    peak_flops: float | None = field(
        default=None, metadata={"help": "Peak FLOP/s of one device for MFU; measured with a timed matmul if unset."}
    )

    numeric_fields: ClassVar[dict[str, Bound]] = {
        "num_generations": integer(2, hint="e.g. 4"),
        "num_inference_steps": integer(1, hint="e.g. 10"),
        "guidance_scale": number(1, hint="1.0 disables CFG"),
        "noise_level": number(0, low_open=True, hint="e.g. 0.7"),
        "sde_window_size": integer(0, hint="0 makes every step stochastic"),
        "sde_window_range": integer(0, optional=True, each=True, hint="e.g. [0, 5]"),
        "micro_batch_size": integer(1, optional=True),
        "num_iterations": integer(1),
        "advantage_clip": number(0, low_open=True, optional=True, hint="None disables clipping"),
        "reward_weights": number(optional=True, each=True),
        "log_samples_steps": integer(0, hint="0 disables sample tables"),
        "num_log_samples": integer(1),
        "max_consecutive_unscored": integer(1, hint="e.g. 3"),
        "peak_flops": number(0, low_open=True, optional=True, hint="unset: measured"),
    }

    def validate(self) -> None:
        super().validate()
        rollout_batch = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if rollout_batch % self.num_generations != 0:
            self.fail(
                "num_generations",
                f"the per-process rollout batch per_device_train_batch_size * gradient_accumulation_steps = "
                f"{rollout_batch} is not divisible by the group size",
                "choose per_device_train_batch_size and gradient_accumulation_steps whose product is a multiple "
                "of num_generations",
            )
        if self.micro_batch_size is None:
            self.micro_batch_size = self.per_device_train_batch_size
        elif self.micro_batch_size != self.per_device_train_batch_size:
            self.fail(
                "micro_batch_size",
                f"differs from per_device_train_batch_size={self.per_device_train_batch_size}; sampling and training "
                "must call the transformer on the same batch size for the on-policy ratio to be exactly 1",
                "leave micro_batch_size unset (it follows per_device_train_batch_size)",
            )
        if self.sde_type not in self.sde_types:
            self.fail("sde_type", f"unknown sampler for this method, expected one of {self.sde_types}",
                      f"use one of {self.sde_types}")
        if self.sde_type == "cps" and self.noise_level > 1:
            self.fail("noise_level", "CPS needs sin(a pi / 2) <= 1 with a in (0, 1]", "use a value in (0, 1]")
        self._validate_window()
        if self.same_noise_per_group and self.sde_type == "ode":
            self.fail("same_noise_per_group", "with the deterministic 'ode' sampler every image of a group would be "
                      "the same image", "use sde_type 'sde' or 'cps', or leave same_noise_per_group off")
        if self.scale_rewards not in SCALE_REWARDS:
            self.fail("scale_rewards", f"expected one of {SCALE_REWARDS}", "use 'group', 'batch' or 'none'")
        if self.reward_aggregation not in REWARD_AGGREGATIONS:
            self.fail("reward_aggregation", f"expected one of {REWARD_AGGREGATIONS}",
                      "use 'sum_then_normalize' or 'normalize_then_sum'")
        if self.save_strategy == "steps" and self.save_steps >= 1 and int(self.save_steps) % self.num_iterations:
            self.fail("save_steps", f"a checkpoint inside a rollout batch (num_iterations={self.num_iterations}) "
                      "could not resume exactly", "use a multiple of num_iterations")

    def _validate_window(self) -> None:
        steps = self.num_inference_steps
        if self.sde_window_size == 0:
            if self.sde_window_range is not None:
                self.fail("sde_window_range", "set without a window", "set sde_window_size > 0 or drop the range")
            return
        if self.sde_type == "ode":
            self.fail("sde_window_size", "a stochastic window needs sde_type 'sde' or 'cps'",
                      "set sde_window_size=0 or choose a stochastic sampler")
        if self.sde_window_size > steps:
            self.fail("sde_window_size", f"must be in [0, num_inference_steps={steps}]",
                      "use 0 (all steps) or a smaller window")
        if self.sde_window_range is None:
            self.sde_window_range = [0, steps]
        if len(self.sde_window_range) != 2:
            self.fail("sde_window_range", "expected two numbers [low, high]", "pass e.g. [0, 5]")
        low, high = self.sde_window_range
        if not 0 <= low < high <= steps:
            self.fail("sde_window_range", f"outside the schedule of {steps} steps",
                      f"use 0 <= low < high <= num_inference_steps={steps}")
        if high - low < self.sde_window_size:
            self.fail("sde_window_range", f"shorter than sde_window_size={self.sde_window_size}",
                      "widen the range or shrink the window")
        self.sde_window_range = [low, high]

    @property
    def rollout_batch_size(self) -> int:
        """Images sampled per process per rollout: `per_device_train_batch_size * gradient_accumulation_steps`."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps
