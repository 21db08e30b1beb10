"""`FlowMatchingTrainer`: rectified-flow pretraining and SFT of any `FlowPolicy`, on `transformers.Trainer`.

The Trainer's `model` is the policy's transformer, so DeepSpeed ZeRO, mixed precision, gradient
accumulation, logging integrations, checkpoints and `resume_from_checkpoint` behave as Trainer users
expect. The text encoder and the VAE are frozen (as in the Ovis-Image report) and may be cached.

Determinism: the randomness of a micro-batch (CFG dropout, sigmas, noise, drawn in that order) comes
from a generator seeded by [`noise_seed`] with the micro-batch's global number
`(global_step * gradient_accumulation_steps + micro_step) * world_size + rank`, which is also the
position of its data in the global batch order of [`~rlhf_image.data.BucketBatchSampler`]. So a resumed
run draws exactly what the uninterrupted run drew, and 2 processes x 1 micro-batch sees the same data
and noise as 1 process x 2 accumulated micro-batches. The frozen encoders are called on chunks of exactly
`encode_batch_size` rows (padded), so an item's encoding does not depend on its batch companions, and
cached and recomputed encodings are bit-identical.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import PIL.Image
import safetensors.torch
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .data import (UNREADABLE_IMAGE_ERRORS, BucketBatchSampler, ImageTextDataset, nearest_bucket,
                   resize_to_bucket)
from .ema import EMAModel, is_zero3_partitioned, local_tensor
from .encode_cache import EncodeCache, fingerprint
from .fm_config import FlowMatchingConfig
from .losses import flow_matching_loss, interpolate
from .model_io import is_lora, prepare_transformer, save_trained, write_model_card
from .policy import Conditioning, FlowPolicy, pil_to_tensor
from .schedule import calculate_shift, loss_weighting, sample_training_sigmas

logger = logging.getLogger(__name__)

TRAIN_STREAM, EVAL_STREAM = 0, 1
EMA_FILE = "ema.safetensors"


def noise_seed(seed: int, stream: int, index: int) -> int:
    """Seed of the generator of one micro-batch: `stream` 0 is training (`index` = global micro-batch
    number), 1 is evaluation (`index` = global eval batch number). A 63-bit SeedSequence hash."""
    return int(np.random.SeedSequence([seed, stream, index]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def bucket_assignment(dataset: Dataset, buckets: Sequence[tuple[int, int]]) -> list[tuple[int, int] | None]:
    """The bucket of every item (`None` for an unreadable image). One bucket needs no image reading;
    several read each image's header ([`ImageTextDataset.image_size`]) or, for other datasets, the item."""
    if len(buckets) == 1:
        return [tuple(buckets[0])] * len(dataset)
    sizes = []
    for index in range(len(dataset)):
        if isinstance(dataset, ImageTextDataset):
            sizes.append(dataset.image_size(index))
        else:
            item = _IndexedDataset(dataset)[index][1]
            sizes.append(None if item is None else (item["image"].height, item["image"].width))
    return [None if size is None else nearest_bucket(*size, buckets) for size in sizes]


class _IndexedDataset(Dataset):
    """`(index, item)` pairs; an unreadable image gives `(index, None)` for any dataset."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, dict[str, Any] | None]:
        try:
            item = self.dataset[index]
            if item is not None:  # decode lazily opened images (datasets' Image feature) inside the guard
                item["image"].load()
                item = {**item, "image": item["image"].convert("RGB")}
        except UNREADABLE_IMAGE_ERRORS:
            item = None
        return index, item


class BucketCollator:
    """Batches of `(index, item)` of one bucket -> `{"pixel_values" [B, 3, H, W] in [0, 1], "captions",
    "image_hashes", "valid" [B]}`. An unreadable item becomes a zero row with `valid = False` (weight 0 in
    the loss), so a batch keeps its shape and every rank its step count. `image_hashes` (of the resized
    pixels and their size) key the latent cache by content, so no dataset can hit another's entries.

    Args:
        buckets (`list[tuple[int, int] | None]`): the bucket of each dataset index.
    """

    def __init__(self, buckets: Sequence[tuple[int, int] | None]):
        self.buckets = buckets

    def __call__(self, batch: list[tuple[int, dict[str, Any] | None]]) -> dict[str, Any]:
        height, width = self.buckets[batch[0][0]]
        images, captions, hashes, valid = [], [], [], []
        for index, item in batch:
            if self.buckets[index] != (height, width):
                raise ValueError(f"batch mixes buckets {self.buckets[index]} and {(height, width)}")
            ok = item is not None
            image = resize_to_bucket(item["image"], (height, width)) if ok else PIL.Image.new("RGB", (width, height))
            images.append(image)
            captions.append(str(item["caption"]) if ok else "")
            digest = hashlib.sha256(f"{height}x{width}".encode())
            digest.update(np.asarray(image).tobytes())
            hashes.append(digest.hexdigest())
            valid.append(ok)
        return {"pixel_values": pil_to_tensor(images), "captions": captions, "image_hashes": hashes,
                "valid": torch.tensor(valid)}


class _FlowMatchingCallback(TrainerCallback):
    """Hooks the trainer's own state into the Trainer loop: EMA set-up and updates, the bucket sampler's
    epoch, and the EMA files of checkpoints."""

    def __init__(self, trainer: FlowMatchingTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._setup_ema()

    def on_epoch_begin(self, args, state, control, **kwargs):
        # `state.epoch` is exactly the epoch number here, also when resuming mid-epoch, where the Trainer's
        # own `set_epoch` does not reach a batch sampler behind accelerate's skip and shard wrappers.
        if self.trainer._train_sampler is not None:
            self.trainer._train_sampler.set_epoch(int(state.epoch))

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.ema is not None:
            self.trainer.ema.update()

    def on_save(self, args, state, control, **kwargs):
        self.trainer._save_ema(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))


class FlowMatchingTrainer(Trainer):
    """Pretraining and supervised fine-tuning of a flow-matching text-to-image model with the rectified-flow
    loss `mean_b w_b ||v_theta(x_t, s) - (eps - x0)||^2`, `x_t = (1 - s) x0 + s eps`.

    Args:
        model ([`FlowPolicy`] or a diffusers pipeline): the model; a pipeline is wrapped with
            `FlowPolicy.from_pipeline`. Its transformer is trained (initialise it randomly to pretrain), fully
            or through a LoRA adapter (`peft_config`).
        args ([`FlowMatchingConfig`]): the configuration.
        train_dataset (`torch.utils.data.Dataset`): items `{"image": PIL.Image, "caption": str, ...}`; see
            [`rlhf_image.data`].
        eval_dataset (`torch.utils.data.Dataset`, *optional*): evaluated with fixed noise (and EMA weights).
        peft_config (`peft.LoraConfig`, *optional*): train a LoRA adapter instead of all weights (SFT).
        callbacks (`list[TrainerCallback]`, *optional*).
        optimizers (`tuple`, *optional*): `(optimizer, lr_scheduler)`, as for `Trainer`.
    """

    def __init__(self, model: FlowPolicy | Any, args: FlowMatchingConfig | None = None,
                 train_dataset: Dataset | None = None, eval_dataset: Dataset | None = None,
                 peft_config=None, callbacks: list[TrainerCallback] | None = None, optimizers=(None, None)):
        args = args if args is not None else FlowMatchingConfig(output_dir="flow-matching")
        if not isinstance(args, FlowMatchingConfig):
            raise TypeError(f"`args` must be a FlowMatchingConfig, got {type(args).__name__}")
        self.policy = model if isinstance(model, FlowPolicy) else FlowPolicy.from_pipeline(model)
        self.buckets = args.bucket_sizes()
        unit = self.policy.vae_scale_factor * self.policy.latent_patch
        bad = [b for b in self.buckets if b[0] % unit or b[1] % unit]
        if bad:
            raise ValueError(f"buckets {bad} are not multiples of the model's pixel unit {unit} (VAE factor x patch); "
                             f"fix `buckets` / `resolution`")
        if args.timestep_shift == "resolution" and \
                self.policy.scheduler_config.get("time_shift_type", "exponential") != "exponential":
            raise ValueError("timestep_shift='resolution' applies the exponential shift, but the scheduler uses "
                             "a linear one; set `timestep_shift` to 'static' or 'none'")
        if args.activation_checkpointing:
            # diffusers models enable it with `enable_gradient_checkpointing()`; the Trainer would call the
            # transformers method name, so the trainer enables it and clears the flag before the Trainer sees it.
            self.policy.transformer.enable_gradient_checkpointing()
            args.activation_checkpointing = args.gradient_checkpointing = False
        self.policy.transformer = transformer = prepare_transformer(self.policy.transformer, peft_config)
        self._train_buckets = None if train_dataset is None else bucket_assignment(train_dataset, self.buckets)
        self._eval_buckets = None if eval_dataset is None else bucket_assignment(eval_dataset, self.buckets)
        self._num_unreadable_at_scan = sum(b is None for b in (self._train_buckets or []))
        super().__init__(model=transformer, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         callbacks=callbacks, optimizers=optimizers)
        self.model_accepts_loss_kwargs = False  # the loss is a per-batch mean: the Trainer scales it for accumulation
        for module in self.policy.frozen_modules():
            module.to(self.args.device)
        self.encode_batch_size = args.encode_batch_size or args.per_device_train_batch_size
        self.text_cache = self.latent_cache = None
        if args.cache_text_embeddings:
            probe = self.policy.encode_prompt(["rlhf-image text cache probe"])
            probe_tensors = probe.tensors()
            self.text_cache = EncodeCache("text", fingerprint(type(self.policy).__name__, *probe_tensors,
                                                              *probe_tensors.values()), args.cache_dir)
        if args.cache_latents:
            probe = torch.linspace(0, 1, 3 * (2 * unit) ** 2).reshape(1, 3, 2 * unit, 2 * unit)
            self.latent_cache = EncodeCache("latents", fingerprint(self.policy.encode_images(probe)), args.cache_dir)
        self.ema: EMAModel | None = None
        self._train_sampler: BucketBatchSampler | None = None
        self._resume_dir: str | None = None
        self._micro_step_owner, self._micro_step = -1, 0
        self._num_unreadable_loaded = 0
        self.add_callback(_FlowMatchingCallback(self))

    # --- data ---------------------------------------------------------------------------------
    def _dataloader(self, dataset: Dataset, sampler: BucketBatchSampler, buckets) -> DataLoader:
        args = self.args
        workers = args.dataloader_num_workers
        loader = DataLoader(_IndexedDataset(dataset), batch_sampler=sampler, collate_fn=BucketCollator(buckets),
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

    # --- encoders (frozen, optionally cached) -------------------------------------------------
    def _chunks(self, rows: list[int]):
        """`rows` in chunks padded to exactly `encode_batch_size` by repeating the last row."""
        size = self.encode_batch_size
        for start in range(0, len(rows), size):
            chunk = rows[start:start + size]
            yield chunk, chunk + [chunk[-1]] * (size - len(chunk))

    def _encode_prompts(self, prompts: list[str], captions: list[str]) -> Conditioning:
        """Conditioning of `prompts` `[B, L, D]`. With caching, also caches `captions` (the undropped
        captions), so no caption first needed in a later epoch misses the cache."""
        if self.text_cache is None:
            parts = [self.policy.encode_prompt([prompts[i] for i in padded]).select(slice(0, len(chunk)))
                     for chunk, padded in self._chunks(list(range(len(prompts))))]
            return Conditioning.cat(parts)
        unique = list(dict.fromkeys(captions + prompts))
        entries = {text: self.text_cache.get(text) for text in unique}
        missing = [text for text in unique if entries[text] is None]
        for chunk, padded in self._chunks(list(range(len(missing)))):
            cond = self.policy.encode_prompt([missing[i] for i in padded])
            for row, i in enumerate(chunk):
                entry = cond.row(row)
                self.text_cache.put(missing[i], entry)
                entries[missing[i]] = entry
        return Conditioning.stack([entries[p] for p in prompts]).to(self.policy.device)

    def _encode_latents(self, pixel_values: torch.Tensor, image_hashes: list[str], valid: torch.Tensor) -> torch.Tensor:
        """Clean latents `[B, C, h, w]` (float32; zeros for invalid rows), VAE mode (deterministic)."""
        b, _, height, width = pixel_values.shape
        latents = torch.zeros(b, self.policy.num_latent_channels, *self.policy.latent_size(height, width),
                              device=self.policy.device)
        rows = [i for i in range(b) if valid[i]]
        missing = rows
        if self.latent_cache is not None:
            missing = []
            for i in rows:
                entry = self.latent_cache.get(image_hashes[i])
                if entry is None:
                    missing.append(i)
                else:
                    latents[i] = entry["latents"].to(latents.device)
        for chunk, padded in self._chunks(missing):
            encoded = self.policy.encode_images(pixel_values[padded])[:len(chunk)]
            latents[chunk] = encoded.to(latents.device)
            if self.latent_cache is not None:
                for row, i in enumerate(chunk):
                    self.latent_cache.put(image_hashes[i], {"latents": encoded[row]})
        return latents

    # --- loss ---------------------------------------------------------------------------------
    def _shift_kwargs(self, image_seq_len: int) -> dict[str, float]:
        config = self.policy.scheduler_config
        if self.args.timestep_shift == "resolution":
            return {"mu": calculate_shift(image_seq_len, config.get("base_image_seq_len", 256),
                                          config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                          config.get("max_shift", 1.15))}
        if self.args.timestep_shift == "static":
            return {"shift": float(config.get("shift", 1.0))}
        return {}

    @contextmanager
    def _policy_through(self, model: torch.nn.Module):
        """Route the policy's transformer calls through the prepared model (DeepSpeed engine, DDP), which
        owns parameter gathering and gradient synchronisation."""
        raw = self.policy.transformer
        self.policy.transformer = model
        try:
            yield
        finally:
            self.policy.transformer = raw

    def flow_matching_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                           generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The rectified-flow loss of one collated batch.

        Draws from `generator`, in order: CFG-dropout uniforms `[B]`, sigmas `[B]`, noise `[B, C, h, w]`.

        Returns:
            `(loss, outputs)`; `outputs` holds `sigmas`, `noise`, `latents` (x0), `velocity`, `weights`,
            `prompts` (after dropout) and `num_valid`.
        """
        args = self.args
        captions, valid = inputs["captions"], inputs["valid"].bool()
        pixel_values = inputs["pixel_values"]
        b, _, height, width = pixel_values.shape
        dropped = (torch.rand(b, generator=generator) < args.cfg_dropout_prob).tolist()
        prompts = ["" if drop else caption for drop, caption in zip(dropped, captions)]
        cond = self._encode_prompts(prompts, captions)
        latents = self._encode_latents(pixel_values, inputs["image_hashes"], valid)
        sigmas = sample_training_sigmas(b, args.timestep_sampling, logit_mean=args.logit_mean,
                                        logit_std=args.logit_std, generator=generator,
                                        **self._shift_kwargs(self.policy.image_seq_len(height, width)))
        noise = torch.randn(latents.shape, generator=generator)
        device = latents.device
        sigmas, noise = sigmas.to(device), noise.to(device)
        noisy, target = interpolate(latents, noise, sigmas)
        with self._policy_through(model) if model is not self.policy.transformer else nullcontext():
            velocity = self.policy.predict_velocity(noisy, sigmas, cond)
        num_valid = int(valid.sum())
        # invalid rows weigh 0; the rest are renormalised so the loss is the mean over valid rows
        weights = loss_weighting(sigmas, args.loss_weighting) * valid.to(device).float() * (b / max(num_valid, 1))
        loss = flow_matching_loss(velocity, target, weights)
        return loss, {"sigmas": sigmas, "noise": noise, "latents": latents, "velocity": velocity,
                      "weights": weights, "prompts": prompts, "num_valid": num_valid}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        if self.state.global_step != self._micro_step_owner:
            self._micro_step_owner, self._micro_step = self.state.global_step, 0
        index = ((self.state.global_step * args.gradient_accumulation_steps + self._micro_step) * args.world_size
                 + args.process_index)
        self._micro_step += 1
        generator = torch.Generator().manual_seed(noise_seed(args.seed, TRAIN_STREAM, index))
        loss, outputs = self.flow_matching_step(model, inputs, generator)
        self._num_unreadable_loaded += len(outputs["prompts"]) - outputs["num_valid"]
        return (loss, outputs) if return_outputs else loss

    # --- EMA, evaluation, logging, saving ----------------------------------------------------
    def _ema_files(self) -> tuple[str, bool]:
        """The EMA file name of this rank, and whether this rank writes it."""
        sharded = any(is_zero3_partitioned(p) for p in self.ema.params.values())
        if sharded:  # each rank holds its ZeRO-3 partitions
            return f"ema-rank{self.args.process_index:05d}-of-{self.args.world_size:05d}.safetensors", True
        return EMA_FILE, self.args.should_save

    def _setup_ema(self) -> None:
        if not self.args.use_ema:
            return
        named = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        self.ema = EMAModel(named, self.args.ema_decay, warmup=self.args.ema_warmup)
        if self._resume_dir is not None:
            self.ema.num_updates = self.state.global_step
            path = os.path.join(self._resume_dir, self._ema_files()[0])
            if os.path.isfile(path):
                self.ema.load_state_dict(safetensors.torch.load_file(path, device=str(local_tensor(named[0][1]).device)))
            else:
                logger.warning("no EMA in %s: the EMA restarts from the current weights", self._resume_dir)

    def _save_ema(self, checkpoint_dir: str) -> None:
        if self.ema is None:
            return
        name, writes = self._ema_files()
        if writes:
            os.makedirs(checkpoint_dir, exist_ok=True)
            safetensors.torch.save_file(self.ema.state_dict(), os.path.join(checkpoint_dir, name))

    def _ema_applied(self):
        return self.ema.applied() if self.ema is not None else nullcontext()

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None,
              ignore_keys_for_eval: list[str] | None = None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        self._resume_dir = resume_from_checkpoint or None
        return super().train(resume_from_checkpoint=self._resume_dir, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

    def evaluate(self, eval_dataset: Dataset | None = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """Mean flow-matching loss over `eval_dataset` with fixed noise per eval batch (EMA weights when
        enabled), averaged over all processes: `{f"{metric_key_prefix}_loss": float}`."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("FlowMatchingTrainer: evaluation requires an eval_dataset")
        buckets = self._eval_buckets if dataset is self.eval_dataset else bucket_assignment(dataset, self.buckets)
        args = self.args
        sampler = BucketBatchSampler(buckets, args.per_device_eval_batch_size, shuffle=False,
                                     num_replicas=args.world_size, rank=args.process_index)
        batches = sampler.global_batches()
        collate, indexed = BucketCollator(buckets), _IndexedDataset(dataset)
        model = self.model_wrapped
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=args.device)
        # every rank runs the same number of batches (ZeRO-3 gathers are collective); repeats weigh 0
        with torch.no_grad(), self._ema_applied(), self.compute_loss_context_manager():
            for index in range(args.process_index, len(sampler) * args.world_size, args.world_size):
                inputs = self._prepare_inputs(collate([indexed[i] for i in batches[index % len(batches)]]))
                generator = torch.Generator().manual_seed(noise_seed(args.seed, EVAL_STREAM, index))
                loss, outputs = self.flow_matching_step(model, inputs, generator)
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
            logs["data/skipped_images"] = self._num_unreadable_at_scan + int(count.item())
        super().log(logs, start_time)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints (`_internal_call`) keep the Trainer's format (raw weights; EMA saved beside them).
        The final model is the EMA weights when enabled, written by `rlhf_image.model_io` (diffusers layout,
        or a diffusers LoRA file) with a model card. Under ZeRO-3 every rank must call this (weights are
        gathered)."""
        if _internal_call:
            return super().save_model(output_dir, _internal_call=True)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        with self._ema_applied():  # write inside: the state dict may alias the (swapped) parameters
            # gathered under DeepSpeed (ZeRO-3 partitions); otherwise the model's own save_pretrained
            state_dict = self.accelerator.get_state_dict(self.model_wrapped) if self.is_deepspeed_enabled else None
            if self.args.should_save:
                save_trained(model, output_dir, state_dict)
        if self.args.should_save:
            losses = [h["loss"] for h in self.state.log_history if "loss" in h]
            evals = [h["eval_loss"] for h in self.state.log_history if "eval_loss" in h]
            metrics = {"train_loss (last step)": losses[-1]} if losses else {}
            metrics.update({"eval_loss (last)": evals[-1]} if evals else {})
            write_model_card(output_dir, method="Flow matching (pretraining/SFT)",
                             base_model=self.policy.base_model_name_or_path, lora=is_lora(model),
                             details={"steps": self.state.global_step, "buckets": self.buckets,
                                      "learning_rate": self.args.learning_rate,
                                      "timesteps": f"{self.args.timestep_sampling}, shift {self.args.timestep_shift}",
                                      "ema": self.args.ema_decay if self.args.use_ema else "off"},
                             metrics=metrics)
