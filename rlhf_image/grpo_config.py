"""Configuration of [`GRPOTrainer`]: Flow-GRPO for flow-matching text-to-image models."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .base_config import Bound, number
from .online_config import OnlineConfig
from .sde import CONVENTIONS


@dataclass
class GRPOConfig(OnlineConfig):
    r"""
    Configuration class for the [`GRPOTrainer`].

    Only the parameters specific to GRPO are listed here; see [`~rlhf_image.OnlineConfig`] for the rollout, reward,
    advantage and logging fields every online trainer shares (`num_generations`, `num_inference_steps`,
    `guidance_scale`, `sde_type` (here `"sde"` or `"cps"`), `noise_level`, the SDE window, `num_iterations`,
    `advantage_clip`, `scale_rewards`, `reward_weights`, ...), [`~rlhf_image.BaseConfig`] for the ones every trainer
    shares (`resolution`, `height`, `width`, `max_consecutive_nonfinite`, gradient checkpointing) and
    [`~transformers.TrainingArguments`] for the rest (`learning_rate`, `gradient_accumulation_steps`, `deepspeed`,
    `report_to`, `save_steps`, ...). Some defaults differ from [`~transformers.TrainingArguments`]. With
    [`~transformers.HfArgumentParser`] or `trl.TrlParser` the class parses from YAML and the command line.

    Parameters:
        > Parameters that control the loss

        train_with_cfg (`bool`, *optional*, defaults to `True`):
            Evaluate the training log-probs with the same CFG as the rollouts. When `False` the policy is trained
            on its conditional prediction alone (half the cost, slightly off-policy).
        timestep_fraction (`float`, *optional*, defaults to `1.0`):
            Fraction of the recorded steps trained on per micro-batch (`max(1, int(fraction * K))` steps drawn
            at random, seeded; Flow-GRPO uses 0.99).
        epsilon (`float`, *optional*, defaults to `1e-4`):
            PPO clip range of the importance ratio. Per-step log-probs are means over latent dimensions, so
            ratios stay close to 1; Flow-GRPO uses 1e-4.
        beta (`float`, *optional*, defaults to `0.0`):
            KL coefficient against the reference policy (the base model: adapter disabled for LoRA, a frozen copy
            for full fine-tuning, kept only when `beta > 0`). Flow-GRPO uses 0.004 to 0.04, with its KL convention
            (`kl_convention="flow_grpo"`).
        log_prob_convention (`str`, *optional*, defaults to `"exact"`):
            Log-prob of a CPS step: `"exact"` is the Gaussian log-density, the default because the importance
            ratio is then a ratio of densities, the quantity the clipped surrogate and its clip range are defined
            on. `"flow_grpo"` is Flow-GRPO's `-mean((x' - mean)^2)`, without the `1 / (2 s^2)` factor and the
            constants: its log-ratio is `2 s^2` times the exact one, a factor that changes from step to step (1.68
            at the first and 0.11 at the ninth of 10 steps of `sigma = 3t / (1 + 2t)` at noise level 0.8), so a
            Flow-GRPO clip range means here what it means there. Both give the same
            SDE log-probs (Flow-GRPO's SDE log-prob is the Gaussian density).
        kl_convention (`str`, *optional*, defaults to `"exact"`):
            KL of an SDE step to the reference: `"exact"` is the KL of the two Gaussian transitions,
            `||mean - ref_mean||^2 / (2 std_t^2 |dt|)`, the default because it weighs each step by what it changes
            in the sampled distribution; `"flow_grpo"` is Flow-GRPO's `||mean - ref_mean||^2 / (2 std_t^2)`, `|dt|`
            times it (1/28 at the first and 1/4 at the last of the same 10 steps), so Flow-GRPO's `beta` carries
            over. The CPS KL is the same in both, and 0 at the deterministic last CPS step (where Flow-GRPO's is
            infinite).
        grpo_guard (`bool`, *optional*, defaults to `False`):
            GRPO-Guard (Wang et al., 2025, arXiv 2510.22319): the per-step normalised log-ratio
            `s (log r + ||mean - old_mean||^2 / (2 s^2))` (centred on 0 at every step, so the clip range bites
            alike across steps; `old_mean` is the sampler's, recorded in the trajectory) and each step's loss
            weighted by `1 / |dt|` (the gradient reweighting). SDE sampling only (`sde_type="sde"`); the logged
            `ratio/*` are then the normalised ratios (exactly 1 on-policy).

        > Parameters that control safety

        debug_ratio_check (`bool`, *optional*, defaults to `False`):
            Raise if the importance ratio of an on-policy step is not exactly 1 (it is always logged).
    """

    sde_types: ClassVar[tuple[str, ...]] = ("sde", "cps")

    # Parameters whose defaults differ from TrainingArguments.
    learning_rate: float = field(
        default=3e-4,
        metadata={"help": "Initial AdamW learning rate. 3e-4 is Flow-GRPO's LoRA value; use ~1e-5 for full "
                          "fine-tuning."},
    )

    # > Loss
    train_with_cfg: bool = field(
        default=True,
        metadata={"help": "Evaluate training log-probs with the rollouts' CFG (False: conditional prediction only)."},
    )
    timestep_fraction: float = field(
        default=1.0, metadata={"help": "Fraction of the recorded steps trained on per micro-batch."}
    )
    epsilon: float = field(default=1e-4, metadata={"help": "PPO clip range of the importance ratio."})
    beta: float = field(default=0.0, metadata={"help": "KL coefficient against the reference (base) policy."})
    log_prob_convention: str = field(
        default="exact",
        metadata={"help": "CPS log-prob: 'exact' (Gaussian log-density) or 'flow_grpo' (-mean((x' - mean)^2))."},
    )
    kl_convention: str = field(
        default="exact",
        metadata={"help": "SDE-step KL: 'exact' (over the transition variance) or 'flow_grpo' (|dt| times it)."},
    )
    grpo_guard: bool = field(
        default=False,
        metadata={"help": "GRPO-Guard: per-step normalised log-ratio and 1/|dt| loss weights (sde_type 'sde')."},
    )

    # > Safety
    debug_ratio_check: bool = field(
        default=False, metadata={"help": "Raise if an on-policy importance ratio is not exactly 1."}
    )

    numeric_fields: ClassVar[dict[str, Bound]] = {
        "timestep_fraction": number(0, 1, low_open=True),
        "epsilon": number(0, low_open=True, hint="e.g. 1e-4 (Flow-GRPO)"),
        "beta": number(0, hint="0 disables the KL term"),
    }

    def validate(self) -> None:
        super().validate()
        for name in ("log_prob_convention", "kl_convention"):
            if getattr(self, name) not in CONVENTIONS:
                self.fail(name, f"expected one of {CONVENTIONS}", "use 'exact' (the default) or 'flow_grpo'")
        if self.grpo_guard and self.sde_type != "sde":
            self.fail("grpo_guard", f"GRPO-Guard's ratio normalisation and 1/|dt| weights are derived for the SDE "
                      f"step, not sde_type={self.sde_type!r}", "set sde_type='sde' or grpo_guard=False")
        if self.debug_ratio_check and self.guidance_scale > 1 and not self.train_with_cfg:
            self.fail("debug_ratio_check", "with train_with_cfg=False and CFG in rollouts the training log-probs "
                      "differ from the recorded ones, so the ratio cannot be 1", "set train_with_cfg=True")
