"""`FlowMatchingConfig`: the configuration of [`FlowMatchingTrainer`] (pretraining and SFT)."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

TIMESTEP_SAMPLING = ("logit_normal", "uniform")
TIMESTEP_SHIFTS = ("resolution", "static", "none")
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


@dataclass
class FlowMatchingConfig(TrainingArguments):
    r"""Configuration of [`FlowMatchingTrainer`]: rectified-flow pretraining and supervised fine-tuning of a
    flow-matching text-to-image transformer. Every `transformers.TrainingArguments` field keeps its meaning
    (`deepspeed`, `bf16`, `gradient_checkpointing`, `save_steps`, `report_to`, ...).

    Parameters:
        > Data and resolution

        resolution (`int`, defaults to 512): side of the single square bucket used when `buckets` is unset.
        buckets (`list[str]`, *optional*): aspect-ratio / multi-resolution buckets as `"HxW"` strings; each
            image is resized and center-cropped to its nearest bucket and every batch holds one bucket.

        > Timesteps and loss (Esser et al. 2024, "Scaling Rectified Flow Transformers", SD3)

        timestep_sampling (`str`, defaults to `"logit_normal"`): `"logit_normal"` (`s = sigmoid(m + n z)`) or
            `"uniform"`.
        logit_mean (`float`, defaults to 0.0), logit_std (`float`, defaults to 1.0): `m` and `n` above.
        timestep_shift (`str`, defaults to `"resolution"`): `"resolution"` shifts sigmas by
            `mu = calculate_shift(image_seq_len)` from the model's scheduler config (as at inference);
            `"static"` by the scheduler's static `shift`; `"none"` leaves them.
        loss_weighting (`str`, defaults to `"none"`): `"none"`, `"sigma_sqrt"` or `"cosmap"`.
        cfg_dropout_prob (`float`, defaults to 0.1): fraction of captions replaced by the empty prompt, so the
            model also learns the unconditional velocity that classifier-free guidance needs.

        > Frozen encoders

        cache_text_embeddings (`bool`, defaults to `False`), cache_latents (`bool`, defaults to `False`): cache
            the frozen text encoder's and VAE's outputs (after the first epoch they are not called again).
        cache_dir (`str`, *optional*): keep the caches on disk there (else in memory).
        encode_batch_size (`int`, *optional*): rows per text-encoder / VAE call (padded to exactly this many,
            so an item's encoding never depends on its batch companions); defaults to
            `per_device_train_batch_size`.

        > EMA

        use_ema (`bool`, defaults to `False`): keep an exponential moving average of the trained weights; it is
            saved with checkpoints and used for evaluation and for the final saved model.
        ema_decay (`float`, defaults to 0.9999): EMA decay per optimizer step.
        ema_warmup (`bool`, defaults to `False`): decay `min(ema_decay, (1 + t) / (10 + t))` at step `t`
            (diffusers' EMA schedule): for short runs, where a high constant decay keeps the EMA near the
            random initial weights.
    """

    resolution: int = field(
        default=512, metadata={"help": "Side of the single square bucket used when `buckets` is unset."})
    buckets: list[str] | None = field(
        default=None,
        metadata={"help": "Aspect-ratio / multi-resolution buckets as 'HxW' strings (for example 512x512 384x672); "
                          "each image goes to its nearest bucket by aspect ratio and each batch holds one bucket."})
    timestep_sampling: str = field(
        default="logit_normal",
        metadata={"help": "Training sigma distribution: 'logit_normal' (SD3, Ovis-Image) or 'uniform'."})
    logit_mean: float = field(default=0.0, metadata={"help": "Mean m of the logit-normal sigma distribution."})
    logit_std: float = field(default=1.0, metadata={"help": "Std n of the logit-normal sigma distribution."})
    timestep_shift: str = field(
        default="resolution",
        metadata={"help": "'resolution': shift sigmas by mu = calculate_shift(image_seq_len) from the scheduler "
                          "config (FLUX, Ovis-Image); 'static': by the scheduler's `shift`; 'none': no shift."})
    loss_weighting: str = field(
        default="none", metadata={"help": "Per-sample loss weighting: 'none', 'sigma_sqrt' or 'cosmap' (SD3)."})
    cfg_dropout_prob: float = field(
        default=0.1,
        metadata={"help": "Fraction of captions replaced by the empty prompt (for classifier-free guidance)."})
    cache_text_embeddings: bool = field(
        default=False, metadata={"help": "Cache the frozen text encoder's outputs, keyed by caption."})
    cache_latents: bool = field(
        default=False, metadata={"help": "Cache the frozen VAE's latents, keyed by the resized image's content."})
    cache_dir: str | None = field(
        default=None, metadata={"help": "Keep the encoder caches on disk in this folder (default: in memory)."})
    encode_batch_size: int | None = field(
        default=None,
        metadata={"help": "Rows per text-encoder / VAE call, padded to exactly this many (batch-independent "
                          "encodings); defaults to per_device_train_batch_size."})
    use_ema: bool = field(
        default=False,
        metadata={"help": "Keep an EMA of the trained weights (saved with checkpoints, used for eval and the "
                          "final model)."})
    ema_decay: float = field(default=0.9999, metadata={"help": "EMA decay per optimizer step, in [0, 1)."})
    ema_warmup: bool = field(
        default=False, metadata={"help": "Decay min(ema_decay, (1 + t) / (10 + t)) at step t (short runs)."})

    # TrainingArguments defaults that differ for this trainer
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate."})
    logging_steps: float = field(default=10, metadata={"help": "Log every this many steps."})
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Must stay False: the trainer's collator reads the image and caption columns itself."})

    def __post_init__(self):
        super().__post_init__()
        for name, value, allowed in (("timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLING),
                                     ("timestep_shift", self.timestep_shift, TIMESTEP_SHIFTS),
                                     ("loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS)):
            if value not in allowed:
                raise ValueError(f"`{name}` is {value!r}; use one of {list(allowed)}")
        if self.logit_std <= 0:
            raise ValueError(f"`logit_std` must be > 0, got {self.logit_std}")
        if not 0.0 <= self.cfg_dropout_prob < 1.0:
            raise ValueError(f"`cfg_dropout_prob` must be in [0, 1), got {self.cfg_dropout_prob}; use 0 to disable")
        if self.resolution < 1:
            raise ValueError(f"`resolution` must be positive, got {self.resolution}")
        self.bucket_sizes()  # validates `buckets`
        if self.cache_dir is not None and not (self.cache_text_embeddings or self.cache_latents):
            raise ValueError("`cache_dir` is set but nothing is cached; set `cache_text_embeddings` and/or "
                             "`cache_latents`, or unset `cache_dir`")
        if self.encode_batch_size is not None and self.encode_batch_size < 1:
            raise ValueError(f"`encode_batch_size` must be >= 1, got {self.encode_batch_size}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must be in [0, 1), got {self.ema_decay}")
        if self.remove_unused_columns:
            raise ValueError("`remove_unused_columns` must be False for FlowMatchingTrainer (its collator reads "
                             "the image and caption columns); set remove_unused_columns=False")

    def bucket_sizes(self) -> list[tuple[int, int]]:
        """The buckets as `(height, width)`: parsed `buckets`, or `[(resolution, resolution)]`."""
        if not self.buckets:
            return [(self.resolution, self.resolution)]
        sizes = []
        for bucket in self.buckets:
            parts = str(bucket).lower().split("x")
            if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
                raise ValueError(f"`buckets` entry {bucket!r} is not 'HxW' with positive integers, e.g. '512x768'")
            sizes.append((int(parts[0]), int(parts[1])))
        if len(set(sizes)) != len(sizes):
            raise ValueError(f"`buckets` has duplicates: {self.buckets}; list each size once")
        return sizes
