"""One denoising step of a flow-matching sampler: deterministic (Euler), Flow-GRPO SDE, and CPS.

Notation: sigma runs from 1 (noise) to 0 (data); `x_t = (1 - sigma) x0 + sigma eps` and the model
predicts the velocity `v = eps - x0`. A step goes from `sigma` to `sigma_next < sigma`, so
`dt = sigma_next - sigma < 0`.

The stochastic steps return the Gaussian transition `x' ~ N(mean, std^2)` with its log-density, so
a policy-gradient trainer can evaluate `log p(x' | x)` of a recorded transition under new weights
(pass `prev_sample`). All arithmetic is float32 whatever the model dtype. The log-prob is the
mean over the latent dimensions (Flow-GRPO's convention), one value per sample.
"""

from __future__ import annotations

import math

import torch
from diffusers.utils.torch_utils import randn_tensor

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

Generator = torch.Generator | list[torch.Generator] | None


def _expand(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A scalar or a per-sample `[B]` tensor, viewed as `[B, 1, ...]` to broadcast against `like`."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if value.ndim == 0:
        return value
    return value.reshape(-1, *([1] * (like.ndim - 1)))


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Log-density of `x` under `N(mean, std^2)`, averaged over all but the batch dimension.

    Where `std == 0` the transition is deterministic and has no density: the log-prob is 0 there, so
    such a step contributes a ratio of exactly 1 and no gradient.

    Args:
        x, mean (`torch.Tensor` of shape `[B, ...]`): float32.
        std (`torch.Tensor` broadcastable to `x`): float32, >= 0.

    Returns:
        `torch.Tensor` of shape `[B]`.
    """
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    log_prob = -((x - mean) ** 2) / (2 * safe_std**2) - torch.log(safe_std) - _HALF_LOG_2PI
    log_prob = torch.where(std > 0, log_prob, torch.zeros_like(log_prob))
    return log_prob.mean(dim=tuple(range(1, x.ndim)))


def ode_step(
    velocity: torch.Tensor, latents: torch.Tensor, sigma: torch.Tensor | float, sigma_next: torch.Tensor | float
) -> torch.Tensor:
    """Euler step of the probability-flow ODE: `x' = x + (sigma_next - sigma) v` (what diffusers'
    `FlowMatchEulerDiscreteScheduler.step` does). Returns float32, same shape as `latents`."""
    latents = latents.float()
    dt = _expand(sigma_next, latents) - _expand(sigma, latents)
    return latents + dt * velocity.float()


def sde_step_with_logprob(
    velocity: torch.Tensor,
    latents: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    noise_level: float,
    generator: Generator = None,
    prev_sample: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flow-GRPO's SDE step (Liu et al., 2025, eq. 9), the reverse SDE with the same marginals as the ODE.

    With `a = noise_level`: `std_t = a sqrt(sigma / (1 - sigma))` (at sigma = 1 the denominator uses
    sigma_next, which is the schedule's second sigma there), `mean = x + [v + std_t^2 / (2 sigma) (x +
    (1 - sigma) v)] dt` and `x' = mean + std_t sqrt(-dt) eps`. With `a = 0` this is the Euler step.

    Args:
        velocity (`torch.Tensor` of shape `[B, ...]`): model prediction `v` at (`latents`, `sigma`).
        latents (`torch.Tensor` of shape `[B, ...]`): current sample `x`.
        sigma, sigma_next (`float` or `torch.Tensor` of shape `[B]`): current and next noise level.
        noise_level (`float`): `a`, the SDE noise scale (Flow-GRPO uses 0.7).
        generator (`torch.Generator` or a list of one per sample, *optional*): noise source.
        prev_sample (`torch.Tensor` of shape `[B, ...]`, *optional*): a given next sample whose
            log-prob is evaluated instead of drawing a new one (what training does).

    Returns:
        `(prev_sample, log_prob, mean, std)`: the next sample `[B, ...]`, its log-prob `[B]`, the
        transition mean `[B, ...]` and the transition standard deviation `std_t sqrt(-dt)`
        (broadcastable to `[B, ...]`), all float32.
    """
    latents, velocity = latents.float(), velocity.float()
    sigma, sigma_next = _expand(sigma, latents), _expand(sigma_next, latents)
    dt = sigma_next - sigma
    std_t = noise_level * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_next, sigma)))
    mean = latents + (velocity + std_t**2 / (2 * sigma) * (latents + (1 - sigma) * velocity)) * dt
    std = std_t * torch.sqrt(-dt)
    return _sample_and_score(mean, std, generator, prev_sample)


def cps_step_with_logprob(
    velocity: torch.Tensor,
    latents: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    noise_level: float,
    generator: Generator = None,
    prev_sample: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coefficient-preserving sampling step (Flow-CPS, Wang & Yu, 2025), used by Ovis-Image's GRPO.

    The clean and noise estimates `x0 = x - sigma v` and `x1 = x + (1 - sigma) v` are recombined so
    that the next sample keeps the interpolation's coefficients exactly: with `s_noise = sigma_next
    sin(a pi / 2)`, `mean = (1 - sigma_next) x0 + sqrt(sigma_next^2 - s_noise^2) x1` and
    `x' = mean + s_noise eps`. With `a = 0` this is the Euler step. At `sigma_next = 0` the step is
    deterministic (log-prob 0).

    Arguments and returns as in [`sde_step_with_logprob`]; `std` is `s_noise`.
    """
    latents, velocity = latents.float(), velocity.float()
    sigma, sigma_next = _expand(sigma, latents), _expand(sigma_next, latents)
    if noise_level == 0:
        # sqrt(sigma_next^2) re-rounds; the exact Euler form keeps a = 0 bit-equal to `ode_step`.
        mean = latents + (sigma_next - sigma) * velocity
        std = torch.zeros_like(sigma_next)
    else:
        std = sigma_next * math.sin(noise_level * math.pi / 2)
        x0_hat = latents - sigma * velocity
        x1_hat = latents + (1 - sigma) * velocity
        mean = (1 - sigma_next) * x0_hat + torch.sqrt(sigma_next**2 - std**2) * x1_hat
    return _sample_and_score(mean, std, generator, prev_sample)


def _sample_and_score(
    mean: torch.Tensor, std: torch.Tensor, generator: Generator, prev_sample: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if prev_sample is None:
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        prev_sample = mean + std * noise
    else:
        prev_sample = prev_sample.float()
    # The sample is a constant of the density: gradients flow through the mean only.
    log_prob = gaussian_log_prob(prev_sample.detach(), mean, std)
    return prev_sample, log_prob, mean, std


def step_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL between two Gaussian steps with the same std: `||mean - ref_mean||^2 / (2 std^2)`, averaged
    over all but the batch dimension. Returns `[B]`; 0 where `std == 0`."""
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    kl = (mean - ref_mean) ** 2 / (2 * safe_std**2)
    kl = torch.where(std > 0, kl, torch.zeros_like(kl))
    return kl.mean(dim=tuple(range(1, mean.ndim)))


STEP_FUNCTIONS = {"sde": sde_step_with_logprob, "cps": cps_step_with_logprob}
