"""`FlowPolicy`: one face over a diffusers flow-matching text-to-image model.

A policy's latents are VAE-space tensors `[B, C, h, w]` (already shifted and scaled, as the
transformer sees them); adapters pack them into tokens around the transformer call, which is an exact
permutation. Everything a trainer needs goes through six methods: `encode_prompt`, `predict_velocity`,
`initial_noise`, `decode`, `encode_images` and `trainable_parameters`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields

import numpy as np
import PIL.Image
import torch
from diffusers.utils.torch_utils import randn_tensor


@dataclass
class Conditioning:
    """Text conditioning for a batch.

    Args:
        prompt_embeds (`torch.Tensor` of shape `[B, L, D]`): per-token text states.
        pooled_prompt_embeds (`torch.Tensor` of shape `[B, P]`, *optional*): pooled text embedding
            (FLUX, SD3); `None` for models without one (Ovis-Image).
    """

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def _map(self, fn) -> Conditioning:
        return Conditioning(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                               for f in fields(self)})

    def select(self, index: torch.Tensor | list[int] | slice) -> Conditioning:
        """The rows `index` of every tensor."""
        return self._map(lambda t: t[index])

    def to(self, *args, **kwargs) -> Conditioning:
        return self._map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> Conditioning:
        return self._map(lambda t: t.detach())

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        first = items[0]
        return Conditioning(**{f.name: None if getattr(first, f.name) is None
                               else torch.cat([getattr(c, f.name) for c in items]) for f in fields(first)})


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """`[B, C, h, w]` -> `[B, (h/2)(w/2), 4C]`: 2x2 patches as tokens (FLUX, Ovis-Image)."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of [`pack_latents`] for latent size `height x width`: `[B, L, 4C]` -> `[B, C, h, w]`."""
    b, _, channels = tokens.shape
    tokens = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return tokens.reshape(b, channels // 4, height, width)


def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """RoPE positions `(0, row, col)` of the packed tokens of an `height x width` latent, `[L, 3]`."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FlowPolicy(ABC):
    """Base adapter. Subclasses implement [`encode_prompt`] and [`_transformer_forward`].

    Args:
        transformer (`torch.nn.Module`): the denoiser, predicting velocity `eps - x0`.
        vae (`diffusers.AutoencoderKL`): frozen image autoencoder.
        scheduler_config (`dict`): config of the model's `FlowMatchEulerDiscreteScheduler` (its shift).
        negative_prompt (`str`, defaults to `""`): unconditional prompt for true CFG.
    """

    latent_patch = 2  # latent h and w must be multiples of this

    def __init__(self, transformer, vae, scheduler_config: dict, negative_prompt: str = ""):
        self.transformer = transformer
        self.vae = vae
        self.scheduler_config = dict(scheduler_config)
        self.negative_prompt = negative_prompt
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.base_model_name_or_path: str | None = None
        for module in self.frozen_modules():
            module.requires_grad_(False)

    # --- to implement per family -------------------------------------------------------------
    @abstractmethod
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        """Text conditioning for `prompts`, exactly as the family's diffusers pipeline computes it."""

    @abstractmethod
    def _transformer_forward(self, transformer: torch.nn.Module, tokens: torch.Tensor, sigma: torch.Tensor,
                             cond: Conditioning, height: int, width: int) -> torch.Tensor:
        """One call of `transformer` (the policy's own, or a wrapper of it) on packed `tokens` `[B, L, C']` at noise
        level `sigma` `[B]`."""

    def frozen_modules(self) -> list[torch.nn.Module]:
        """Modules that never train (VAE, text encoders)."""
        return [self.vae]

    # --- shared ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def num_latent_channels(self) -> int:
        return self.vae.config.latent_channels

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
        """Velocity `eps - x0` at (`latents`, `sigma`), with true classifier-free guidance when
        `negative_cond` is given and `guidance_scale > 1` (`v_neg + g (v - v_neg)`).

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
        b, _, h, w = latents.shape
        sigma = torch.as_tensor(sigma, device=latents.device, dtype=self.dtype).expand(b)
        transformer = self.transformer if transformer is None else transformer
        tokens = pack_latents(latents.to(self.dtype))
        velocity = self._transformer_forward(transformer, tokens, sigma, cond, h, w)
        if negative_cond is not None and guidance_scale > 1:
            negative = self._transformer_forward(transformer, tokens, sigma, negative_cond, h, w)
            velocity = negative + guidance_scale * (velocity - negative)
        return unpack_latents(velocity, h, w)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents `[B, C, h, w]` -> images `[B, 3, H, W]`, float32 in [0, 1]."""
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
        if not isinstance(images, torch.Tensor):
            images = pil_to_tensor(images)
        vae_dtype = next(self.vae.parameters()).dtype
        dist = self.vae.encode((images * 2 - 1).to(self.device, vae_dtype)).latent_dist
        latents = dist.sample(generator) if generator is not None else dist.mode()
        return ((latents.float() - (self.vae.config.shift_factor or 0.0)) * self.vae.config.scaling_factor)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The transformer's parameters that require grad (LoRA adapters only, after peft)."""
        return [p for p in self.transformer.parameters() if p.requires_grad]

    @classmethod
    def from_pipeline(cls, pipe, **kwargs) -> FlowPolicy:
        """Wrap a diffusers pipeline: `OvisImagePipeline` or `FluxPipeline`."""
        from diffusers import FluxPipeline, OvisImagePipeline

        from .policies import FluxPolicy, OvisImagePolicy

        if isinstance(pipe, OvisImagePipeline):
            policy = OvisImagePolicy(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                                     pipe.scheduler.config, **kwargs)
        elif isinstance(pipe, FluxPipeline):
            policy = FluxPolicy(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                                pipe.text_encoder_2, pipe.tokenizer_2, pipe.scheduler.config, **kwargs)
        else:
            raise TypeError(
                f"no FlowPolicy adapter for {type(pipe).__name__}; supported: OvisImagePipeline, FluxPipeline. "
                "Subclass FlowPolicy (encode_prompt and _transformer_forward) for another family."
            )
        policy.base_model_name_or_path = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path")
        return policy


def pil_to_tensor(images: list[PIL.Image.Image]) -> torch.Tensor:
    """PIL images of one size -> `[B, 3, H, W]` float32 in [0, 1]."""
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def tensor_to_pil(images: torch.Tensor) -> list[PIL.Image.Image]:
    """`[B, 3, H, W]` in [0, 1] -> PIL images (rounded as diffusers' `numpy_to_pil` does)."""
    arrays = (images.detach().float().cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return [PIL.Image.fromarray(a) for a in arrays]
