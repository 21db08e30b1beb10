"""Fit the tiny Ovis-Image `AutoencoderKL` on the demo's renders, then set its latent normalisation.

The 7B recipe uses FLUX.1-schnell's pretrained VAE, frozen. No pretrained weights can be downloaded for
the CPU demo, and a randomly initialised `AutoencoderKL` cannot represent images, so the tiny VAE is
fitted once, briefly, on the training renders (reconstruction L1 + L2 and a small KL to the unit
Gaussian, on posterior samples so that the decoder tolerates imperfect latents), and then frozen.
Afterwards its `shift_factor` and `scaling_factor` are set from the latent statistics as FLUX does
(`shift = mean`, `scale = 1 / std` of the posterior modes), so the flow model sees zero-mean,
unit-variance latents: `z = (mode(E(x)) - shift) * scale` (see `FlowPolicy.encode_images`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import PIL.Image
import torch
from diffusers import AutoencoderKL

from rlhf_image.policy import pil_to_tensor


@dataclass
class VAEFitResult:
    """What [`fit_tiny_vae`] did.

    Args:
        num_steps (`int`): optimiser steps.
        seconds (`float`): wall time of the fit (normalisation included).
        cpu_seconds (`float`): process CPU time of the fit (all threads).
        losses (`list[float]`): total loss per step.
        recon_l1 (`float`): mean absolute reconstruction error, in [0, 1] pixel units, of the posterior
            modes of the fitting images after the fit.
        shift_factor, scaling_factor (`float`): the latent normalisation written into `vae.config`.
    """

    num_steps: int
    seconds: float
    cpu_seconds: float
    losses: list[float] = field(repr=False)
    recon_l1: float
    shift_factor: float
    scaling_factor: float


def _as_tensor(images: torch.Tensor | Sequence[PIL.Image.Image]) -> torch.Tensor:
    images = images if isinstance(images, torch.Tensor) else pil_to_tensor(list(images))
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be RGB `[N, 3, H, W]` in [0, 1], got shape {tuple(images.shape)}")
    return images.float()


def reconstruction_loss(vae: AutoencoderKL, pixels: torch.Tensor, kl_weight: float,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`mean |x - D(z)| + mean (x - D(z))^2 + kl_weight * KL(q(z|x) || N(0, I))` with `z ~ q(z|x)`.

    Args:
        vae (`AutoencoderKL`).
        pixels (`torch.Tensor` of shape `[B, 3, H, W]`): images in [-1, 1] (the VAE's range).
        kl_weight (`float`): weight of the KL term (mean over latent elements).
        generator (`torch.Generator`, *optional*): draws the posterior samples.

    Returns:
        `(loss, recon_l1)`: the scalar loss and the mean absolute error in [-1, 1] units (detached).
    """
    posterior = vae.encode(pixels).latent_dist
    decoded = vae.decode(posterior.sample(generator)).sample
    l1 = (decoded - pixels).abs().mean()
    kl = 0.5 * (posterior.mean**2 + posterior.var - 1.0 - posterior.logvar).mean()
    return l1 + ((decoded - pixels) ** 2).mean() + kl_weight * kl, l1.detach()


@torch.no_grad()
def latent_modes(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Unnormalised posterior modes `mode(E(x))` `[N, C, h, w]` of images `[N, 3, H, W]` in [0, 1]."""
    return torch.cat([vae.encode(images[i:i + batch_size] * 2 - 1).latent_dist.mode()
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def set_latent_normalization(vae: AutoencoderKL,
                             images: torch.Tensor | Sequence[PIL.Image.Image]) -> tuple[float, float]:
    """Set `vae.config.shift_factor = mean` and `scaling_factor = 1 / std` of the latent modes of
    `images` (one scalar each, over all channels and positions, as FLUX's VAE config holds).

    Returns:
        `(shift_factor, scaling_factor)`.
    """
    latents = latent_modes(vae, _as_tensor(images))
    shift, scale = latents.mean().item(), 1.0 / latents.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return shift, scale


def fit_tiny_vae(
    vae: AutoencoderKL,
    images: torch.Tensor | Sequence[PIL.Image.Image],
    *,
    num_steps: int = 300,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    kl_weight: float = 1e-3,
    seed: int = 0,
) -> VAEFitResult:
    """Fit `vae` in place on `images`, set its latent normalisation, freeze it and put it in eval mode.

    AdamW with a 5% linear warm-up and cosine decay; batches are drawn with replacement by a seeded
    generator, so the fit is deterministic for a given thread count.

    Args:
        vae (`AutoencoderKL`): the (randomly initialised) tiny VAE, e.g. `ovis_image_tiny().vae`.
        images (`torch.Tensor` of shape `[N, 3, H, W]` in [0, 1], or a list of PIL images of one size).
        num_steps (`int`, defaults to 300): optimiser steps.
        batch_size (`int`, defaults to 32).
        learning_rate (`float`, defaults to 2e-3): peak AdamW learning rate.
        kl_weight (`float`, defaults to 1e-3): KL weight (see [`reconstruction_loss`]).
        seed (`int`, defaults to 0).

    Returns:
        [`VAEFitResult`].
    """
    if num_steps < 1 or batch_size < 1:
        raise ValueError(f"num_steps and batch_size must be >= 1, got {num_steps} and {batch_size}")
    pixels = _as_tensor(images) * 2 - 1
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    warmup = max(1, num_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / num_steps)))
    vae.requires_grad_(True).train()
    start, cpu_start = time.perf_counter(), time.process_time()
    losses = []
    for _ in range(num_steps):
        batch = pixels[torch.randint(len(pixels), (batch_size,), generator=generator)]
        loss, _ = reconstruction_loss(vae, batch, kl_weight, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    vae.requires_grad_(False).eval()
    shift, scale = set_latent_normalization(vae, (pixels + 1) / 2)
    recon = reconstruct(vae, (pixels + 1) / 2)
    return VAEFitResult(num_steps=num_steps, seconds=time.perf_counter() - start,
                        cpu_seconds=time.process_time() - cpu_start, losses=losses,
                        recon_l1=(recon - (pixels + 1) / 2).abs().mean().item(), shift_factor=shift,
                        scaling_factor=scale)


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """`D(mode(E(x)))` of images `[N, 3, H, W]` in [0, 1], returned in [0, 1] (clamped)."""
    out = [vae.decode(vae.encode(images[i:i + batch_size] * 2 - 1).latent_dist.mode()).sample
           for i in range(0, len(images), batch_size)]
    return (torch.cat(out) / 2 + 0.5).clamp(0, 1)
