"""`FlowMatchingConfig`: the configuration of [`FlowMatchingTrainer`] (pretraining and SFT)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base_config import ImageTrainingConfig, check_image_shape

LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


@dataclass
class FlowMatchingConfig(ImageTrainingConfig):
    r"""Configuration of [`FlowMatchingTrainer`]: rectified-flow pretraining and supervised fine-tuning of a
    flow-matching text-to-image transformer. The image size, timestep sampling, CFG dropout and encoder caches are
    [`~rlhf_image.ImageTrainingConfig`]'s (shared with DPO), the EMA (`use_ema`, `ema_decay`, ...)
    [`~rlhf_image.BaseConfig`]'s; every `transformers.TrainingArguments` field keeps its meaning (`deepspeed`,
    `bf16`, `gradient_checkpointing`, `save_steps`, `report_to`, ...).

    Parameters:
        > Data and resolution

        buckets (`list[str]`, *optional*): aspect-ratio / multi-resolution buckets as `"HxW"` strings; each
            image is resized and center-cropped to its nearest bucket and every batch holds one bucket. Without
            them there is one bucket, `height x width` (each defaulting to `resolution`). A bucket's sides are at
            most 8192 px and its aspect ratio at most 8:1 (see `rlhf_image.base_config.MAX_IMAGE_SIDE`); the model
            checks its own pixel unit when the trainer is built.

        > Loss (Esser et al. 2024, "Scaling Rectified Flow Transformers", SD3)

        loss_weighting (`str`, defaults to `"none"`): `"none"`, `"sigma_sqrt"` or `"cosmap"` (diffusers'
            `compute_loss_weighting_for_sd3`).
    """

    buckets: list[str] | None = field(
        default=None,
        metadata={"help": "Aspect-ratio / multi-resolution buckets as 'HxW' strings (for example 512x512 384x672); "
                          "each image goes to its nearest bucket by aspect ratio and each batch holds one bucket."})
    loss_weighting: str = field(
        default="none", metadata={"help": "Per-sample loss weighting: 'none', 'sigma_sqrt' or 'cosmap' (SD3)."})

    # TrainingArguments defaults that differ for this trainer
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate."})
    logging_steps: float = field(default=10, metadata={"help": "Log every this many steps."})

    def validate(self) -> None:
        super().validate()
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            self.fail("loss_weighting", f"unknown value, expected one of {LOSS_WEIGHTINGS}",
                      f"use one of {LOSS_WEIGHTINGS}")
        sizes = self.bucket_sizes()
        if len(set(sizes)) != len(sizes):
            self.fail("buckets", "has duplicates", "list each size once")
        for height, width in sizes:
            problem = check_image_shape(height, width, "bucket")
            if problem is not None:
                self.fail("buckets", problem, "use buckets the model is trained for, e.g. 512x512 384x672")

    def bucket_sizes(self) -> list[tuple[int, int]]:
        """The buckets as `(height, width)`: parsed `buckets`, or `[image_size]`."""
        if not self.buckets:
            return [self.image_size]
        sizes = []
        for bucket in self.buckets:
            parts = str(bucket).lower().split("x")
            if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
                self.fail("buckets", f"entry {bucket!r} is not 'HxW' with positive integers", "write e.g. '512x768'")
            sizes.append((int(parts[0]), int(parts[1])))
        return sizes
