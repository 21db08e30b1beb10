"""Configuration of [`GRPOTrainer`]: Flow-GRPO for flow-matching text-to-image models."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .base_config import Bound, number
from .online_config import OnlineConfig


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
            for full fine-tuning, kept only when `beta > 0`). Flow-GRPO uses 0.004 to 0.04.

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
        if self.debug_ratio_check and self.guidance_scale > 1 and not self.train_with_cfg:
            self.fail("debug_ratio_check", "with train_with_cfg=False and CFG in rollouts the training log-probs "
                      "differ from the recorded ones, so the ratio cannot be 1", "set train_with_cfg=True")
