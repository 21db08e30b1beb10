"""Noise schedules: inference sigmas as the diffusers flow-matching pipelines compute them, and the
training-time sigma distributions of rectified-flow training (SD3, FLUX, Ovis-Image)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Resolution-dependent shift `mu`, linear in the number of image tokens (FLUX, Ovis-Image)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def time_shift(sigmas: np.ndarray | torch.Tensor, mu: float, kind: str = "exponential"):
    """Shift sigmas toward noise: `e^mu / (e^mu + (1/s - 1))` (exponential) or `mu / (mu + (1/s - 1))`."""
    scale = math.exp(mu) if kind == "exponential" else mu
    return scale / (scale + (1 / sigmas - 1))


def scheduler_sigmas(
    scheduler_config: Mapping[str, Any],
    num_steps: int,
    *,
    sigmas: Sequence[float] | np.ndarray | None = None,
    mu: float | None = None,
) -> torch.Tensor:
    """The sigmas `FlowMatchEulerDiscreteScheduler.set_timesteps(num_steps, sigmas=sigmas, mu=mu)` gives: the
    schedule a pipeline denoises through when it makes that call. Computed by the scheduler itself, so every
    option its config holds (static or dynamic shift of either `time_shift_type`, `shift_terminal`, Karras,
    exponential or beta sigmas) is honoured exactly.

    Returns:
        `torch.Tensor` of shape `[N + 1]`, float32, with the terminal sigma appended.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(num_steps, sigmas=None if sigmas is None else list(sigmas), mu=mu)
    return scheduler.sigmas.to(torch.float32).cpu()


def inference_sigmas(num_steps: int, image_seq_len: int, scheduler_config: Mapping[str, Any]) -> torch.Tensor:
    """The sigmas of the FLUX.1 / Ovis-Image pipelines (and most flow-matching pipelines since): they pass
    `sigmas=linspace(1, 1/N, N)` and `mu=calculate_shift(image_seq_len)` (read from the scheduler config) to
    `set_timesteps`; the scheduler applies `mu` under dynamic shifting and its static `shift` otherwise.

    Args:
        num_steps (`int`): number of denoising steps `N`.
        image_seq_len (`int`): number of image tokens the transformer sees.
        scheduler_config (`Mapping`): the scheduler's `config`.

    Returns:
        `torch.Tensor` of shape `[N + 1]`, float32, from (nearly) 1 down to 0.
    """
    mu = calculate_shift(
        image_seq_len,
        scheduler_config.get("base_image_seq_len", 256),
        scheduler_config.get("max_image_seq_len", 4096),
        scheduler_config.get("base_shift", 0.5),
        scheduler_config.get("max_shift", 1.15),
    )
    return scheduler_sigmas(scheduler_config, num_steps, sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)


def sample_training_sigmas(
    batch_size: int,
    scheme: str = "logit_normal",
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mu: float | None = None,
    shift: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw training noise levels for the rectified-flow loss.

    `logit_normal` (SD3, Ovis-Image): `s = sigmoid(logit_mean + logit_std z)`; `uniform`: `s ~ U(0, 1)`.
    Then optionally shifted toward noise, either resolution-dependently (`mu`, as at inference, see
    [`calculate_shift`]) or by a static `shift` (`shift s / (1 + (shift - 1) s)`).

    Returns:
        `torch.Tensor` of shape `[batch_size]`, float32, in (0, 1).
    """
    if mu is not None and shift is not None:
        raise ValueError("pass either `mu` (resolution-dependent shift) or `shift` (static shift), not both")
    if scheme == "logit_normal":
        z = torch.randn(batch_size, generator=generator)
        sigmas = torch.sigmoid(logit_mean + logit_std * z)
    elif scheme == "uniform":
        sigmas = torch.rand(batch_size, generator=generator)
    else:
        raise ValueError(f"unknown timestep sampling scheme {scheme!r}; use 'logit_normal' or 'uniform'")
    if mu is not None:
        sigmas = time_shift(sigmas, mu)
    elif shift is not None:
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return sigmas.float()


def loss_weighting(sigmas: torch.Tensor, scheme: str = "none") -> torch.Tensor:
    """Per-sample loss weights for the rectified-flow loss: `none` (1), `sigma_sqrt` (`s^-2`, as in
    diffusers' SD3 training script) or `cosmap` (`2 / (pi (1 - 2s + 2s^2))`, SD3 paper)."""
    if scheme == "none":
        return torch.ones_like(sigmas)
    if scheme == "sigma_sqrt":
        return (sigmas**-2.0).float()
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    raise ValueError(f"unknown loss weighting {scheme!r}; use 'none', 'sigma_sqrt' or 'cosmap'")
