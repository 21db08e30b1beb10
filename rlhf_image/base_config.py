"""The configuration every trainer of the library shares ([`BaseConfig`]), the part shared by the trainers that
train on images ([`ImageTrainingConfig`]), and the one validation of numeric fields.

Every numeric field of a config, its own and the ones it inherits from `transformers.TrainingArguments`, has an
entry in a table ([`BaseConfig.numeric_fields`], extended by each subclass): its type (integer or number), its
accepted range and whether `None` is allowed. [`BaseConfig.__post_init__`] checks them all before anything else
runs, so `num_generations="4"`, `learning_rate=-1e-3` or `guidance_scale=nan` fail at construction with the
field's name and the accepted range (not later, inside `train()`, or as a bare `TypeError`). Checks that involve
several fields (divisibility, exclusive options) live in each config's `validate()`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers import TrainingArguments

# Image sizes a config accepts before the model is known (the model's own rule, multiples of its pixel unit, is
# checked by the trainer with `FlowPolicy.check_image_size`). No diffusers flow-matching text-to-image model
# trains beyond 4096 px a side (FLUX.1, SD3 and Ovis-Image stop at 2048), and their aspect-ratio buckets stay
# within 1:4 to 4:1 (the Ovis-Image report: 0.25 to 4): the limits give twice that room. Past them a size is
# a typo (`32x4000`), and resizing an ordinary image to cover such a bucket would crop away almost all of it.
MAX_IMAGE_SIDE = 8192
MAX_ASPECT_RATIO = 8.0
MAX_SEED = 2**32 - 1  # numpy's global seed (set by transformers' `set_seed`) must be below 2**32

# diffusers' attention backends (`diffusers.models.attention_dispatch.AttentionBackendName`) a config accepts: the
# ones installed as Python packages (the `*_hub` backends download kernels at run time and are left out). Only the
# first two run on the CPU; the others need a CUDA GPU (and their package: flash-attn, sageattention, xformers).
CPU_ATTENTION_BACKENDS = ("native", "_native_math")
ATTENTION_BACKENDS = (*CPU_ATTENTION_BACKENDS, "_native_flash", "_native_efficient", "_native_cudnn", "flash",
                      "flash_varlen", "_flash_3", "_flash_varlen_3", "flex", "sage", "sage_varlen", "xformers")


@dataclass(frozen=True)
class Bound:
    """The accepted values of one numeric config field.

    Args:
        integer (`bool`): an integer (`bool` is not one), else any real number (an integer is one); never NaN or
            infinite.
        low, high (`float`, *optional*): bounds; `None` leaves that side open.
        low_open, high_open (`bool`, defaults to `False`): exclude the bound itself.
        optional (`bool`, defaults to `False`): `None` is accepted.
        each (`bool`, defaults to `False`): the field is a list and every element must satisfy the bound.
        hint (`str`, *optional*): a typical value, shown in the error.
    """

    integer: bool
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    each: bool = False
    hint: str = ""

    def describe(self) -> str:
        """The accepted values in words, e.g. `"an integer >= 2"` or `"a finite number in (0, 1]"`."""
        kind = "an integer" if self.integer else "a finite number"
        if self.low is not None and self.high is not None:
            opening, closing = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"{kind} in {opening}{self.low:g}, {self.high:g}{closing}"
        elif self.low is not None:
            text = f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            text = f"{kind} {'<' if self.high_open else '<='} {self.high:g}"
        else:
            text = kind
        if self.each:
            text = f"a list of {text.replace('an integer', 'integers').replace('a finite number', 'finite numbers')}"
        return f"{text} or None" if self.optional else text

    def problem(self, value: Any) -> str | None:
        """Why `value` is refused, or `None` if it is accepted."""
        if value is None:
            return None if self.optional else "is required"
        if self.each:
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                return f"got {type(value).__name__}, not a list"
            for index, item in enumerate(value):
                problem = self._problem_one(item)
                if problem is not None:
                    return f"element {index} ({item!r}) {problem}"
            return None
        return self._problem_one(value)

    def _problem_one(self, value: Any) -> str | None:
        wanted = numbers.Integral if self.integer else numbers.Real
        if isinstance(value, bool) or not isinstance(value, wanted):
            return f"got {type(value).__name__}"
        if not math.isfinite(value):
            return "is not finite"
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return "is out of range"
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return "is out of range"
        return None


def integer(low: float | None = None, high: float | None = None, **kwargs: Any) -> Bound:
    """A [`Bound`] for an integer field."""
    return Bound(True, low, high, **kwargs)


def number(low: float | None = None, high: float | None = None, **kwargs: Any) -> Bound:
    """A [`Bound`] for a real-valued field."""
    return Bound(False, low, high, **kwargs)


def check_image_shape(height: int, width: int, what: str) -> str | None:
    """Why a `height x width` image size is refused before the model is known, or `None` (see the module's
    `MAX_IMAGE_SIDE` and `MAX_ASPECT_RATIO`)."""
    if max(height, width) > MAX_IMAGE_SIDE:
        return f"{what} {height}x{width} px exceeds {MAX_IMAGE_SIDE} px a side"
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        return (f"{what} {height}x{width} px has an aspect ratio of {max(height, width) / min(height, width):.3g}, "
                f"more than {MAX_ASPECT_RATIO:g}:1")
    return None


@dataclass
class BaseConfig(TrainingArguments):
    r"""
    Configuration shared by every trainer of the library ([`~rlhf_image.BaseTrainer`]); each method's config
    subclasses it. Every [`~transformers.TrainingArguments`] field keeps its meaning (`learning_rate`, `deepspeed`,
    `bf16`, `save_steps`, `report_to`, ...), with these library-wide rules:

    - `gradient_checkpointing` (or its new name `activation_checkpointing`) is one flag that means the same in every
      trainer: the trainer calls diffusers' `enable_gradient_checkpointing()` on the transformer (diffusers models
      lack the transformers method the `Trainer` would call) and then clears both flags on this config, so the
      `Trainer` does not try again.
    - `restore_callback_states_from_checkpoint` defaults to `True`: the trainers keep the counts a resume must
      restore (skipped non-finite steps, unscored rollouts, ...) in a stateful callback, saved in
      `trainer_state.json` of each checkpoint.
    - `remove_unused_columns` must stay `False`: the trainers read their dataset columns themselves.

    Parameters:
        > Image size

        resolution (`int`, *optional*, defaults to `512`):
            Height and width of the images in pixels, unless `height`/`width` are set.
        height (`int`, *optional*):
            Image height in pixels (defaults to `resolution`); with `width`, non-square images.
        width (`int`, *optional*):
            Image width in pixels (defaults to `resolution`).

        > GPU fast paths (see also `bf16`, `gradient_checkpointing` and `optim="adamw_torch_fused"`)

        attention_backend (`str`, *optional*, defaults to `"native"`):
            diffusers' attention backend for the trained transformer (and its frozen reference), set with
            `ModelMixin.set_attention_backend`: `"native"` (PyTorch's `scaled_dot_product_attention`, which picks
            its own kernel), `"_native_math"`, or a GPU kernel (`"_native_flash"`, `"_native_cudnn"`, `"flash"`
            (flash-attn 2), `"_flash_3"` (flash-attn 3), `"sage"`, `"xformers"`, ...). A GPU backend on a machine
            without CUDA (or with `use_cpu`) fails at construction.
        compile_repeated_blocks (`bool`, *optional*, defaults to `False`):
            Regional compilation: `torch.compile` each repeated transformer block (diffusers'
            `ModelMixin.compile_repeated_blocks` for models that declare `_repeated_blocks`, otherwise every block of
            the model's top-level `ModuleList`s), so one compiled graph serves all blocks of a kind and compilation
            takes seconds rather than minutes. The frozen reference stays eager.

        > EMA of the trained weights

        use_ema (`bool`, *optional*, defaults to `False`):
            Keep an exponential moving average of the trained weights (the adapter with LoRA), in float32: it is
            saved in every checkpoint (an exact resume restores it), evaluation uses it (the flow-matching eval loss,
            the online methods' evaluation rollouts) and it is what the final saved model holds.
        ema_decay (`float`, *optional*, defaults to `0.9999`):
            Decay per EMA update, in [0, 1): `ema = decay * ema + (1 - decay) * weights`. Flow-GRPO uses 0.9.
        ema_warmup (`bool`, *optional*, defaults to `False`):
            Decay `min(ema_decay, (1 + t) / (10 + t))` after optimizer step `t` (diffusers' and Flow-GRPO's
            schedule): for short runs, where a high constant decay keeps the EMA near the initial weights.
        ema_update_every (`int`, *optional*, defaults to `1`):
            Update the EMA after every this many optimizer steps (Flow-GRPO: 8, with decay 0.9 and the warm-up).

        > Safety

        max_consecutive_nonfinite (`int`, *optional*, defaults to `3`):
            A non-finite loss or gradient skips the optimizer step (no update, no optimizer-state change); this
            many skipped steps in a row stop training with an error.
    """

    resolution: int = field(default=512, metadata={"help": "Height and width of the images, in pixels."})
    height: int | None = field(default=None, metadata={"help": "Image height in pixels (defaults to resolution)."})
    width: int | None = field(default=None, metadata={"help": "Image width in pixels (defaults to resolution)."})
    attention_backend: str = field(
        default="native", metadata={"help": "diffusers attention backend: 'native' (PyTorch SDPA), '_native_math', "
                                            "or a CUDA one ('_native_flash', '_native_cudnn', 'flash', '_flash_3', "
                                            "'sage', 'xformers', ...)."}
    )
    compile_repeated_blocks: bool = field(
        default=False, metadata={"help": "torch.compile each repeated transformer block (regional compilation)."}
    )
    use_ema: bool = field(
        default=False,
        metadata={"help": "Keep an EMA of the trained weights (saved with checkpoints, used for evaluation and the "
                          "final model)."})
    ema_decay: float = field(default=0.9999, metadata={"help": "EMA decay per update, in [0, 1)."})
    ema_warmup: bool = field(
        default=False, metadata={"help": "Decay min(ema_decay, (1 + t) / (10 + t)) after step t (short runs)."})
    ema_update_every: int = field(
        default=1, metadata={"help": "Update the EMA after every this many optimizer steps (Flow-GRPO: 8)."})
    max_consecutive_nonfinite: int = field(
        default=3, metadata={"help": "Stop with an error after this many skipped (non-finite) steps in a row."}
    )
    # TrainingArguments defaults that differ
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the trainers read their dataset columns themselves."}
    )
    restore_callback_states_from_checkpoint: bool = field(
        default=True,
        metadata={"help": "Restore the trainer's counters (kept in a stateful callback) when resuming."},
    )

    # The accepted values of every numeric field (see `Bound`); subclasses add their own fields' entries.
    numeric_fields: ClassVar[dict[str, Bound]] = {
        # TrainingArguments
        "per_device_train_batch_size": integer(1),
        "per_device_eval_batch_size": integer(1),
        "gradient_accumulation_steps": integer(1),
        "eval_accumulation_steps": integer(1, optional=True),
        "num_train_epochs": number(0, low_open=True),
        "max_steps": integer(-1, hint="-1 trains num_train_epochs"),
        "learning_rate": number(0, low_open=True, hint="e.g. 1e-4"),
        "warmup_steps": number(0),
        "weight_decay": number(0),
        "adam_beta1": number(0, 1, high_open=True),
        "adam_beta2": number(0, 1, high_open=True),
        "adam_epsilon": number(0, low_open=True),
        "max_grad_norm": number(0, hint="0 disables clipping"),
        "label_smoothing_factor": number(0, 1),
        "neftune_noise_alpha": number(0, optional=True),
        "torch_empty_cache_steps": integer(1, optional=True),
        "logging_steps": number(0, low_open=True),
        "eval_steps": number(0, low_open=True, optional=True),
        "eval_delay": number(0),
        "save_steps": number(0, low_open=True),
        "save_total_limit": integer(0, optional=True),
        "seed": integer(0, MAX_SEED),
        "data_seed": integer(0, MAX_SEED, optional=True),
        "dataloader_num_workers": integer(0),
        "dataloader_prefetch_factor": integer(1, optional=True),
        "ddp_bucket_cap_mb": integer(1, optional=True),
        "ddp_timeout": integer(1),
        "local_rank": integer(-1),
        # BaseConfig
        "resolution": integer(1, MAX_IMAGE_SIDE, hint="e.g. 512"),
        "height": integer(1, MAX_IMAGE_SIDE, optional=True),
        "width": integer(1, MAX_IMAGE_SIDE, optional=True),
        "max_consecutive_nonfinite": integer(1, hint="e.g. 3"),
        "ema_decay": number(0, 1, high_open=True, hint="e.g. 0.9999"),
        "ema_update_every": integer(1, hint="e.g. 1, or 8 as Flow-GRPO"),
    }

    def __post_init__(self):
        # Before anything reads them: a string or NaN must fail here with the field named.
        self.check_numeric_fields()
        super().__post_init__()
        self.validate()

    @classmethod
    def all_numeric_fields(cls) -> dict[str, Bound]:
        """The numeric-field table of this config class: its own entries and every base class's."""
        table: dict[str, Bound] = {}
        for klass in reversed(cls.__mro__):
            table.update(klass.__dict__.get("numeric_fields", {}))
        return table

    def check_numeric_fields(self) -> None:
        """Check every numeric field against [`all_numeric_fields`] (type, finiteness, range)."""
        for name, bound in self.all_numeric_fields().items():
            value = getattr(self, name)
            problem = bound.problem(value)
            if problem is not None:
                hint = f" ({bound.hint})" if bound.hint else ""
                self.fail(name, f"{problem}; accepted: {bound.describe()}", f"set {name} to {bound.describe()}{hint}")

    def fail(self, name: str, problem: str, fix: str) -> None:
        """Raise the library's config error: `ValueError("<Config>.<name>=<value>: <problem>. Fix: <fix>.")`."""
        raise ValueError(f"{type(self).__name__}.{name}={getattr(self, name)!r}: {problem}. Fix: {fix}.")

    def validate(self) -> None:
        """Checks involving several fields, after `TrainingArguments.__post_init__`; subclasses extend it."""
        problem = check_image_shape(*self.image_size, "the image size")
        if problem is not None:
            name = "height" if self.height is not None else "resolution"
            self.fail(name, problem, "use an image size the model is trained for")
        if self.attention_backend not in ATTENTION_BACKENDS:
            self.fail("attention_backend", f"unknown backend, expected one of {ATTENTION_BACKENDS}",
                      "use 'native' (PyTorch SDPA) or a backend listed")
        if self.attention_backend not in CPU_ATTENTION_BACKENDS and (self.use_cpu or not torch.cuda.is_available()):
            self.fail("attention_backend", "this backend runs only on a CUDA GPU and none is in use",
                      f"use one of {CPU_ATTENTION_BACKENDS} on the CPU")
        if self.remove_unused_columns:
            self.fail("remove_unused_columns", "the trainer reads its dataset columns itself and the Trainer would "
                      "drop them", "set remove_unused_columns=False")

    @property
    def image_size(self) -> tuple[int, int]:
        """`(height, width)` in pixels: `height`/`width`, each defaulting to `resolution`."""
        return (self.height or self.resolution, self.width or self.resolution)


TIMESTEP_SAMPLINGS = ("logit_normal", "uniform")
TIMESTEP_SHIFTS = ("resolution", "static", "none")


@dataclass
class ImageTrainingConfig(BaseConfig):
    r"""
    [`BaseConfig`] plus what the trainers that train on images share (flow matching, DPO): the training timestep
    distribution, classifier-free-guidance dropout, and the frozen encoders with their caches. Such a trainer
    encodes its images with the VAE and its prompts with the text encoders (both frozen), noises the latents
    `x_t = (1 - s) x0 + s eps` at drawn noise levels `s`, and regresses the transformer's velocity on `eps - x0`.

    Parameters:
        > Timesteps (Esser et al. 2024, "Scaling Rectified Flow Transformers", SD3)

        timestep_sampling (`str`, *optional*, defaults to `"logit_normal"`):
            `"logit_normal"` (`s = sigmoid(logit_mean + logit_std z)`, SD3, Ovis-Image) or `"uniform"`, drawn with
            diffusers' `compute_density_for_timestep_sampling`.
        logit_mean (`float`, *optional*, defaults to `0.0`):
            Mean `m` of the logit-normal distribution.
        logit_std (`float`, *optional*, defaults to `1.0`):
            Standard deviation `n` of the logit-normal distribution.
        timestep_shift (`str`, *optional*, defaults to `"resolution"`):
            `"resolution"` shifts the drawn sigmas by `mu = calculate_shift(image_seq_len)` from the model's scheduler
            config, with the scheduler's own `time_shift_type` (exponential or linear), as at inference; `"static"`
            by the scheduler's static `shift`; `"none"` leaves them (see
            [`~rlhf_image.schedule.sample_training_sigmas`]).

        > Prompts

        cfg_dropout_prob (`float`, *optional*, defaults to `0.1`):
            Probability of training a row on the unconditional (negative) prompt instead of its prompt, so the model
            keeps the unconditional velocity that classifier-free guidance needs. `0` disables it.

        > Frozen encoders

        encode_batch_size (`int`, *optional*):
            Rows per VAE / text-encoder call, padded to exactly this many so an item's encoding never depends on its
            batch companions (a cached value equals a recomputed one); defaults to `per_device_train_batch_size`.
        cache_latents (`bool`, *optional*, defaults to `False`):
            Cache the VAE's latents (after the first epoch the VAE is not called again).
        cache_text_embeddings (`bool`, *optional*, defaults to `False`):
            Cache the text encoders' outputs, keyed by prompt.
        cache_dir (`str`, *optional*):
            Keep the caches on disk there (safetensors, shared by processes and reused by later runs); in memory
            otherwise.
    """

    timestep_sampling: str = field(
        default="logit_normal", metadata={"help": "Training sigma distribution: 'logit_normal' or 'uniform'."}
    )
    logit_mean: float = field(default=0.0, metadata={"help": "Mean of the logit-normal sigma distribution."})
    logit_std: float = field(default=1.0, metadata={"help": "Standard deviation of the logit-normal distribution."})
    timestep_shift: str = field(
        default="resolution",
        metadata={"help": "'resolution': shift sigmas by mu = calculate_shift(image_seq_len) with the scheduler's "
                          "time_shift_type; 'static': by the scheduler's `shift`; 'none': no shift."},
    )
    cfg_dropout_prob: float = field(
        default=0.1, metadata={"help": "Probability of training a row on the unconditional prompt (for CFG)."}
    )
    encode_batch_size: int | None = field(
        default=None, metadata={"help": "Rows per VAE / text-encoder call, padded to exactly this many; defaults "
                                        "to per_device_train_batch_size."}
    )
    cache_latents: bool = field(default=False, metadata={"help": "Cache the frozen VAE's latents."})
    cache_text_embeddings: bool = field(
        default=False, metadata={"help": "Cache the frozen text encoders' outputs, keyed by prompt."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Keep the encoder caches on disk in this folder (default: in memory)."}
    )

    numeric_fields: ClassVar[dict[str, Bound]] = {
        "logit_mean": number(),
        "logit_std": number(0, low_open=True, hint="e.g. 1.0"),
        "cfg_dropout_prob": number(0, 1, high_open=True, hint="0 disables it"),
        "encode_batch_size": integer(1, optional=True),
    }

    def validate(self) -> None:
        super().validate()
        for name, allowed in (("timestep_sampling", TIMESTEP_SAMPLINGS), ("timestep_shift", TIMESTEP_SHIFTS)):
            if getattr(self, name) not in allowed:
                self.fail(name, f"unknown value, expected one of {allowed}", f"use one of {allowed}")
        if self.cache_dir is not None and not (self.cache_latents or self.cache_text_embeddings):
            self.fail("cache_dir", "set but nothing is cached",
                      "set cache_latents and/or cache_text_embeddings, or leave cache_dir unset")

    @property
    def encoder_batch_size(self) -> int:
        """Rows per frozen-encoder call: `encode_batch_size`, defaulting to `per_device_train_batch_size`."""
        return self.encode_batch_size or self.per_device_train_batch_size
