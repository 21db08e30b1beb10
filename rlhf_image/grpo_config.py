"""Configuration of [`GRPOTrainer`]: Flow-GRPO for flow-matching text-to-image models."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .base_config import BaseConfig, Bound, integer, number

SDE_TYPES = ("sde", "cps")
SCALE_REWARDS = ("group", "batch", "none")
REWARD_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


@dataclass
class GRPOConfig(BaseConfig):
    r"""
    Configuration class for the [`GRPOTrainer`].

    Only the parameters specific to GRPO are listed here; see [`~rlhf_image.BaseConfig`] for the ones every trainer
    shares (`resolution`, `height`, `width`, `max_consecutive_nonfinite`, gradient checkpointing) and
    [`~transformers.TrainingArguments`] for the rest (`learning_rate`, `gradient_accumulation_steps`, `deepspeed`,
    `report_to`, `save_steps`, ...). Some defaults differ from [`~transformers.TrainingArguments`]. With
    [`~transformers.HfArgumentParser`] or `trl.TrlParser` the class parses from YAML and the command line.

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
        train_with_cfg (`bool`, *optional*, defaults to `True`):
            Evaluate the training log-probs with the same CFG as the rollouts. When `False` the policy is trained
            on its conditional prediction alone (half the cost, slightly off-policy).
        sde_type (`str`, *optional*, defaults to `"sde"`):
            Stochastic sampler: `"sde"` (Flow-GRPO's SDE step) or `"cps"` (coefficient-preserving, used by
            Ovis-Image's GRPO stage).
        noise_level (`float`, *optional*, defaults to `0.7`):
            Noise scale `a` of the SDE/CPS step (Flow-GRPO: 0.7).
        sde_window_size (`int`, *optional*, defaults to `0`):
            Flow-GRPO-Fast: number of consecutive stochastic (recorded, trained) steps; the other steps are ODE
            steps. `0` makes every step stochastic.
        sde_window_range (`list[int]`, *optional*):
            `[low, high]`: the window lies inside steps `[low, high)`; its start is drawn uniformly, the same for the
            whole rollout batch, from a seed derived from `(seed, global step)`. Defaults to the whole schedule.
        micro_batch_size (`int`, *optional*):
            Rows per transformer call when sampling. Must equal `per_device_train_batch_size` (and defaults to it):
            the same batch size in sampling and training is what makes the on-policy ratio exactly 1.

        > Parameters that control the loss

        timestep_fraction (`float`, *optional*, defaults to `1.0`):
            Fraction of the recorded steps trained on per micro-batch (`max(1, int(fraction * K))` steps drawn
            at random, seeded; Flow-GRPO uses 0.99).
        epsilon (`float`, *optional*, defaults to `1e-4`):
            PPO clip range of the importance ratio. Per-step log-probs are means over latent dimensions, so
            ratios stay close to 1; Flow-GRPO uses 1e-4.
        advantage_clip (`float`, *optional*, defaults to `5.0`):
            Advantages are clipped to `[-advantage_clip, advantage_clip]`; `None` disables clipping.
        beta (`float`, *optional*, defaults to `0.0`):
            KL coefficient against the reference policy (the base model: adapter disabled for LoRA, a frozen copy
            for full fine-tuning, kept only when `beta > 0`). Flow-GRPO uses 0.004 to 0.04.
        num_iterations (`int`, *optional*, defaults to `1`):
            Passes (optimizer steps) over each rollout batch; the first is on-policy (ratio exactly 1).
        scale_rewards (`str`, *optional*, defaults to `"group"`):
            Advantage normalisation: `"group"` divides by each prompt's reward std, `"batch"` by the std of the
            whole rollout batch (the group mean is still subtracted), `"none"` only centres (Dr. GRPO).
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
        debug_ratio_check (`bool`, *optional*, defaults to `False`):
            Raise if the importance ratio of an on-policy step is not exactly 1 (it is always logged).
        peak_flops (`float`, *optional*):
            Peak FLOP/s of one device for the MFU metrics; measured once with a timed matmul when unset.
    """

    # Parameters whose defaults differ from TrainingArguments.
    learning_rate: float = field(
        default=3e-4,
        metadata={"help": "Initial AdamW learning rate. 3e-4 is Flow-GRPO's LoRA value; use ~1e-5 for full "
                          "fine-tuning."},
    )
    logging_steps: float = field(
        default=1,
        metadata={"help": "Log every this many steps (a GRPO step is expensive, so every step by default)."},
    )

    # > Rollouts
    num_generations: int = field(
        default=4, metadata={"help": "Group size: images sampled per prompt (at least 2)."}
    )
    num_inference_steps: int = field(default=10, metadata={"help": "Denoising steps per rollout."})
    guidance_scale: float = field(
        default=4.5, metadata={"help": "True classifier-free guidance scale in rollouts (1.0 disables CFG)."}
    )
    train_with_cfg: bool = field(
        default=True,
        metadata={"help": "Evaluate training log-probs with the rollouts' CFG (False: conditional prediction only)."},
    )
    sde_type: str = field(
        default="sde", metadata={"help": "Stochastic sampler: 'sde' (Flow-GRPO) or 'cps' (coefficient-preserving)."}
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
    micro_batch_size: int | None = field(
        default=None,
        metadata={"help": "Rows per transformer call when sampling; must equal per_device_train_batch_size."},
    )

    # > Loss
    timestep_fraction: float = field(
        default=1.0, metadata={"help": "Fraction of the recorded steps trained on per micro-batch."}
    )
    epsilon: float = field(default=1e-4, metadata={"help": "PPO clip range of the importance ratio."})
    advantage_clip: float | None = field(
        default=5.0, metadata={"help": "Clip advantages to [-advantage_clip, advantage_clip]; None disables."}
    )
    beta: float = field(default=0.0, metadata={"help": "KL coefficient against the reference (base) policy."})
    num_iterations: int = field(
        default=1, metadata={"help": "Optimizer passes over each rollout batch (the first is on-policy)."}
    )
    scale_rewards: str = field(
        default="group",
        metadata={"help": "Advantage std: 'group' (per prompt), 'batch' (whole rollout batch) or 'none'."},
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
    debug_ratio_check: bool = field(
        default=False, metadata={"help": "Raise if an on-policy importance ratio is not exactly 1."}
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
        "timestep_fraction": number(0, 1, low_open=True),
        "epsilon": number(0, low_open=True, hint="e.g. 1e-4 (Flow-GRPO)"),
        "advantage_clip": number(0, low_open=True, optional=True, hint="None disables clipping"),
        "beta": number(0, hint="0 disables the KL term"),
        "num_iterations": integer(1),
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
        if self.sde_type not in SDE_TYPES:
            self.fail("sde_type", f"unknown sampler, expected one of {SDE_TYPES}", "use 'sde' or 'cps'")
        if self.sde_type == "cps" and self.noise_level > 1:
            self.fail("noise_level", "CPS needs sin(a pi / 2) <= 1 with a in (0, 1]", "use a value in (0, 1]")
        self._validate_window()
        if self.scale_rewards not in SCALE_REWARDS:
            self.fail("scale_rewards", f"expected one of {SCALE_REWARDS}", "use 'group', 'batch' or 'none'")
        if self.reward_aggregation not in REWARD_AGGREGATIONS:
            self.fail("reward_aggregation", f"expected one of {REWARD_AGGREGATIONS}",
                      "use 'sum_then_normalize' or 'normalize_then_sum'")
        if self.debug_ratio_check and self.guidance_scale > 1 and not self.train_with_cfg:
            self.fail("debug_ratio_check", "with train_with_cfg=False and CFG in rollouts the training log-probs "
                      "differ from the recorded ones, so the ratio cannot be 1", "set train_with_cfg=True")
        if self.save_strategy == "steps" and self.save_steps >= 1 and int(self.save_steps) % self.num_iterations:
            self.fail("save_steps", f"a checkpoint inside a rollout batch (num_iterations={self.num_iterations}) "
                      "could not resume exactly", "use a multiple of num_iterations")

    def _validate_window(self) -> None:
        steps = self.num_inference_steps
        if self.sde_window_size == 0:
            if self.sde_window_range is not None:
                self.fail("sde_window_range", "set without a window", "set sde_window_size > 0 or drop the range")
            return
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
