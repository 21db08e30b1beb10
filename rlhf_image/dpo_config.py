"""`DPOConfig`: the training arguments of [`~rlhf_image.DPOTrainer`] (Flow-DPO with the Diffusion-SDPO
safeguard)."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

TIMESTEP_SAMPLINGS = ("logit_normal", "uniform")
TIMESTEP_SHIFTS = ("resolution", "static", "none")
SDPO_SPACES = ("output", "parameter")


@dataclass
class DPOConfig(TrainingArguments):
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

        > Timestep sampling (reuses [`~rlhf_image.schedule.sample_training_sigmas`])

        timestep_sampling (`str`, *optional*, defaults to `"logit_normal"`):
            `"logit_normal"` (`s = sigmoid(logit_mean + logit_std z)`, SD3 / Ovis-Image) or `"uniform"`.
        logit_mean (`float`, *optional*, defaults to `0.0`):
            Mean `m` of the logit-normal distribution.
        logit_std (`float`, *optional*, defaults to `1.0`):
            Standard deviation `n` of the logit-normal distribution.
        timestep_shift (`str`, *optional*, defaults to `"resolution"`):
            `"resolution"` shifts the sigmas by `mu = calculate_shift(image_seq_len)` from the model's scheduler
            config (as at inference, and as [`~rlhf_image.FlowMatchingConfig`] does for SFT); `"static"` by the
            scheduler's static `shift`; `"none"` leaves them.

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

        > Data

        resolution (`int`, *optional*, defaults to `512`):
            Images are resized (to cover) and center-cropped to `resolution x resolution` before VAE encoding,
            unless `height`/`width` are set. Precomputed latents are used as given.
        height (`int`, *optional*):
            Training image height in pixels (defaults to `resolution`); with `width`, non-square training.
        width (`int`, *optional*):
            Training image width in pixels (defaults to `resolution`).
        cfg_dropout_prob (`float`, *optional*, defaults to `0.0`):
            Probability of training a pair on the empty (negative) prompt instead of its prompt, which keeps the
            unconditional velocity that classifier-free guidance needs (the Diffusion-DPO SD1.5 script used 0.2).
        cache_latents (`bool`, *optional*, defaults to `False`):
            Cache the frozen VAE's latents of the chosen and rejected images (keyed by image and resolution):
            after the first epoch the VAE is not called again.
        cache_text_embeddings (`bool`, *optional*, defaults to `False`):
            Cache the frozen text encoder's outputs, keyed by prompt.
        cache_dir (`str`, *optional*):
            Keep the caches on disk there (safetensors, shared by processes and reused by later runs); in memory
            otherwise.
        encode_batch_size (`int`, *optional*):
            Rows per VAE / text-encoder call, padded to exactly this many so that an item's encoding never depends
            on its batch companions (a cached value equals a recomputed one); defaults to
            `per_device_train_batch_size`.
    """

    # --- loss ---
    beta: float = field(
        default=100.0,
        metadata={"help": "Inverse temperature of Flow-DPO. Around 100 for flow models (velocity errors are about "
                          "(1 - s)^-2 times larger than epsilon errors, hence smaller than epsilon-DPO's 5000); see "
                          "the DPOConfig docstring."},
    )
    # --- timesteps ---
    timestep_sampling: str = field(
        default="logit_normal", metadata={"help": "Training sigma distribution: 'logit_normal' or 'uniform'."}
    )
    logit_mean: float = field(default=0.0, metadata={"help": "Mean of the logit-normal sigma distribution."})
    logit_std: float = field(default=1.0, metadata={"help": "Standard deviation of the logit-normal distribution."})
    timestep_shift: str = field(
        default="resolution",
        metadata={"help": "'resolution': shift sigmas by mu = calculate_shift(image_seq_len) from the scheduler "
                          "config; 'static': by the scheduler's `shift`; 'none': no shift."},
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
    resolution: int = field(default=512, metadata={"help": "Square training resolution in pixels."})
    height: int | None = field(default=None, metadata={"help": "Training image height in pixels (defaults to "
                                                             "resolution)."})
    width: int | None = field(default=None, metadata={"help": "Training image width in pixels (defaults to "
                                                            "resolution)."})
    cfg_dropout_prob: float = field(
        default=0.0, metadata={"help": "Probability of training a pair on the empty prompt (for classifier-free "
                                       "guidance)."}
    )
    cache_latents: bool = field(
        default=False, metadata={"help": "Cache the VAE latents of chosen/rejected images, keyed by image and "
                                         "resolution."}
    )
    cache_text_embeddings: bool = field(
        default=False, metadata={"help": "Cache the text encoder's outputs, keyed by prompt."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Keep the encoder caches on disk in this folder (default: in memory)."}
    )
    encode_batch_size: int | None = field(
        default=None, metadata={"help": "Rows per VAE / text-encoder call, padded to exactly this many; defaults "
                                        "to per_device_train_batch_size."}
    )
    # --- TrainingArguments defaults that differ ---
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the pair columns are not transformer arguments."}
    )
    logging_steps: float = field(default=1, metadata={"help": "Log every N steps."})

    def __post_init__(self):
        super().__post_init__()
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}; around 100 suits flow-matching models")
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLINGS}, got {self.timestep_sampling!r}")
        if not self.logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")
        if self.timestep_shift not in TIMESTEP_SHIFTS:
            raise ValueError(f"timestep_shift must be one of {TIMESTEP_SHIFTS}, got {self.timestep_shift!r}")
        if self.sdpo_space not in SDPO_SPACES:
            raise ValueError(f"sdpo_space must be one of {SDPO_SPACES}, got {self.sdpo_space!r}")
        if not 0.0 <= self.sdpo_mu <= 1.0:
            raise ValueError(f"sdpo_mu must be in [0, 1], got {self.sdpo_mu}")
        if not 0.0 <= self.sdpo_lambda_min <= self.sdpo_lambda_max:
            raise ValueError(f"need 0 <= sdpo_lambda_min <= sdpo_lambda_max, got {self.sdpo_lambda_min} and "
                             f"{self.sdpo_lambda_max}")
        if not self.sdpo_eps > 0:
            raise ValueError(f"sdpo_eps must be > 0, got {self.sdpo_eps}")
        if self.sdpo and self.sdpo_space == "parameter" and self._zero_stage() == 3:
            raise ValueError("sdpo_space='parameter' needs whole gradients but ZeRO-3 partitions parameters: use "
                             "sdpo_space='output' or ZeRO stage <= 2")
        if not self.resolution > 0:
            raise ValueError(f"resolution must be a positive number of pixels, got {self.resolution}")
        for name, value in (("height", self.height), ("width", self.width)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be a positive number of pixels (or unset to use resolution), "
                                 f"got {value}")
        if not 0.0 <= self.cfg_dropout_prob < 1.0:
            raise ValueError(f"cfg_dropout_prob must be in [0, 1), got {self.cfg_dropout_prob}; use 0 to disable")
        if self.encode_batch_size is not None and self.encode_batch_size < 1:
            raise ValueError(f"encode_batch_size must be >= 1 (or None), got {self.encode_batch_size}")
        if self.cache_dir is not None and not (self.cache_latents or self.cache_text_embeddings):
            raise ValueError("cache_dir is set but nothing is cached: set cache_latents and/or "
                             "cache_text_embeddings, or cache_dir=None")
        if self.remove_unused_columns:
            raise ValueError("remove_unused_columns must be False for DPOTrainer: the prompt/chosen/rejected columns "
                             "are not arguments of the transformer's forward and would be dropped")

    def _zero_stage(self) -> int | None:
        if not self.deepspeed:
            return None
        return self.hf_deepspeed_config.config.get("zero_optimization", {}).get("stage")

    @property
    def image_size(self) -> tuple[int, int]:
        """`(height, width)` of the training images in pixels: `height`/`width`, each defaulting to `resolution`."""
        return (self.height or self.resolution, self.width or self.resolution)
