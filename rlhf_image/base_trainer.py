"""[`BaseTrainer`]: what every trainer of the library does the same way, once, on `transformers.Trainer`.

A method's trainer ([`~rlhf_image.GRPOTrainer`], [`~rlhf_image.DPOTrainer`], [`~rlhf_image.FlowMatchingTrainer`],
and the ones to come) subclasses it with its config (a subclass of [`~rlhf_image.BaseConfig`]) and then holds its
method and little else. The base owns:

- the model: a diffusers pipeline (wrapped with `FlowPolicy.from_pipeline`) or a [`~rlhf_image.FlowPolicy`]; the
  image size checked against the model (`FlowPolicy.check_image_size`: refused, never rounded); a transformer that
  carries adapters loaded into the pipeline refused (see `model_io.check_no_loaded_adapters`);
- LoRA (`peft_config`, initialised from `args.seed`) or full fine-tuning, and the reference policy when the method
  needs one ([`reference_transformer`]: the adapter disabled, a frozen copy, or the user's `ref_model`);
- calling the policy through whatever wraps the transformer (DDP, DeepSpeed): the loss calls
  `self.policy.predict_velocity(..., transformer=model)` with the `model` the `Trainer` hands `compute_loss`;
- one seed derivation for every random draw ([`generator`], `rlhf_image.seeding`), and the micro-batch bookkeeping
  ([`micro_batch_index`], [`global_micro_batch`]) that keys them, so a resumed run draws exactly what an
  uninterrupted one drew;
- the non-finite guard: a step whose loss or gradient is not finite is skipped (no update, no optimizer-state
  change) on every rank, and `max_consecutive_nonfinite` of them in a row stop training;
- gradient checkpointing as the config's one flag (diffusers' `enable_gradient_checkpointing`);
- the EMA of the trained weights (`use_ema`, ...; [`ema`]): updated after optimizer steps, written into every
  checkpoint and restored on resume, swapped in for evaluation and for the saved model ([`saved_weights`]);
- counters that survive a resume ([`counters`], kept in a stateful callback, saved in `trainer_state.json`);
- metrics recorded per micro-batch and reduced at each log ([`record_metrics`]);
- the dataset contract, checked at construction: a map-style dataset of mapping rows whose first row has
  [`required_columns`], images in [`image_columns`] as paths, PIL images, arrays, bytes or latents;
- saving what stock diffusers loads (a LoRA file or a `transformer/` folder) with a model card whose loading code
  runs as written.

A new method's trainer: subclass `BaseTrainer` and its config; set `config_class`, `method_name`,
`required_columns` (and `image_columns`); call `super().__init__(model, args, ...)` (with `needs_reference=True`
if its loss needs the reference policy); implement `compute_loss(model, inputs, ...)` calling
`self.policy.predict_velocity(..., transformer=model)` and drawing from `self.generator(Stream..., keys)`; record
its metrics with `record_metrics`; add its settings to the model card in `model_card_details`.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence, Sized
from contextlib import contextmanager, nullcontext
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import safetensors.torch
import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .base_config import BaseConfig
from .checkpoints import TRAINER_STATE, CheckpointError, check_checkpoint, latest_complete_checkpoint, publish
from .checkpoints import staging_path
from .ema import EMA_FILE, EMAModel, is_zero3_partitioned, local_tensor
from .metrics import reduce_metrics
from .model_io import base_transformer, compile_repeated_blocks, frozen_copy, is_lora, prepare_transformer
from .model_io import reference_transformer, set_attention_backend
from .model_io import save_trained, write_model_card
from .policy import FlowPolicy
from .seeding import Stream, derive_seed, seeded_generator

logger = logging.getLogger(__name__)


class TrainerCounters(TrainerCallback, ExportableState):
    """Running counts of a trainer (skipped non-finite steps, unscored samples, ...), logged at every training log
    and restored on resume: a stateful callback, saved with the `Trainer`'s state in each checkpoint's
    `trainer_state.json` (`restore_callback_states_from_checkpoint`, on by default in [`BaseConfig`]).

    Args:
        counts (`dict[str, float]`, *optional*): initial values.
    """

    def __init__(self, counts: dict[str, float] | None = None):
        self.counts: dict[str, float] = dict(counts or {})

    def state(self) -> dict:
        return {"args": {"counts": dict(self.counts)}, "attributes": {}}


class _EMACallback(TrainerCallback):
    """Builds the trainer's EMA once the model is placed (after DeepSpeed partitions it) and updates it after each
    optimizer step, before the step's checkpoint and evaluation."""

    def __init__(self, trainer: BaseTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._setup_ema()

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.ema is not None:
            self.trainer.ema.step(state.global_step)


def _is_map_style(dataset: Any) -> bool:
    return (isinstance(dataset, Sized) and callable(getattr(type(dataset), "__getitem__", None))
            and not isinstance(dataset, (str, bytes, Mapping)))


class BaseTrainer(Trainer):
    """Base of the library's trainers (see the module docstring for what it owns).

    Args:
        model ([`FlowPolicy`] or a diffusers pipeline): the policy; its transformer trains, the VAE and text encoders
            stay frozen. A pipeline is wrapped with `FlowPolicy.from_pipeline`.
        args ([`BaseConfig`]): the method's config (an instance of `config_class`).
        train_dataset, eval_dataset (*optional*): map-style datasets (a `datasets.Dataset`, a list of dicts, a
            `torch.utils.data.Dataset`) whose rows are mappings with `required_columns`.
        peft_config (`peft.LoraConfig`, *optional*): train a LoRA adapter instead of all weights.
        ref_model ([`FlowPolicy`] or `torch.nn.Module`, *optional*): the reference policy (or its transformer); with
            `needs_reference` it defaults to the adapter disabled (LoRA) or a frozen copy of the transformer.
        needs_reference (`bool`, defaults to `False`): the method's loss uses the reference policy.
        data_collator, callbacks, optimizers: as for `transformers.Trainer`.
    """

    config_class: ClassVar[type[BaseConfig]] = BaseConfig
    method_name: ClassVar[str] = "Fine-tuning"
    required_columns: ClassVar[tuple[str, ...]] = ("prompt",)
    image_columns: ClassVar[tuple[str, ...]] = ()
    # compute_loss returns a per-micro-batch mean: the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, model: FlowPolicy | Any, args: BaseConfig, train_dataset: Any = None, eval_dataset: Any = None,
                 *, peft_config: Any = None, ref_model: FlowPolicy | torch.nn.Module | None = None,
                 needs_reference: bool = False, reference_dtype: torch.dtype | None = None,
                 data_collator: Any = None,
                 callbacks: list[TrainerCallback] | None = None, optimizers: tuple = (None, None)):
        self.check_args(args)
        self.policy = policy = model if isinstance(model, FlowPolicy) else FlowPolicy.from_pipeline(model)
        for fields, height, width in self.image_sizes(args):
            try:
                policy.check_image_size(height, width)
            except ValueError as error:
                raise ValueError(f"{type(args).__name__}.{fields}: {error}") from None
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            if dataset is not None:
                self.check_dataset(name, dataset)
        if ref_model is not None and peft_config is not None:
            raise ValueError("with peft_config the reference is the policy with its adapter disabled: pass "
                             "ref_model=None")

        for module in policy.frozen_modules():
            module.to(args.device)
        if not args.deepspeed:  # DeepSpeed places (and under ZeRO-3 partitions) the trained model itself
            policy.transformer.to(args.device)
        policy.transformer = prepare_transformer(policy.transformer, peft_config,
                                                 seed=derive_seed(args.seed, Stream.LORA_INIT))
        self._enable_gradient_checkpointing(args)
        self.reference_model: torch.nn.Module | None = None
        if ref_model is not None:
            reference = ref_model.transformer if isinstance(ref_model, FlowPolicy) else ref_model
            self.reference_model = reference.requires_grad_(False).eval().to(args.device, dtype=reference_dtype)
        elif needs_reference and not is_lora(policy.transformer):
            self.reference_model = frozen_copy(policy.transformer, reference_dtype).to(args.device)
        elif reference_dtype is not None:
            raise ValueError(f"{type(args).__name__}.reference_dtype: with LoRA the reference is the policy with "
                             "its adapter disabled (no copy to cast). Fix: leave reference_dtype='float32'.")
        for module in (policy.transformer, self.reference_model):
            if module is not None:
                set_attention_backend(module, args.attention_backend)
        if args.compile_repeated_blocks:
            compile_repeated_blocks(policy.transformer)

        super().__init__(model=policy.transformer, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, callbacks=callbacks,
                         optimizers=optimizers)
        self.model_accepts_loss_kwargs = False
        self.add_callback(TrainerCounters())
        self.ema: EMAModel | None = None
        if args.use_ema:
            self.add_callback(_EMACallback(self))
        self.resume_checkpoint: str | None = None
        self._metrics: dict[str, defaultdict[str, list[float]]] = {"train": defaultdict(list),
                                                                   "eval": defaultdict(list)}
        self._micro_step_owner, self._micro_index = -1, -1
        self._loss_finite = torch.ones((), dtype=torch.bool, device=args.device)
        self._hooked_optimizer = None

    # --- construction checks ----------------------------------------------------------------------
    @classmethod
    def check_args(cls, args: Any) -> BaseConfig:
        """`args` if it is a `config_class`, else a `TypeError` naming the class expected."""
        if not isinstance(args, cls.config_class):
            raise TypeError(f"args must be a {cls.config_class.__name__}, got {type(args).__name__}")
        return args

    def image_sizes(self, args: BaseConfig) -> list[tuple[str, int, int]]:
        """`(the config fields that set it, height, width)` of every image size the run uses, checked against the
        model at construction: the base returns `args.image_size` (the flow-matching trainer its buckets)."""
        names = [name for name in ("height", "width") if getattr(args, name) is not None]
        names = names if len(names) == 2 else ["resolution", *names]
        return [(", ".join(f"{name}={getattr(args, name)!r}" for name in names), *args.image_size)]

    def check_dataset(self, name: str, dataset: Any) -> None:
        """Refuse, at construction and with the fix named, what is not a map-style dataset of mapping rows with
        [`required_columns`] (checked against the first row), and image columns of a type no trainer reads."""
        if isinstance(dataset, Mapping) and dataset and all(_is_map_style(value) for value in dataset.values()):
            raise TypeError(f"{name} is a {type(dataset).__name__} of splits {sorted(dataset)}; pass one split, "
                            f"e.g. {name}=dataset[{next(iter(dataset))!r}]")
        if not _is_map_style(dataset):
            raise TypeError(f"{name} must be a map-style dataset with len() and indexing (a datasets.Dataset, a list "
                            f"of dicts, a torch Dataset); got {type(dataset).__name__}")
        if len(dataset) == 0:
            raise ValueError(f"{name} is empty")
        first = None
        for index in range(len(dataset)):  # image datasets give None for an unreadable image: take the next row
            first = dataset[index]
            if first is not None:
                break
        if first is None:
            raise ValueError(f"{name}: no row could be read (every image is unreadable)")
        if not isinstance(first, Mapping):
            hint = ("; for a list of prompts pass [{'prompt': p} for p in prompts]" if isinstance(first, str)
                    else "")
            raise TypeError(f"{name} rows must be mappings with the columns {list(self.required_columns)}; the first "
                            f"row is a {type(first).__name__}: {first!r:.80}{hint}")
        missing = [column for column in self.required_columns if column not in first]
        if missing:
            raise ValueError(f"{name} lacks the column(s) {missing} that {type(self).__name__} reads; its first row "
                             f"has {sorted(first)}. Rename the columns (datasets: `rename_column`), e.g. a text "
                             "column to 'prompt'")
        for column in self.image_columns:
            self._check_image_value(name, column, first[column])

    def _check_image_value(self, name: str, column: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            channels = self.policy.num_latent_channels
            if value.ndim != 3 or value.shape[0] != channels:
                raise ValueError(f"{name} column {column!r}: a torch.Tensor is taken as precomputed latents "
                                 f"[C, h, w] with C = {channels} (this model's latent channels); got shape "
                                 f"{tuple(value.shape)}. Pass images as paths, PIL images or numpy arrays")
            return
        if isinstance(value, np.ndarray) and (value.ndim not in (2, 3) or value.ndim == 3 and value.shape[2] not in
                                              (1, 3, 4)):
            raise ValueError(f"{name} column {column!r}: an image array must be [H, W] or [H, W, C] with C in "
                             f"(1, 3, 4); got shape {value.shape}")
        if not isinstance(value, (str, os.PathLike, bytes, PIL.Image.Image, np.ndarray, Mapping)):
            raise TypeError(f"{name} column {column!r} holds a {type(value).__name__}; images must be paths, PIL "
                            "images, numpy arrays, encoded bytes, {'bytes'|'path'} dicts or precomputed latents "
                            "(torch.Tensor [C, h, w])")

    def _enable_gradient_checkpointing(self, args: BaseConfig) -> None:
        """The config's `gradient_checkpointing` / `activation_checkpointing` flag, the same in every trainer: the
        diffusers call on the transformer, then the flags cleared (the `Trainer` would call the transformers method
        name, which diffusers models lack)."""
        if not args.activation_checkpointing:
            return
        if args.activation_checkpointing_kwargs:
            raise ValueError(f"{type(args).__name__}.activation_checkpointing_kwargs="
                             f"{args.activation_checkpointing_kwargs!r}: diffusers' enable_gradient_checkpointing "
                             "takes no such options. Fix: leave it unset.")
        base_transformer(self.policy.transformer).enable_gradient_checkpointing()
        args.activation_checkpointing = args.gradient_checkpointing = False

    # --- the reference, seeds, micro-batches ------------------------------------------------------
    @contextmanager
    def reference_transformer(self) -> Iterator[torch.nn.Module]:
        """The module that predicts with the reference weights, for `predict_velocity(..., transformer=...)`
        (inside `torch.no_grad()`): `ref_model`, a frozen copy (full fine-tuning), or the adapter disabled (LoRA).
        Inside the block the mixed-precision autocast of `bf16`/`fp16` is on, as it is in the policy's forward (the
        `Trainer` wraps only the trained model's forward in it), so the reference computes as the policy does."""
        with reference_transformer(self.policy.transformer, self.reference_model) as module, \
                self.accelerator.autocast():
            yield module

    def generator(self, stream: Stream, *keys: int) -> torch.Generator:
        """A CPU generator seeded by `derive_seed(args.seed, stream, *keys)` (see `rlhf_image.seeding`)."""
        return seeded_generator(self.args.seed, stream, *keys)

    @property
    def micro_batch_index(self) -> int:
        """Index, within the current optimizer step, of the micro-batch being trained (0 to
        `gradient_accumulation_steps - 1`; 0 outside `training_step`)."""
        return max(self._micro_index, 0)

    @property
    def global_micro_batch(self) -> int:
        """Number of the micro-batch being trained over the whole run and all processes,
        `(global_step * gradient_accumulation_steps + micro_batch_index) * world_size + process_index`: a function of
        where training is, not of how it got there (so resume is exact, and 2 processes x 1 micro-batch draw what
        1 process x 2 accumulated micro-batches draws)."""
        args = self.args
        # 0 when the loss is computed outside `training_step` (a direct `compute_loss` call)
        step = self.state.global_step * args.gradient_accumulation_steps + max(self._micro_index, 0)
        return step * args.world_size + args.process_index

    def training_step(self, model: torch.nn.Module, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        if self.state.global_step != self._micro_step_owner:
            self._micro_step_owner, self._micro_index = self.state.global_step, 0
        else:
            self._micro_index += 1
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._loss_finite = self._loss_finite & torch.isfinite(loss).to(self._loss_finite.device)
        return loss

    # --- the non-finite guard ---------------------------------------------------------------------
    def create_optimizer(self, model: torch.nn.Module | None = None):
        optimizer = super().create_optimizer(model)
        if optimizer is not self._hooked_optimizer:
            optimizer.register_step_pre_hook(self._skip_nonfinite_step)
            self._hooked_optimizer = optimizer
        return optimizer

    def _skip_nonfinite_step(self, optimizer, args, kwargs) -> None:
        """Optimizer pre-step hook: if the loss or any gradient is non-finite, drop every gradient (torch
        optimizers skip parameters without one: no update, no moment change) and count the step."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        device = grads[0].device if grads else self._loss_finite.device
        # one device sync for the loss flag of every micro-batch of the step and all gradients
        finite = bool(torch.stack([self._loss_finite.to(device), *(torch.isfinite(g).all() for g in grads)]).all())
        self._loss_finite = torch.ones_like(self._loss_finite)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank must take the same decision (ZeRO ranks each see a shard of the gradients).
            flag = torch.tensor(0.0 if finite else 1.0, device=self.args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            finite = flag.item() == 0
        self.record_metrics({"nonfinite/skipped": 0.0 if finite else 1.0})
        counters = self.counters
        if finite:
            counters["nonfinite/consecutive"] = 0
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        counters["nonfinite/skipped_steps_total"] = counters.get("nonfinite/skipped_steps_total", 0) + 1
        counters["nonfinite/consecutive"] = consecutive = counters.get("nonfinite/consecutive", 0) + 1
        logger.warning("non-finite loss or gradient at step %d: optimizer step skipped (%d in a row)",
                       self.state.global_step + 1, consecutive)
        limit = self.args.max_consecutive_nonfinite
        if consecutive >= limit:
            raise RuntimeError(
                f"{consecutive} optimizer steps in a row had a non-finite loss or gradient "
                f"({type(self.args).__name__}.max_consecutive_nonfinite={limit}); training stopped at step "
                f"{self.state.global_step + 1}. Lower the learning rate, check the data or rewards, or use float32.")

    # --- counters and metrics ---------------------------------------------------------------------
    @property
    def counters(self) -> dict[str, float]:
        """Running counts, logged at every training log and restored on resume (see [`TrainerCounters`])."""
        for callback in self.callback_handler.callbacks:  # a resume replaces the callback object
            if isinstance(callback, TrainerCounters):
                return callback.counts
        raise RuntimeError("the trainer's TrainerCounters callback was removed")

    def record_metrics(self, values: Mapping[str, float], mode: str = "train") -> None:
        """Record per-micro-batch values, reduced at the next log by `metrics.reduce_metrics` (mean; `/min`, `/max`
        and `_total` keys by min, max and last value) and logged (`eval_`-prefixed in `"eval"` mode)."""
        for key, value in values.items():
            self._metrics[mode][key].append(float(value))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "train_runtime" not in logs:  # not the summary at the end of training
            mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
            metrics = reduce_metrics(self._metrics[mode])
            self._metrics[mode].clear()
            if mode == "eval":
                metrics = {f"eval_{key}": value for key, value in metrics.items()}
            else:
                metrics.update({key: float(value) for key, value in self.counters.items()})
            logs.update(metrics)  # in place, so that `evaluate()` returns them too
        super().log(logs, start_time)

    # --- resume and saving ------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None,
              ignore_keys_for_eval: list[str] | None = None, **kwargs: Any):
        """`transformers.Trainer.train`; `resume_from_checkpoint=True` resumes from the newest complete
        `checkpoint-*` in `output_dir` (an incomplete one is skipped with a warning), and the checkpoint resumed from
        is kept in `self.resume_checkpoint` for subclasses. A checkpoint with a missing or unreadable file raises a
        [`~rlhf_image.checkpoints.CheckpointError`] naming the file."""
        required = self.checkpoint_files()
        if resume_from_checkpoint is True:
            resume_from_checkpoint = latest_complete_checkpoint(self.args.output_dir, required)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if resume_from_checkpoint:
            check_checkpoint(resume_from_checkpoint, required)
        self.resume_checkpoint = resume_from_checkpoint or None
        return super().train(resume_from_checkpoint=self.resume_checkpoint, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

    def checkpoint_files(self) -> list[str]:
        """Files every complete checkpoint of this trainer holds (relative paths); a method that writes its own
        state file in [`save_extra_state`] adds it, so that a checkpoint without it is never resumed from."""
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        # Under ZeRO-3 each rank writes its own EMA shard (see `_averaged_file`).
        return [TRAINER_STATE, *([EMA_FILE] if self.args.use_ema and not zero3 else [])]

    def _get_output_dir(self, trial) -> str:
        return getattr(self, "_staging_root", None) or super()._get_output_dir(trial)

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """The Trainer's checkpoint, written into a staging folder and renamed to `checkpoint-N` once complete (see
        `rlhf_image.checkpoints`): a process killed while saving leaves no `checkpoint-N` behind."""
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged, final = staging_path(run_dir, name), os.path.join(run_dir, name)
        if self.args.should_save and os.path.isdir(staged):
            shutil.rmtree(staged)  # what a killed save left
        self.accelerator.wait_for_everyone()
        self._staging_root = os.path.dirname(staged)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        self.accelerator.wait_for_everyone()  # every rank has written its part (DeepSpeed shards)
        if self.args.should_save:
            publish(staged, final)
            if self.state.best_model_checkpoint and self.state.best_model_checkpoint.startswith(staged):
                self.state.best_model_checkpoint = final + self.state.best_model_checkpoint[len(staged):]
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # Inside every checkpoint, before its trainer_state.json (the mark of a complete checkpoint) is written.
        super()._save_optimizer_and_scheduler(output_dir)
        self.save_extra_state(output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        # Called on every resume, with or without DeepSpeed, once the model and optimizer are in place.
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self.load_extra_state(checkpoint)

    def save_extra_state(self, checkpoint_dir: str) -> None:
        """Write the trainer's own state that an exact resume needs (weights in safetensors, e.g. an old policy)
        into `checkpoint_dir`. Called on every process at each checkpoint (write on `args.should_save`, unless each
        process owns a shard); [`load_extra_state`] reads it back. The base writes the EMA; a subclass that adds
        state calls `super()` and lists its files in [`checkpoint_files`]."""
        if self.ema is not None:
            self.save_averaged_weights(self.ema, EMA_FILE, checkpoint_dir)

    def load_extra_state(self, checkpoint_dir: str) -> None:
        """Read back what [`save_extra_state`] wrote, on every process, when resuming from `checkpoint_dir` (the
        EMA is read when it is built, at the start of training)."""

    # --- EMA and other averaged weights -------------------------------------------------------------
    def _averaged_file(self, averaged: EMAModel, name: str) -> tuple[str, bool]:
        """The file of `averaged`'s weights (`name`, e.g. `ema.safetensors`) this rank writes in a checkpoint, and
        whether this rank writes it: under ZeRO-3 every rank writes its partitions to its own file."""
        if any(is_zero3_partitioned(p) for p in averaged.params.values()):
            stem = name.removesuffix(".safetensors")
            return f"{stem}-rank{self.args.process_index:05d}-of-{self.args.world_size:05d}.safetensors", True
        return name, self.args.should_save

    def save_averaged_weights(self, averaged: EMAModel, name: str, checkpoint_dir: str) -> None:
        """Write `averaged` (an [`~rlhf_image.ema.EMAModel`]: the EMA, an old policy) into `checkpoint_dir` as
        `name` (per-rank files under ZeRO-3)."""
        file, writes = self._averaged_file(averaged, name)
        if writes:
            os.makedirs(checkpoint_dir, exist_ok=True)
            safetensors.torch.save_file(averaged.state_dict(), os.path.join(checkpoint_dir, file))

    def load_averaged_weights(self, averaged: EMAModel, name: str, checkpoint_dir: str) -> None:
        """Restore `averaged` from what [`save_averaged_weights`] wrote into `checkpoint_dir`."""
        path = os.path.join(checkpoint_dir, self._averaged_file(averaged, name)[0])
        if not os.path.isfile(path):  # a ZeRO-3 shard (the other files are required by `checkpoint_files`)
            raise CheckpointError(f"{checkpoint_dir} has no {os.path.basename(path)}: this rank's weights cannot be "
                                  "restored. Resume with the world size it was saved with")
        device = str(local_tensor(next(iter(averaged.params.values()))).device)
        averaged.load_state_dict(safetensors.torch.load_file(path, device=device))

    def _setup_ema(self) -> None:
        """Build [`ema`] from the trained weights (restored from `resume_checkpoint` when resuming)."""
        args = self.args
        named = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        self.ema = EMAModel(named, args.ema_decay, warmup=args.ema_warmup, update_every=args.ema_update_every)
        if self.resume_checkpoint is not None:
            self.load_averaged_weights(self.ema, EMA_FILE, self.resume_checkpoint)

    def saved_weights(self):
        """Context in which the weights are those to evaluate and save: the EMA, when enabled (`use_ema`), swapped
        into the trained parameters and swapped back on exit; else the trained weights as they are."""
        return self.ema.applied() if self.ema is not None else nullcontext()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints (`_internal_call`) keep the Trainer's layout, which resumes. A user's call writes what stock
        diffusers loads (a LoRA file or a `transformer/` folder, see `rlhf_image.model_io`) and a model card whose
        loading code runs as written. Under DeepSpeed every rank must call it (ZeRO-3 gathers the weights)."""
        if _internal_call:
            return super().save_model(output_dir, _internal_call=True)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        with self.saved_weights():  # write inside: the state dict may alias swapped-in weights
            state_dict = self.accelerator.get_state_dict(self.model_wrapped) if self.is_deepspeed_enabled else None
            if self.args.should_save:
                save_trained(self.model, output_dir, state_dict)
        if self.args.should_save:
            write_model_card(output_dir, method=self.method_name, base_model=self.policy.base_model_name_or_path,
                             transformer=self.model, details=self.model_card_details(),
                             metrics=self.model_card_metrics())

    def model_card_details(self) -> dict[str, object]:
        """Training facts for the model card; subclasses add their method's settings."""
        args = self.args
        weights = "LoRA" if is_lora(self.model) else "full"
        if is_lora(self.model):
            config = self.model.peft_config[self.model.active_adapter]
            weights = f"LoRA (rank {config.r}, alpha {config.lora_alpha})"
        ema = "off"
        if args.use_ema:
            ema = f"decay {args.ema_decay}" + (" with warm-up" if args.ema_warmup else "")
            ema += f" every {args.ema_update_every} steps" if args.ema_update_every > 1 else ""
            ema += " (the saved weights)"
        return {"steps": self.state.global_step, "weights": weights, "learning rate": args.learning_rate,
                "seed": args.seed, "EMA": ema}

    def model_card_metrics(self) -> dict[str, float]:
        """Final metrics for the model card: the last logged value of each of [`card_metric_keys`]."""
        out: dict[str, float] = {}
        for entry in reversed(self.state.log_history):
            for key, value in entry.items():
                if key not in out and self.card_metric(key) and isinstance(value, (int, float)):
                    out[key] = float(value)
        return dict(sorted(out.items()))

    def card_metric(self, key: str) -> bool:
        """Whether the logged `key` goes into the model card's final metrics; subclasses choose."""
        return key in ("loss", "eval_loss")


def describe_sizes(sizes: Sequence[tuple[int, int]]) -> str:
    """`"512x512, 384x672"`: image sizes `(height, width)` for the model card."""
    return ", ".join(f"{h}x{w}" for h, w in sizes)
