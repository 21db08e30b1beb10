"""`DPOConfig`: the training arguments of [`~rlhf_image.DPOTrainer`] (Flow-DPO with the Diffusion-SDPO
safeguard)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .base_config import Bound, ImageTrainingConfig, number

SDPO_SPACES = ("output", "parameter")
REFERENCE_DTYPES = ("float32", "bfloat16")


@dataclass
class DPOConfig(ImageTrainingConfig):
    r"""
    Configuration of [`~rlhf_image.DPOTrainer`]: Diffusion-DPO (Wallace et al. 2024, arXiv 2311.12908) on
    velocity errors, with the optional Diffusion-SDPO safeguard (Fu et al. 2025, arXiv 2511.03317). Only the
    DPO-specific fields are listed; every [`~transformers.TrainingArguments`] field (`deepspeed`, `report_to`,
    `save_steps`, `gradient_accumulation_steps`, `bf16`, ...) means what it means for any trainer.

    Parameters:
        > Preference loss

        beta (`float`, *optional*, defaults to `100.0`):
            Inverse temperature of `-log sigmoid(-beta / 2 [(e_theta(w) - e_ref(w)) - (e_theta(l) - e_ref(l))])`,
            where `e = mean ||v - (eps - x0)||^2` is a per-sample velocity error. Why around 100 and not the 5000 of
            epsilon-prediction Diffusion-DPO (SD1.5/SDXL): on the path `x_t = (1 - s) x0 + s eps` the noise a
            velocity model implies is `eps_hat = x_t + (1 - s) v_hat`, so `eps_hat - eps = (1 - s)(v_hat - u)` and
            `||v_hat - u||^2 = ||eps_hat - eps||^2 / (1 - s)^2`: the same change of a model's prediction shows up in
            the velocity error, and in the error differences the loss sees, amplified by `(1 - s)^-2`. With
            logit-normal `s = sigmoid(z)` that factor is `(1 + e^z)^2`, whose mean is
            `1 + 2 e^{1/2} + e^2 ~ 12`; with the resolution shift of a 1024px model (`mu = 1.15`) it is
            `1 + 2 e^{mu + 1/2} + e^{2 mu + 2} ~ 85`. Dividing 5000 by 12-85 gives the order of magnitude 60-400,
            so 100 is a reasonable start for a shifted high-resolution flow model. This is an order-of-magnitude
            argument (a mean of a heavy-tailed factor, different timestep weighting, different latent scales), not
            an optimum: tune `beta` per model. With `uniform` sampling the mean of `(1 - s)^-2` is infinite, so rare
            near-noise draws dominate the logits; prefer `logit_normal`.

        > Reference

        reference_dtype (`str`, *optional*, defaults to `"float32"`):
            Storage dtype of the frozen reference copy of full fine-tuning: `"bfloat16"` halves its memory (a 7B
            float32 reference is 27.5 GiB) and needs `bf16=True` (the policy computes in bfloat16 under autocast, so
            the reference's matmuls see the same bfloat16 operands; at the first step the loss is `ln 2` within
            bfloat16 rounding rather than exactly). With LoRA the reference is the policy with its adapter disabled
            and this must stay `"float32"`.

        > Diffusion-SDPO safeguard

        sdpo (`bool`, *optional*, defaults to `False`):
            Scale the loser branch's gradient by the winner-preserving coefficient of Diffusion-SDPO
            ([`~rlhf_image.sdpo.safe_loser_scale`]), so that, to first order, a step does not increase the winner's
            error. The loss value is unchanged; only the loser gradient is scaled.
        sdpo_space (`str`, *optional*, defaults to `"output"`):
            Where the winner and loser gradients are taken: `"output"` (w.r.t. the predicted velocity; no extra
            backward pass; the paper's practical form) or `"parameter"` (w.r.t. the trainable parameters; two extra
            backward passes; exact first-order condition; not for ZeRO-3, whose parameters are partitioned).
        sdpo_mu (`float`, *optional*, defaults to `0.9`):
            Safety margin `mu` in [0, 1]: the step must decrease the winner's error by at least `mu` times what the
            winner gradient alone would (`mu = 0`: only non-increase). 0.9 is the value of the official SD1.5
            Diffusion-DPO script.
        sdpo_lambda_min (`float`, *optional*, defaults to `0.0`):
            Lower clip of the loser scale.
        sdpo_lambda_max (`float`, *optional*, defaults to `1.0`):
            Upper clip of the loser scale; also the scale used when the winner and loser gradients do not conflict.
        sdpo_eps (`float`, *optional*, defaults to `1e-9`):
            Added to the denominator of the scale.

        > Data (the other data fields are [`~rlhf_image.ImageTrainingConfig`]'s)

        cfg_dropout_prob (`float`, *optional*, defaults to `0.0`):
            Probability of training a pair on the unconditional (negative) prompt instead of its prompt, which keeps
            the unconditional velocity that classifier-free guidance needs (the Diffusion-DPO SD1.5 script used 0.2).

    Images (`resolution`, or `height`/`width`) are resized to cover that size and center-cropped before VAE encoding;
    precomputed latents are used as given.
    """

    # --- loss ---
    beta: float = field(
        default=100.0,
        metadata={"help": "Inverse temperature of Flow-DPO. Around 100 for flow models (velocity errors are about "
                          "(1 - s)^-2 times larger than epsilon errors, hence smaller than epsilon-DPO's 5000); see "
                          "the DPOConfig docstring."},
    )
    reference_dtype: str = field(
        default="float32", metadata={"help": "Storage dtype of the frozen reference (full fine-tuning): 'float32' or "
                                             "'bfloat16' (with bf16=True; half the memory)."}
    )
    # --- SDPO ---
    sdpo: bool = field(
        default=False, metadata={"help": "Enable the Diffusion-SDPO safeguard (arXiv 2511.03317): scale the loser "
                                         "gradient so the winner's error does not rise to first order."}
    )
    sdpo_space: str = field(
        default="output", metadata={"help": "'output' (gradients w.r.t. the predicted velocity) or 'parameter' "
                                            "(w.r.t. the trainable parameters, two extra backward passes)."}
    )
    sdpo_mu: float = field(default=0.9, metadata={"help": "SDPO safety margin mu in [0, 1]."})
    sdpo_lambda_min: float = field(default=0.0, metadata={"help": "Lower clip of the SDPO loser scale."})
    sdpo_lambda_max: float = field(default=1.0, metadata={"help": "Upper clip of the SDPO loser scale."})
    sdpo_eps: float = field(default=1e-9, metadata={"help": "Added to the SDPO denominator."})
    # --- data ---
    cfg_dropout_prob: float = field(
        default=0.0, metadata={"help": "Probability of training a pair on the unconditional prompt (for CFG)."}
    )
    # --- TrainingArguments defaults that differ ---
    logging_steps: float = field(default=1, metadata={"help": "Log every N steps."})

    numeric_fields: ClassVar[dict[str, Bound]] = {
        "beta": number(0, low_open=True, hint="around 100 suits flow-matching models"),
        "sdpo_mu": number(0, 1),
        "sdpo_lambda_min": number(0),
        "sdpo_lambda_max": number(0),
        "sdpo_eps": number(0, low_open=True),
    }

    def validate(self) -> None:
        super().validate()
        if self.sdpo_space not in SDPO_SPACES:
            self.fail("sdpo_space", f"expected one of {SDPO_SPACES}", "use 'output' or 'parameter'")
        if self.reference_dtype not in REFERENCE_DTYPES:
            self.fail("reference_dtype", f"expected one of {REFERENCE_DTYPES}", "use 'float32' or 'bfloat16'")
        if self.reference_dtype == "bfloat16" and not self.bf16:
            self.fail("reference_dtype", "a bfloat16 reference needs the policy to compute in bfloat16",
                      "set bf16=True, or reference_dtype='float32'")
        if self.sdpo_lambda_min > self.sdpo_lambda_max:
            self.fail("sdpo_lambda_min", f"above sdpo_lambda_max={self.sdpo_lambda_max}",
                      "use 0 <= sdpo_lambda_min <= sdpo_lambda_max")
        if self.sdpo and self.sdpo_space == "parameter" and self._zero_stage() == 3:
            self.fail("sdpo_space", "'parameter' needs whole gradients but ZeRO-3 partitions parameters",
                      "use sdpo_space='output' or ZeRO stage <= 2")

    def _zero_stage(self) -> int | None:
        if not self.deepspeed:
            return None
        return self.hf_deepspeed_config.config.get("zero_optimization", {}).get("stage")
