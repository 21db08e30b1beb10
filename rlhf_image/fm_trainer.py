"""`FlowMatchingTrainer`: rectified-flow pretraining and SFT of any `FlowPolicy`, on
[`~rlhf_image.base_trainer.BaseTrainer`].

The Trainer's `model` is the policy's transformer, so DeepSpeed ZeRO, mixed precision, gradient
accumulation, logging integrations, checkpoints and `resume_from_checkpoint` behave as Trainer users
expect. The text encoder and the VAE are frozen (as in the Ovis-Image report) and may be cached.

Data: items `{"image", "prompt", ...}` where the image is a path, a PIL image, an array, encoded bytes or
precomputed latents (`torch.Tensor` `[C, h, w]`); see `rlhf_image.data`. An unreadable image is skipped and counted.

Determinism: the randomness of a micro-batch (CFG dropout, sigmas, noise, drawn in that order) comes from a generator
seeded by its global micro-batch number `(global_step * gradient_accumulation_steps + micro_step) * world_size +
rank` (`rlhf_image.seeding.Stream.MICRO_BATCH`), which is also the position of its data in the global batch order of
[`~rlhf_image.data.BucketBatchSampler`]. So a resumed run draws exactly what the uninterrupted run drew, and 2
processes x 1 micro-batch sees the same data and noise as 1 process x 2 accumulated micro-batches. The frozen
encoders are called on chunks of exactly `encode_batch_size` rows (padded), so an item's encoding does not depend on
its batch companions, and cached and recomputed encodings are bit-identical.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import TrainerCallback

from .base_trainer import BaseTrainer, describe_sizes
from .data import (UNREADABLE_IMAGE_ERRORS, BucketBatchSampler, ImageTextDataset, image_source_size, load_image,
                   nearest_bucket, resize_to_bucket)
from .encoders import FrozenEncoders, cfg_dropout
from .fm_config import FlowMatchingConfig
from .losses import flow_matching_loss, interpolate
from .policy import FlowPolicy, pil_to_tensor
from .schedule import loss_weighting, sample_training_sigmas, shift_training_sigmas
from .seeding import Stream



def bucket_assignment(dataset: Dataset, buckets: Sequence[tuple[int, int]],
                      vae_scale_factor: int) -> list[tuple[int, int] | None]:
    """The bucket of every item (`None` for an unreadable image). One bucket needs no image reading; several read
    each image's size from its header where it is a file, or from the item (precomputed latents count
    `vae_scale_factor` pixels per latent)."""
    if len(buckets) == 1:
        return [tuple(buckets[0])] * len(dataset)
    sizes = []
    for index in range(len(dataset)):
        if isinstance(dataset, ImageTextDataset):
            sizes.append(dataset.image_size(index))
            continue
        try:
            item = dataset[index]
            image = None if item is None else item["image"]
            if isinstance(image, torch.Tensor):
                sizes.append((image.shape[-2] * vae_scale_factor, image.shape[-1] * vae_scale_factor))
            else:
                sizes.append(None if image is None else image_source_size(image))
        except UNREADABLE_IMAGE_ERRORS:
            sizes.append(None)
    return [None if size is None else nearest_bucket(*size, buckets) for size in sizes]


class _IndexedDataset(Dataset):
    """`(index, item)` pairs with the image decoded to an RGB PIL image (precomputed latents pass through); an
    unreadable image gives `(index, None)` for any dataset."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, dict[str, Any] | None]:
        try:
            item = self.dataset[index]
            if item is not None and not isinstance(item["image"], torch.Tensor):
                # decoded inside the guard: paths, bytes, arrays, lazily opened PIL images (datasets' Image feature)
                item = {**item, "image": load_image(item["image"])}
        except UNREADABLE_IMAGE_ERRORS:
            item = None
        return index, item


class BucketCollator:
    """Batches of `(index, item)` of one bucket -> `{"pixel_values" [B, 3, H, W] in [0, 1] (or "latents"
    [B, C, h, w] for precomputed latents), "prompts", "image_hashes", "valid" [B]}`. An unreadable item becomes a
    zero row with `valid = False` (weight 0 in the loss), so a batch keeps its shape and every rank its step count.
    `image_hashes` (of the resized pixels and their size) key the latent cache by content, so no dataset can hit
    another's entries.

    Args:
        buckets (`list[tuple[int, int] | None]`): the bucket of each dataset index.
        vae_scale_factor (`int`): pixels per latent, to check precomputed latents against their bucket.
    """

    def __init__(self, buckets: Sequence[tuple[int, int] | None], vae_scale_factor: int = 8):
        self.buckets, self.vae_scale_factor = buckets, vae_scale_factor

    def __call__(self, batch: list[tuple[int, dict[str, Any] | None]]) -> dict[str, Any]:
        height, width = self.buckets[batch[0][0]]
        for index, _ in batch:
            if self.buckets[index] != (height, width):
                raise ValueError(f"batch mixes buckets {self.buckets[index]} and {(height, width)}")
        items = [item for _, item in batch]
        valid = [item is not None for item in items]
        prompts = [str(item["prompt"]) if item is not None else "" for item in items]
        kinds = {isinstance(item["image"], torch.Tensor) for item in items if item is not None}
        if len(kinds) > 1:
            raise ValueError("a batch mixes precomputed latents and images: give every row the same kind")
        if kinds == {True}:
            return {"latents": self._latents(items, height, width), "prompts": prompts,
                    "image_hashes": [""] * len(items), "valid": torch.tensor(valid)}
        images, hashes = [], []
        for item in items:
            image = resize_to_bucket(item["image"], (height, width)) if item else PIL.Image.new("RGB", (width, height))
            images.append(image)
            digest = hashlib.sha256(f"{height}x{width}".encode())
            digest.update(np.asarray(image).tobytes())
            hashes.append(digest.hexdigest())
        return {"pixel_values": pil_to_tensor(images), "prompts": prompts, "image_hashes": hashes,
                "valid": torch.tensor(valid)}

    def _latents(self, items: list[dict[str, Any] | None], height: int, width: int) -> torch.Tensor:
        given = [item["image"] for item in items if item is not None]
        shape = given[0].shape
        expected = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        for latents in given:
            if latents.ndim != 3 or tuple(latents.shape[-2:]) != expected or latents.shape != shape:
                raise ValueError(f"precomputed latents of shape {tuple(latents.shape)} in the {height}x{width} px "
                                 f"bucket: expected [C, {expected[0]}, {expected[1]}] (VAE factor "
                                 f"{self.vae_scale_factor}); give latents of the bucket's size")
        return torch.stack([item["image"].float() if item is not None else torch.zeros(shape) for item in items])


class _FlowMatchingCallback(TrainerCallback):
    """Hands the bucket sampler its epoch."""

    def __init__(self, trainer: FlowMatchingTrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        # `state.epoch` is exactly the epoch number here, also when resuming mid-epoch, where the Trainer's
        # own `set_epoch` does not reach a batch sampler behind accelerate's skip and shard wrappers.
        if self.trainer._train_sampler is not None:
            self.trainer._train_sampler.set_epoch(int(state.epoch))


class FlowMatchingTrainer(BaseTrainer):
    """Pretraining and supervised fine-tuning of a flow-matching text-to-image model with the rectified-flow
    loss `mean_b w_b ||v_theta(x_t, s) - (eps - x0)||^2`, `x_t = (1 - s) x0 + s eps`.

    Args:
        model ([`FlowPolicy`] or a diffusers pipeline): the model; a pipeline is wrapped with
            `FlowPolicy.from_pipeline`. Its transformer is trained (initialise it randomly to pretrain), fully
            or through a LoRA adapter (`peft_config`).
        args ([`FlowMatchingConfig`]): the configuration.
        train_dataset (`torch.utils.data.Dataset`): items `{"image", "prompt", ...}`, the image a path, a PIL image,
            an array, encoded bytes or precomputed latents `[C, h, w]`; see [`rlhf_image.data`].
        eval_dataset (`torch.utils.data.Dataset`, *optional*): evaluated with fixed noise (and EMA weights).
        peft_config (`peft.LoraConfig`, *optional*): train a LoRA adapter instead of all weights (SFT).
        callbacks (`list[TrainerCallback]`, *optional*).
        optimizers (`tuple`, *optional*): `(optimizer, lr_scheduler)`, as for `Trainer`.

    Logged: the Trainer's `loss` and `grad_norm`, `data/skipped_images` (unreadable images so far), and the base
    trainer's `nonfinite/*`.
    """

    config_class = FlowMatchingConfig
    method_name = "Flow matching (pretraining/SFT)"
    required_columns = ("image", "prompt")
    image_columns = ("image",)

    def __init__(self, model: FlowPolicy | Any, args: FlowMatchingConfig | None = None,
                 train_dataset: Dataset | None = None, eval_dataset: Dataset | None = None,
                 peft_config=None, callbacks: list[TrainerCallback] | None = None, optimizers=(None, None)):
        args = args if args is not None else FlowMatchingConfig(output_dir="flow-matching")
        super().__init__(model, args, train_dataset, eval_dataset, peft_config=peft_config, callbacks=callbacks,
                         optimizers=optimizers)
        self.buckets = args.bucket_sizes()
        factor = self.policy.vae_scale_factor
        self._train_buckets = None if train_dataset is None else bucket_assignment(train_dataset, self.buckets, factor)
        self._eval_buckets = None if eval_dataset is None else bucket_assignment(eval_dataset, self.buckets, factor)
        self._num_unreadable_at_scan = sum(b is None for b in (self._train_buckets or []))
        self.encoders = FrozenEncoders(self.policy, args.encoder_batch_size, cache_latents=args.cache_latents,
                                       cache_text=args.cache_text_embeddings, cache_dir=args.cache_dir)
        self._train_sampler: BucketBatchSampler | None = None
        self._num_unreadable_loaded = 0
        self.counters.update({"data/unreadable_loaded": 0})
        self.add_callback(_FlowMatchingCallback(self))

    def image_sizes(self, args: FlowMatchingConfig) -> list[tuple[str, int, int]]:
        if not args.buckets:
            return super().image_sizes(args)
        return [(f"buckets={args.buckets!r}", height, width) for height, width in args.bucket_sizes()]

    # --- data ---------------------------------------------------------------------------------
    def _dataloader(self, dataset: Dataset, sampler: BucketBatchSampler, buckets) -> DataLoader:
        args = self.args
        workers = args.dataloader_num_workers
        loader = DataLoader(_IndexedDataset(dataset), batch_sampler=sampler,
                            collate_fn=BucketCollator(buckets, self.policy.vae_scale_factor),
                            num_workers=workers, pin_memory=args.dataloader_pin_memory,
                            persistent_workers=args.dataloader_persistent_workers and workers > 0,
                            prefetch_factor=args.dataloader_prefetch_factor if workers > 0 else None)
        loader = self.accelerator.prepare(loader)
        # The sampler already shards by rank; make accelerate's BatchSamplerShard a pass-through (as the
        # Trainer does for its own rank-aware BatchRebalanceSampler).
        wrapper = loader.batch_sampler
        if wrapper is not sampler and wrapper.batch_sampler is sampler:
            wrapper.num_processes, wrapper.process_index = 1, 0
        return loader

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError("FlowMatchingTrainer: training requires a train_dataset")
        args = self.args
        self._train_sampler = BucketBatchSampler(
            self._train_buckets, args.per_device_train_batch_size, shuffle=True,
            seed=args.data_seed if args.data_seed is not None else args.seed, drop_last=args.dataloader_drop_last,
            num_replicas=args.world_size, rank=args.process_index)
        return self._dataloader(self.train_dataset, self._train_sampler, self._train_buckets)

    def _encode_latents(self, inputs: dict[str, Any]) -> torch.Tensor:
        """Clean latents `[B, C, h, w]` (float32; zeros for invalid rows): the batch's precomputed latents, or the
        VAE's (mode, deterministic) of its valid rows."""
        valid = inputs["valid"]
        if "latents" in inputs:
            return inputs["latents"].float().to(self.policy.device)
        pixel_values = inputs["pixel_values"]
        b, _, height, width = pixel_values.shape
        latents = torch.zeros(b, self.policy.num_latent_channels, *self.policy.latent_size(height, width),
                              device=self.policy.device)
        rows = [i for i in range(b) if valid[i]]
        if rows:
            hashes = inputs["image_hashes"]
            latents[rows] = self.encoders.latents(len(rows), lambda chunk: pixel_values[[rows[i] for i in chunk]],
                                                  [hashes[i] for i in rows]).to(latents.device)
        return latents

    # --- loss ---------------------------------------------------------------------------------
    def flow_matching_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                           generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The rectified-flow loss of one collated batch.

        Draws from `generator`, in order: CFG-dropout uniforms `[B]`, sigmas `[B]`, noise `[B, C, h, w]`.

        Returns:
            `(loss, outputs)`; `outputs` holds `sigmas`, `noise`, `latents` (x0), `velocity`, `weights`,
            `prompts` (after dropout) and `num_valid`.
        """
        args = self.args
        captions, valid = inputs["prompts"], inputs["valid"].bool()
        b = len(captions)
        prompts, _ = cfg_dropout(captions, args.cfg_dropout_prob, self.policy.negative_prompt, generator)
        cond = self.encoders.conditioning(prompts, also_cache=captions)
        latents = self._encode_latents(inputs)
        height, width = (side * self.policy.vae_scale_factor for side in latents.shape[-2:])
        sigmas = sample_training_sigmas(b, args.timestep_sampling, logit_mean=args.logit_mean,
                                        logit_std=args.logit_std, generator=generator)
        sigmas = shift_training_sigmas(sigmas, self.policy.image_seq_len(height, width), self.policy.scheduler_config,
                                       args.timestep_shift)
        noise = torch.randn(latents.shape, generator=generator)
        device = latents.device
        sigmas, noise = sigmas.to(device), noise.to(device)
        noisy, target = interpolate(latents, noise, sigmas)
        # Through the wrapper (DDP, DeepSpeed) that the Trainer hands us, so gradients are synchronised.
        velocity = self.policy.predict_velocity(noisy, sigmas, cond, transformer=model)
        num_valid = int(valid.sum())
        # invalid rows weigh 0; the rest are renormalised so the loss is the mean over valid rows
        weights = loss_weighting(sigmas, args.loss_weighting) * valid.to(device).float() * (b / max(num_valid, 1))
        loss = flow_matching_loss(velocity, target, weights)
        return loss, {"sigmas": sigmas, "noise": noise, "latents": latents, "velocity": velocity,
                      "weights": weights, "prompts": prompts, "num_valid": num_valid}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = self.flow_matching_step(model, inputs, self.generator(Stream.MICRO_BATCH,
                                                                              self.global_micro_batch))
        self._num_unreadable_loaded += len(outputs["prompts"]) - outputs["num_valid"]
        return (loss, outputs) if return_outputs else loss

    # --- evaluation, logging ------------------------------------------------------------------
    def evaluate(self, eval_dataset: Dataset | None = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """Mean flow-matching loss over `eval_dataset` with fixed noise per eval batch (EMA weights when
        enabled), averaged over all processes: `{f"{metric_key_prefix}_loss": float}`."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("FlowMatchingTrainer: evaluation requires an eval_dataset")
        if dataset is self.eval_dataset:
            buckets = self._eval_buckets
        else:
            self.check_dataset("eval_dataset", dataset)
            buckets = bucket_assignment(dataset, self.buckets, self.policy.vae_scale_factor)
        args = self.args
        sampler = BucketBatchSampler(buckets, args.per_device_eval_batch_size, shuffle=False,
                                     num_replicas=args.world_size, rank=args.process_index)
        batches = sampler.global_batches()
        collate, indexed = BucketCollator(buckets, self.policy.vae_scale_factor), _IndexedDataset(dataset)
        model = self.model_wrapped
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=args.device)
        # every rank runs the same number of batches (ZeRO-3 gathers are collective); repeats weigh 0
        with torch.no_grad(), self.saved_weights(), self.compute_loss_context_manager():
            for index in range(args.process_index, len(sampler) * args.world_size, args.world_size):
                inputs = self._prepare_inputs(collate([indexed[i] for i in batches[index % len(batches)]]))
                loss, outputs = self.flow_matching_step(model, inputs, self.generator(Stream.EVALUATION, index))
                if index < len(batches):
                    totals += torch.stack([loss.double() * outputs["num_valid"],
                                           torch.tensor(float(outputs["num_valid"]), dtype=torch.float64,
                                                        device=args.device)])
        totals = self.accelerator.reduce(totals, reduction="sum") if args.world_size > 1 else totals
        metrics = {f"{metric_key_prefix}_loss": (totals[0] / totals[1].clamp(min=1)).item()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(args, self.state, self.control, metrics)
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # training logs happen on every rank together, so the reduction is safe here
            count = torch.tensor(float(self._num_unreadable_loaded), device=self.args.device)
            if self.args.world_size > 1:
                count = self.accelerator.reduce(count, reduction="sum")
            self._num_unreadable_loaded = 0
            self.counters["data/unreadable_loaded"] += int(count.item())
            logs["data/skipped_images"] = self._num_unreadable_at_scan + self.counters["data/unreadable_loaded"]
        super().log(logs, start_time)

    def model_card_details(self) -> dict[str, object]:
        args = self.args
        return {**super().model_card_details(), "buckets": describe_sizes(self.buckets),
                "timesteps": f"{args.timestep_sampling}, shift {args.timestep_shift}",
                "loss weighting": args.loss_weighting, "CFG dropout": args.cfg_dropout_prob}
