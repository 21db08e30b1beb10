"""Noise schedules: inference sigmas as the diffusers flow-matching pipelines compute them, and the
training-time sigma distributions of rectified-flow training (SD3, FLUX, Ovis-Image).

diffusers' own functions are used where it has them, each checked against the formula in tests/test_schedule.py:
the resolution-dependent shift `calculate_shift` (of the FLUX and Ovis-Image pipelines; `mu` linear in the number
of image tokens), the timestep densities (`training_utils.compute_density_for_timestep_sampling`) and the SD3 loss
weightings (`training_utils.compute_loss_weighting_for_sd3`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from diffusers.pipelines.ovis_image.pipeline_ovis_image import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

__all__ = ["calculate_shift", "inference_sigmas", "loss_weighting", "sample_training_sigmas", "shift_training_sigmas",
           "time_shift"]


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
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw training noise levels for the rectified-flow loss, before any shift (see [`shift_training_sigmas`]):
    `logit_normal` (SD3, Ovis-Image) `s = sigmoid(logit_mean + logit_std z)`, or `uniform` `s ~ U(0, 1)`, with
    diffusers' `compute_density_for_timestep_sampling`.

    Returns:
        `torch.Tensor` of shape `[batch_size]`, float32, in (0, 1).
    """
    if scheme not in ("logit_normal", "uniform"):
        raise ValueError(f"unknown timestep sampling scheme {scheme!r}; use 'logit_normal' or 'uniform'")
    return compute_density_for_timestep_sampling(scheme, batch_size, logit_mean=logit_mean, logit_std=logit_std,
                                                 generator=generator).float()


def shift_training_sigmas(sigmas: torch.Tensor, image_seq_len: int, scheduler_config: Mapping[str, Any],
                          mode: str = "resolution") -> torch.Tensor:
    """Shift training sigmas toward noise as the model's scheduler shifts its inference sigmas; the one training
    shift of the library, used by every trainer that draws training sigmas.

    Args:
        sigmas (`torch.Tensor` of shape `[B]`): drawn noise levels in (0, 1) (see [`sample_training_sigmas`]).
        image_seq_len (`int`): number of image tokens the transformer sees (`FlowPolicy.image_seq_len`).
        scheduler_config (`Mapping`): the model's `FlowMatchEulerDiscreteScheduler` config.
        mode (`str`, defaults to `"resolution"`): `"resolution"`: by `mu = calculate_shift(image_seq_len, ...)` from
            the scheduler config, with the scheduler's `time_shift_type` (`"exponential"`, FLUX and Ovis-Image, or
            `"linear"`), exactly as `FlowMatchEulerDiscreteScheduler.time_shift`; `"static"`: by the config's static
            `shift`, `shift s / (1 + (shift - 1) s)`; `"none"`: unchanged.

    Returns:
        `torch.Tensor` of shape `[B]`, float32.
    """
    if mode == "none":
        return sigmas
    if mode == "static":
        shift = float(scheduler_config.get("shift", 1.0))
        return (shift * sigmas / (1 + (shift - 1) * sigmas)).float()
    if mode != "resolution":
        raise ValueError(f"unknown timestep shift {mode!r}; use 'resolution', 'static' or 'none'")
    mu = calculate_shift(image_seq_len, scheduler_config.get("base_image_seq_len", 256),
                         scheduler_config.get("max_image_seq_len", 4096), scheduler_config.get("base_shift", 0.5),
                         scheduler_config.get("max_shift", 1.15))
    kind = scheduler_config.get("time_shift_type", "exponential")
    if kind not in ("exponential", "linear"):
        raise ValueError(f"scheduler time_shift_type {kind!r} is neither 'exponential' nor 'linear'")
    return time_shift(sigmas, mu, kind).float()


def loss_weighting(sigmas: torch.Tensor, scheme: str = "none") -> torch.Tensor:
    """Per-sample loss weights for the rectified-flow loss, with diffusers' `compute_loss_weighting_for_sd3`:
    `none` (1), `sigma_sqrt` (`s^-2`, as in diffusers' SD3 training script) or `cosmap`
    (`2 / (pi (1 - 2s + 2s^2))`, SD3 paper)."""
    if scheme not in ("none", "sigma_sqrt", "cosmap"):
        raise ValueError(f"unknown loss weighting {scheme!r}; use 'none', 'sigma_sqrt' or 'cosmap'")
    return compute_loss_weighting_for_sd3(scheme, sigmas)
