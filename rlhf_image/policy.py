"""`FlowPolicy`: one face over a diffusers flow-matching text-to-image model, and the registry of families.

A policy's latents are tensors `[B, C, h, w]` in the model's own latent layout, already normalised as the
transformer sees them (FLUX: VAE latents after shift and scale; FLUX.2: 2x2-patchified and batch-normed;
Qwen-Image: the single frame of its video VAE, mean/std normalised). The sampler, the SDE steps and every
trainer work on them without knowing the family. A family adapter implements two methods:

- `encode_prompt(prompts) -> Conditioning`: the text conditioning, exactly as the family's pipeline computes it,
  padded to one fixed length so that a sample's computation never depends on the other prompts of its batch;
- `forward(transformer, latents, sigma, cond) -> velocity`: one transformer call on latents `[B, C, h, w]` at noise
  levels `sigma` `[B]`, returning the velocity `eps - x0` in the same layout. Families whose transformer takes
  2x2-packed tokens use [`pack_latents`] / [`unpack_latents`] inside it.

and may override `guide` (the CFG combination), `inference_sigmas` (the schedule its pipeline passes to the
scheduler), `encode_negative_prompt`, `decode` / `encode_images` (VAEs other than `AutoencoderKL`) and
`frozen_modules`. `register_family(PipelineClass, PolicyClass)` makes `FlowPolicy.from_pipeline` and every trainer
accept the family's pipelines.
"""

from __future__ import annotations

import importlib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.utils.torch_utils import randn_tensor

from .families import BUILTIN_FAMILIES
from .schedule import inference_sigmas as flux_style_sigmas

# --- conditioning --------------------------------------------------------------------------------------------


@dataclass
class Conditioning:
    """Text conditioning for a batch: every tensor is batch-first, so `select`, `cat`, `to` and the Ray transfer
    of trajectories work the same for every family.

    Args:
        prompt_embeds (`torch.Tensor` of shape `[B, L, D]`): per-token text states.
        pooled_prompt_embeds (`torch.Tensor` of shape `[B, P]`, *optional*): pooled text embedding (FLUX.1, SD3).
        attention_mask (`torch.Tensor` of shape `[B, L]`, *optional*): 1 (or `True`) for real text tokens, 0 for
            padding (Qwen-Image, Z-Image, Lumina2, Chroma).
        text_ids (`torch.Tensor` of shape `[B, L, K]`, *optional*): text position ids (FLUX.2).
        extra (`dict[str, torch.Tensor]`, defaults to `{}`): any other per-sample tensors a family needs (several
            text states, for example), each of shape `[B, ...]`.
    """

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    text_ids: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor by name (`extra` entries as `extra.<name>`), in a fixed order."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out.update({f"extra.{k}": v for k, v in sorted(self.extra.items())})
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> Conditioning:
        """Inverse of [`tensors`]."""
        extra = {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}
        return cls(**{k: v for k, v in tensors.items() if not k.startswith("extra.")}, extra=extra)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Conditioning:
        return Conditioning.from_tensors({k: fn(v) for k, v in self.tensors().items()})

    def select(self, index: torch.Tensor | list[int] | slice) -> Conditioning:
        """The rows `index` of every tensor."""
        return self._map(lambda t: t[index])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """Move every tensor to `device`; `dtype` applies to floating-point tensors only (masks and ids keep theirs)."""
        return self._map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

    def detach(self) -> Conditioning:
        return self._map(lambda t: t.detach())

    def row(self, i: int) -> dict[str, torch.Tensor]:
        """Sample `i` as named tensors without the batch dimension (for caches); see [`stack`]."""
        return {k: v[i] for k, v in self.tensors().items()}

    @classmethod
    def stack(cls, rows: list[Mapping[str, torch.Tensor]]) -> Conditioning:
        """Inverse of [`row`] over a list of rows."""
        return cls.from_tensors({k: torch.stack([r[k] for r in rows]) for k in rows[0]})

    def layout(self) -> dict[str, tuple]:
        """The per-sample shape and dtype of every tensor: two conditionings concatenate iff their layouts match."""
        return {k: (tuple(v.shape[1:]), v.dtype) for k, v in self.tensors().items()}

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        """Concatenate along the batch. All items must have the same layout (see [`layout`])."""
        layout = items[0].layout()
        for item in items[1:]:
            if item.layout() != layout:
                raise ValueError(f"cannot concatenate conditionings of different layouts: {layout} vs {item.layout()}; "
                                 "a family adapter must pad every prompt to one fixed length")
        return Conditioning.from_tensors({k: torch.cat([c.tensors()[k] for c in items]) for k in layout})


def pad_to_length(cond: Conditioning, length: int) -> Conditioning:
    """Pad (with zeros, mask 0) or check the text length of `cond` to exactly `length` tokens; `cond` needs an
    `attention_mask` when it is padded."""
    current = cond.prompt_embeds.shape[1]
    if current > length:
        raise ValueError(f"text of {current} tokens is longer than the fixed length {length}")
    if current == length:
        return cond
    if cond.attention_mask is None:
        raise ValueError("padding text states needs an attention mask")

    def pad(t: torch.Tensor) -> torch.Tensor:
        shape = (t.shape[0], length - current, *t.shape[2:])
        return torch.cat([t, t.new_zeros(shape)], dim=1)

    return Conditioning(pad(cond.prompt_embeds), cond.pooled_prompt_embeds, pad(cond.attention_mask),
                        None if cond.text_ids is None else pad(cond.text_ids), dict(cond.extra))


# --- packing (a helper for the families whose transformer takes 2x2 patches as tokens) ------------------------


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """`[B, C, h, w]` -> `[B, (h/2)(w/2), 4C]`: 2x2 patches as tokens (FLUX.1, Ovis-Image, Qwen-Image, Chroma)."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of [`pack_latents`] for latent size `height x width`: `[B, L, 4C]` -> `[B, C, h, w]`."""
    b, _, channels = tokens.shape
    tokens = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return tokens.reshape(b, channels // 4, height, width)


def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """RoPE positions `(0, row, col)` of the packed tokens of an `height x width` latent, `[L, 3]` (FLUX.1)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


# --- scheduler checks ----------------------------------------------------------------------------------------

# Scheduler options whose effect is not a change of the sigma schedule: refused everywhere, with this one message.
UNSUPPORTED_SCHEDULER_OPTIONS = {
    "stochastic_sampling": "re-noises inside `scheduler.step`; rlhf-image's sampler takes its own steps "
                           "(use `sde_type` for stochastic sampling)",
    "invert_sigmas": "runs sigma from 0 to 1; rlhf-image's steps assume sigma 1 = noise and 0 = data",
}


def flow_matching_scheduler_config(scheduler: Any) -> dict:
    """The config of a `FlowMatchEulerDiscreteScheduler` (an instance or its config), checked.

    Every option that changes the sigma schedule (shift, dynamic shifting and `time_shift_type`, `shift_terminal`,
    Karras / exponential / beta sigmas) is supported: schedules are computed by the scheduler's own `set_timesteps`.
    Options in `UNSUPPORTED_SCHEDULER_OPTIONS` are refused. Raises `TypeError` for any other scheduler class.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    if isinstance(scheduler, Mapping):
        config = dict(scheduler)
        name = config.get("_class_name", FlowMatchEulerDiscreteScheduler.__name__)
        is_flow = name == FlowMatchEulerDiscreteScheduler.__name__
    else:
        config, name = dict(getattr(scheduler, "config", {})), type(scheduler).__name__
        is_flow = isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
    if not is_flow:
        raise TypeError(f"{name} is not a flow-matching model/scheduler: rlhf-image trains flow-matching "
                        "(rectified-flow) models sampled with FlowMatchEulerDiscreteScheduler; restore the model's "
                        "own FlowMatchEulerDiscreteScheduler")
    unsupported = [key for key in UNSUPPORTED_SCHEDULER_OPTIONS if config.get(key)]
    if unsupported:
        reasons = "; ".join(f"{key}: {UNSUPPORTED_SCHEDULER_OPTIONS[key]}" for key in unsupported)
        raise ValueError(f"scheduler options {unsupported} are not supported ({reasons}); set them to False")
    return config


# --- the adapter base ----------------------------------------------------------------------------------------


class FlowPolicy(ABC):
    """Base adapter of a diffusers flow-matching text-to-image family. See the module docstring.

    Args:
        transformer (`torch.nn.Module`): the denoiser (it, or its LoRA adapter, is what trains).
        vae (`torch.nn.Module`): frozen image autoencoder.
        scheduler (`FlowMatchEulerDiscreteScheduler` or its config `dict`): the pipeline's scheduler; any other
            scheduler class is refused ("not a flow-matching model/scheduler").
        negative_prompt (`str`, defaults to `""`): unconditional prompt of classifier-free guidance.
        batched_cfg (`bool`, *optional*): run the conditional and unconditional rows of CFG in one transformer call
            (defaults to the family's `supports_batched_cfg`).

    Class attributes a family may set: `latent_patch` (latent heights and widths must be multiples of it; the
    tokens per latent cell are `1 / latent_patch**2`), `supports_batched_cfg`.
    """

    latent_patch = 2
    supports_batched_cfg = True

    def __init__(self, transformer: torch.nn.Module, vae: torch.nn.Module, scheduler: Any,
                 negative_prompt: str = "", *, batched_cfg: bool | None = None):
        self.transformer = transformer
        self.vae = vae
        self.scheduler_config = flow_matching_scheduler_config(scheduler)
        self.negative_prompt = negative_prompt
        self.batched_cfg = self.supports_batched_cfg if batched_cfg is None else batched_cfg
        if self.batched_cfg and not self.supports_batched_cfg:
            raise ValueError(f"{type(self).__name__} cannot batch the CFG rows: pass batched_cfg=False")
        self.vae_scale_factor = self._vae_scale_factor()
        self.base_model_name_or_path: str | None = None
        for module in self.frozen_modules():
            module.requires_grad_(False)

    # --- to implement per family ---------------------------------------------------------------------------
    @abstractmethod
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        """Text conditioning for `prompts`, as the family's pipeline computes it, padded to a fixed length."""

    @abstractmethod
    def forward(self, transformer: torch.nn.Module, latents: torch.Tensor, sigma: torch.Tensor,
                cond: Conditioning) -> torch.Tensor:
        """One transformer call.

        Args:
            transformer (`torch.nn.Module`): `self.transformer`, or a wrapper of it (DDP, DeepSpeed, peft): call it,
                don't read its attributes (read configuration from `self.transformer` at construction).
            latents (`torch.Tensor` of shape `[B, C, h, w]`): in the transformer's dtype.
            sigma (`torch.Tensor` of shape `[B]`): noise levels in [0, 1], float32.
            cond ([`Conditioning`]): batch `B`.

        Returns:
            `torch.Tensor` of shape `[B, C, h, w]`: the velocity `eps - x0` (flip the sign here for models that
            predict `x0 - eps`).
        """

    # --- family hooks with defaults ------------------------------------------------------------------------
    def frozen_modules(self) -> list[torch.nn.Module]:
        """Modules that never train (VAE, text encoders)."""
        return [self.vae]

    def encode_negative_prompt(self, batch_size: int) -> Conditioning:
        """The unconditional conditioning of CFG, `batch_size` rows (as the pipeline computes it)."""
        return self.encode_prompt([self.negative_prompt]).select([0] * batch_size)

    def guide(self, velocity: torch.Tensor, negative_velocity: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """Combine conditional and unconditional velocities `[B, C, h, w]`: true CFG `v_neg + g (v - v_neg)`."""
        return negative_velocity + guidance_scale * (velocity - negative_velocity)

    def inference_sigmas(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """The `[N + 1]` sigmas the family's pipeline denoises through at `height x width` pixels (float32, ending
        at 0). Default: the FLUX.1 / Ovis-Image convention, `linspace(1, 1/N, N)` shifted by
        `calculate_shift(image_seq_len)` under dynamic shifting; computed by the scheduler's own `set_timesteps`."""
        return flux_style_sigmas(num_steps, self.image_seq_len(height, width), self.scheduler_config)

    def _vae_scale_factor(self) -> int:
        """Pixels per cell of the policy's latents."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def num_latent_channels(self) -> int:
        """Channels `C` of the policy's latents."""
        return self.vae.config.latent_channels

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents `[B, C, h, w]` -> images `[B, 3, H, W]`, float32 in [0, 1] (an `AutoencoderKL` by default)."""
        vae_dtype = next(self.vae.parameters()).dtype
        latents = latents.to(vae_dtype) / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)
        images = self.vae.decode(latents, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor | list[PIL.Image.Image],
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Images -> latents `[B, C, h, w]` (float32), for DPO and fine-tuning.

        Args:
            images (`torch.Tensor` of shape `[B, 3, H, W]` in [0, 1], or a list of PIL images of one size).
            generator (`torch.Generator`, *optional*): draws from the latent distribution when given;
                otherwise its mode is used (deterministic).
        """
        dist = self.vae.encode(self._vae_input(images)).latent_dist
        latents = dist.sample(generator) if generator is not None else dist.mode()
        return (latents.float() - (self.vae.config.shift_factor or 0.0)) * self.vae.config.scaling_factor

    def _vae_input(self, images: torch.Tensor | list[PIL.Image.Image]) -> torch.Tensor:
        """Images in [0, 1] -> the VAE's input in [-1, 1], on its device and dtype."""
        if not isinstance(images, torch.Tensor):
            images = pil_to_tensor(images)
        vae_dtype = next(self.vae.parameters()).dtype
        return (images * 2 - 1).to(self.device, vae_dtype)

    # --- shared --------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> FlowPolicy:
        for module in [self.transformer, *self.frozen_modules()]:
            module.to(device=device, dtype=dtype)
        return self

    @property
    def pixel_unit(self) -> int:
        """Image heights and widths must be multiples of this many pixels (VAE factor x latent patch)."""
        return self.vae_scale_factor * self.latent_patch

    def check_image_size(self, height: int, width: int) -> None:
        """Raise `ValueError` unless the model takes `height x width` pixels exactly (no silent rounding)."""
        unit = self.pixel_unit
        if height < unit or width < unit or height % unit or width % unit:
            fix = f"{max(unit, round(height / unit) * unit)}x{max(unit, round(width / unit) * unit)}"
            raise ValueError(f"image size {height}x{width} px: this model ({type(self).__name__}) takes heights and "
                             f"widths that are positive multiples of {unit} px (VAE factor x latent patch); use e.g. "
                             f"{fix}")

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """Latent `(h, w)` for an image of exactly `height x width` pixels (see [`check_image_size`])."""
        self.check_image_size(height, width)
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def image_seq_len(self, height: int, width: int) -> int:
        """Number of image tokens the transformer sees (drives the resolution-dependent shift)."""
        h, w = self.latent_size(height, width)
        return (h // self.latent_patch) * (w // self.latent_patch)

    def initial_noise(self, height: int, width: int, generator: torch.Generator | list[torch.Generator],
                      batch_size: int | None = None) -> torch.Tensor:
        """Standard normal latents `[B, C, h, w]` (float32); with one generator per sample, sample `i`
        depends only on `generator[i]`, as in the diffusers pipelines."""
        batch_size = len(generator) if isinstance(generator, list) else batch_size
        if batch_size is None:
            raise ValueError("pass `batch_size` when `generator` is not a list of one generator per sample")
        shape = (batch_size, self.num_latent_channels, *self.latent_size(height, width))
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    def predict_velocity(
        self,
        latents: torch.Tensor,
        sigma: torch.Tensor | float,
        cond: Conditioning,
        negative_cond: Conditioning | None = None,
        guidance_scale: float = 1.0,
        *,
        transformer: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """Velocity `eps - x0` at (`latents`, `sigma`), with classifier-free guidance ([`guide`]) when
        `negative_cond` is given and `guidance_scale > 1`. With `batched_cfg` the conditional and unconditional rows
        go through one transformer call of `2B` rows; a sampler and a trainer that both call this method with the
        same batch size compute bit-identical velocities either way.

        Args:
            latents (`torch.Tensor` of shape `[B, C, h, w]`).
            sigma (`float` or `torch.Tensor` of shape `[B]`): noise level in [0, 1].
            cond, negative_cond ([`Conditioning`] of batch `B`).
            guidance_scale (`float`, defaults to 1.0).
            transformer (`torch.nn.Module`, *optional*): the module to call instead of `self.transformer`: a
                trainer passes the DDP / DeepSpeed wrapper of the transformer, which synchronises gradients and
                gathers ZeRO-3 partitions. Defaults to `self.transformer`.

        Returns:
            `torch.Tensor` of shape `[B, C, h, w]` in the transformer's dtype.
        """
        b = latents.shape[0]
        sigma = torch.as_tensor(sigma, device=latents.device, dtype=torch.float32).expand(b)
        transformer = self.transformer if transformer is None else transformer
        latents = latents.to(self.dtype)
        if negative_cond is None or guidance_scale <= 1:
            return self.forward(transformer, latents, sigma, cond)
        if self.batched_cfg and cond.layout() == negative_cond.layout():
            both = self.forward(transformer, torch.cat([latents, latents]), torch.cat([sigma, sigma]),
                                Conditioning.cat([cond, negative_cond]))
            velocity, negative = both[:b], both[b:]
        else:
            velocity = self.forward(transformer, latents, sigma, cond)
            negative = self.forward(transformer, latents, sigma, negative_cond)
        return self.guide(velocity, negative, guidance_scale)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The transformer's parameters that require grad (LoRA adapters only, after peft)."""
        return [p for p in self.transformer.parameters() if p.requires_grad]

    @classmethod
    def from_pipeline(cls, pipe: Any, **kwargs: Any) -> FlowPolicy:
        """Wrap a diffusers pipeline.

        On `FlowPolicy` itself, the adapter registered for the pipeline's class (or a base class of it) is used; see
        [`register_family`]. On an adapter class, the adapter is built from the pipeline's components, passed to its
        `__init__` by their diffusers names (`transformer`, `vae`, `scheduler`, `text_encoder`, `tokenizer`, ...).

        Args:
            pipe (`diffusers.DiffusionPipeline`).
            kwargs: options of the adapter (`max_sequence_length`, `negative_prompt`, ...).
        """
        if cls is FlowPolicy:
            policy_class = policy_class_for(pipe)
            if policy_class is None:
                raise _no_adapter_error(pipe)
            return policy_class.from_pipeline(pipe, **kwargs)
        parameters = inspect.signature(cls.__init__).parameters
        components = {name: module for name, module in pipe.components.items() if name in parameters}
        policy = cls(**components, **kwargs)
        policy.base_model_name_or_path = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path")
        return policy


# --- the registry --------------------------------------------------------------------------------------------

# pipeline class (or its name) -> adapter class (or "module:Class", imported on first use)
_FAMILIES: dict[type | str, type[FlowPolicy] | str] = dict(BUILTIN_FAMILIES)


def register_family(pipeline_class: type | str, policy_class: type[FlowPolicy] | str) -> None:
    """Make `FlowPolicy.from_pipeline` (and so every trainer) wrap pipelines of `pipeline_class` (and its
    subclasses) with `policy_class`, an adapter built from the pipeline's components (see
    [`FlowPolicy.from_pipeline`]). A later registration of the same class replaces the earlier one.

    Args:
        pipeline_class (`type` or `str`): a diffusers pipeline class, or its class name.
        policy_class (`type[FlowPolicy]` or `str`): the adapter, or `"module:ClassName"` to import it lazily.
    """
    if isinstance(policy_class, type) and not issubclass(policy_class, FlowPolicy):
        raise TypeError(f"{policy_class.__name__} is not a FlowPolicy subclass")
    _FAMILIES[pipeline_class] = policy_class


def registered_families() -> dict[str, str]:
    """Pipeline class name -> adapter name, for every registered family."""
    def name(x):
        return x if isinstance(x, str) else x.__name__
    return {name(k): name(v).rpartition(":")[2] for k, v in _FAMILIES.items()}


def policy_class_for(pipe: Any) -> type[FlowPolicy] | None:
    """The adapter registered for `pipe`'s class or the nearest base class of it; `None` if there is none."""
    for klass in type(pipe).__mro__:
        entry = _FAMILIES.get(klass, _FAMILIES.get(klass.__name__))
        if entry is None:
            continue
        if isinstance(entry, str):
            module, _, name = entry.partition(":")
            entry = getattr(importlib.import_module(module), name)
        return entry
    return None


def _no_adapter_error(pipe: Any) -> Exception:
    from diffusers import FlowMatchEulerDiscreteScheduler

    name = type(pipe).__name__
    components = pipe.components if hasattr(pipe, "components") else {}
    scheduler = components.get("scheduler")
    if "unet" in components or (scheduler is not None and not isinstance(scheduler, FlowMatchEulerDiscreteScheduler)):
        denoiser = components.get("unet", components.get("transformer"))
        return TypeError(f"{name} is not a flow-matching model/scheduler (denoiser {type(denoiser).__name__}, "
                         f"scheduler {type(scheduler).__name__}): rlhf-image trains flow-matching (rectified-flow) "
                         "text-to-image models")
    return TypeError(f"no FlowPolicy adapter for {name}; registered: {', '.join(sorted(registered_families()))}. "
                     f"Write one (a FlowPolicy subclass with encode_prompt and forward) and register it with "
                     f"rlhf_image.register_family({name}, YourPolicy): see docs/train_your_model.md")


def pil_to_tensor(images: list[PIL.Image.Image]) -> torch.Tensor:
    """PIL images of one size -> `[B, 3, H, W]` float32 in [0, 1]."""
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def tensor_to_pil(images: torch.Tensor) -> list[PIL.Image.Image]:
    """`[B, 3, H, W]` in [0, 1] -> PIL images (rounded as diffusers' `numpy_to_pil` does)."""
    arrays = (images.detach().float().cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return [PIL.Image.fromarray(a) for a in arrays]
