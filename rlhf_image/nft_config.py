"""Configuration of [`NFTTrainer`]: forward-process RL (DiffusionNFT, and AWM as its second loss)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .base_config import Bound, integer, number
from .nft import AWM_WEIGHTINGS
from .online_config import OnlineConfig

LOSS_TYPES = ("nft", "awm")


@dataclass
class NFTConfig(OnlineConfig):
    r"""
    Configuration class for the [`NFTTrainer`].

    Only the parameters specific to forward-process RL are listed here; see [`~rlhf_image.OnlineConfig`] for the
    rollout, reward, advantage and logging fields every online trainer shares and [`~rlhf_image.BaseConfig`] for the
    ones of every trainer. Defaults follow DiffusionNFT's released SD3.5 configs where they apply: deterministic
    (ODE) sampling without CFG (`sde_type="ode"`, `guidance_scale=1.0`), advantages normalised by the std of the
    whole rollout batch (`scale_rewards="batch"`) and clipped at `advantage_clip=5`.

    Parameters:
        > Parameters that control the loss

        loss_type (`str`, *optional*, defaults to `"nft"`):
            `"nft"`: DiffusionNFT (Zheng et al. 2025): the optimality probability `r = 1/2 + A / (2 advantage_clip)`
            weighs the positive and negative implicit policies `v+ = (1 - nft_beta) v_old + nft_beta v` and
            `v- = (1 + nft_beta) v_old - nft_beta v` ([`~rlhf_image.nft.nft_loss`]); the rollouts are sampled by
            the old policy. `"awm"`: Advantage Weighted Matching (Xue et al. 2025): the flow-matching error
            weighted by `A / advantage_clip` ([`~rlhf_image.nft.awm_loss`]), on rollouts of the current policy.
        nft_beta (`float`, *optional*, defaults to `1.0`):
            DiffusionNFT's guidance strength `beta > 0` (the paper's `beta`; its OCR config uses 0.1).
        adaptive_weighting (`bool`, *optional*, defaults to `True`):
            DiffusionNFT's self-normalised x0 regression ([`~rlhf_image.nft.adaptive_x0_error`]); `False` uses the
            plain velocity error of the paper's Eq. 5.
        awm_weighting (`str`, *optional*, defaults to `"ghuber"`):
            AWM's error weighting over the noise level: `"uniform"`, `"sigma"`, `"sigma_sq"` or `"ghuber"` (the
            released configs) ([`~rlhf_image.nft.awm_error`]).
        awm_ghuber_power (`float`, *optional*, defaults to `0.25`):
            Power `p` of the `"ghuber"` weighting.
        timestep_fraction (`float`, *optional*, defaults to `0.99`):
            `"nft"`: each sample trains on `max(1, int(timestep_fraction * num_inference_steps))` distinct noise
            levels of the sampling schedule, in random order (DiffusionNFT's `0.99`). `"awm"`: the noise levels are
            drawn from the steps `[1, int(timestep_fraction * num_inference_steps))` (AWM's configs use 0.9).
        awm_num_timesteps (`int`, *optional*, defaults to `6`):
            `"awm"`: noise levels trained per micro-batch, one drawn from each of as many strata of that range
            ([`~rlhf_image.nft.stratified_schedule_sigmas`]; the same for the whole micro-batch).
        beta (`float`, *optional*, defaults to `0.0`):
            Coefficient of the KL-like regulariser `mean (v - v_ref)^2` to the reference (base) policy, as both
            papers' codes add it (DiffusionNFT: 1e-4, AWM: 1e-3). `0` needs no reference forward.

        > Parameters that control the old policy (`"nft"`)

        old_policy_decay_rate (`float`, *optional*, defaults to `0.001`),
        old_policy_max_decay (`float`, *optional*, defaults to `0.5`),
        old_policy_flat_steps (`int`, *optional*, defaults to `0`):
            After each rollout batch's last optimizer step `i`, `old <- eta old + (1 - eta) current` with
            `eta = 0` before `old_policy_flat_steps` steps, then `min(rate * (i - flat), max_decay)`
            ([`~rlhf_image.nft.old_policy_decay`]; the paper's `min(0.001 i, 0.5)`; its OCR config: rate 0.0075,
            max 0.999, flat 75).
    """

    # Forward-process RL trains on clean samples: any sampler works, the deterministic one by default.
    sde_types: ClassVar[tuple[str, ...]] = ("ode", "sde", "cps")

    # Defaults that differ from OnlineConfig / TrainingArguments.
    learning_rate: float = field(
        default=3e-4, metadata={"help": "Initial AdamW learning rate (3e-4: both papers' LoRA value)."}
    )
    sde_type: str = field(
        default="ode", metadata={"help": "Sampler: 'ode' (deterministic, the default), 'sde' or 'cps'."}
    )
    guidance_scale: float = field(
        default=1.0, metadata={"help": "CFG scale in rollouts; 1.0 (none): the model learns to need no guidance."}
    )
    scale_rewards: str = field(
        default="batch", metadata={"help": "Advantage std: 'batch' (the papers' global std), 'group' or 'none'."}
    )

    # > Loss
    loss_type: str = field(default="nft", metadata={"help": "'nft' (DiffusionNFT) or 'awm' (AWM)."})
    nft_beta: float = field(default=1.0, metadata={"help": "DiffusionNFT's guidance strength beta > 0."})
    adaptive_weighting: bool = field(
        default=True, metadata={"help": "DiffusionNFT's self-normalised x0 loss (False: plain velocity MSE)."}
    )
    awm_weighting: str = field(
        default="ghuber", metadata={"help": f"AWM error weighting: one of {AWM_WEIGHTINGS}."}
    )
    awm_ghuber_power: float = field(default=0.25, metadata={"help": "Power of AWM's 'ghuber' weighting."})
    timestep_fraction: float = field(
        default=0.99, metadata={"help": "Share of the schedule's steps trained on (see the docstring)."}
    )
    awm_num_timesteps: int = field(default=6, metadata={"help": "AWM: stratified noise levels per micro-batch."})
    beta: float = field(default=0.0, metadata={"help": "Coefficient of mean (v - v_ref)^2 to the reference."})

    # > Old policy
    old_policy_decay_rate: float = field(default=0.001, metadata={"help": "Growth of the soft-update decay per step."})
    old_policy_max_decay: float = field(default=0.5, metadata={"help": "Largest soft-update decay, in [0, 1)."})
    old_policy_flat_steps: int = field(
        default=0, metadata={"help": "Steps during which the old policy is a copy of the current one."}
    )

    numeric_fields: ClassVar[dict[str, Bound]] = {
        "nft_beta": number(0, low_open=True, hint="1.0, or 0.1 (the paper's OCR config)"),
        "awm_ghuber_power": number(0, low_open=True, hint="e.g. 0.25"),
        "timestep_fraction": number(0, 1, low_open=True),
        "awm_num_timesteps": integer(1, hint="e.g. 6"),
        "beta": number(0, hint="0 disables the regulariser"),
        "old_policy_decay_rate": number(0, hint="e.g. 0.001"),
        "old_policy_max_decay": number(0, 1, high_open=True, hint="e.g. 0.5"),
        "old_policy_flat_steps": integer(0),
    }

    def validate(self) -> None:
        super().validate()
        if self.loss_type not in LOSS_TYPES:
            self.fail("loss_type", f"expected one of {LOSS_TYPES}", "use 'nft' (DiffusionNFT) or 'awm'")
        if self.awm_weighting not in AWM_WEIGHTINGS:
            self.fail("awm_weighting", f"expected one of {AWM_WEIGHTINGS}", "use 'ghuber' (AWM's configs)")
        if self.advantage_clip is None:
            self.fail("advantage_clip", "both losses divide the advantage by it (r = 1/2 + A / (2 clip))",
                      "set a positive clip, e.g. 5.0 (both papers)")
        if self.loss_type == "awm":
            low, high = 1, int(self.timestep_fraction * self.num_inference_steps)
            if not 1 <= self.awm_num_timesteps <= high - low:
                room = high - low
                fix = (f"use at most {room}, or raise timestep_fraction (AWM's configs: 0.9) or num_inference_steps"
                       if room > 0 else "raise timestep_fraction (AWM's configs: 0.9) or num_inference_steps")
                self.fail("awm_num_timesteps", f"AWM draws it from the steps [{low}, {high}) of the schedule "
                          f"(high = int(timestep_fraction * num_inference_steps))", fix)

    @property
    def num_train_timesteps(self) -> int:
        """Noise levels each sample trains on per micro-batch."""
        if self.loss_type == "awm":
            return self.awm_num_timesteps
        return max(1, int(self.timestep_fraction * self.num_inference_steps))
