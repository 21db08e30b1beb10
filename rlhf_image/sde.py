"""One denoising step of a flow-matching sampler: deterministic (Euler), Flow-GRPO SDE, and CPS.

Notation: sigma runs from 1 (noise) to 0 (data); `x_t = (1 - sigma) x0 + sigma eps` and the model
predicts the velocity `v = eps - x0`. A step goes from `sigma` to `sigma_next < sigma`, so
`dt = sigma_next - sigma < 0`.

The stochastic steps return the Gaussian transition `x' ~ N(mean, std^2)` with its log-density, so
a policy-gradient trainer can evaluate `log p(x' | x)` of a recorded transition under new weights
(pass `prev_sample`). All arithmetic is float32 whatever the model dtype. The log-prob is the
mean over the latent dimensions (Flow-GRPO's convention), one value per sample.

Conventions (`"exact"` is the default; `"flow_grpo"` reproduces Flow-GRPO's numbers, for porting its configs):
- CPS log-prob: `"exact"` is the Gaussian log-density; Flow-GRPO drops its `1 / (2 s^2)` factor and constants
  (`-mean((x' - mean)^2)`), so a log-ratio here is Flow-GRPO's times `1 / (2 s^2)` and a clip range does not carry
  over. The SDE log-prob is the Gaussian log-density in both.
- KL of the SDE step ([`step_kl`]): `"exact"` is `||mean - ref_mean||^2 / (2 std_t^2 |dt|)` (over the transition
  variance), Flow-GRPO's `||mean - ref_mean||^2 / (2 std_t^2)`, `|dt|` times ours. The CPS KL is the same in both.
"""

from __future__ import annotations

import math

import torch
from diffusers.utils.torch_utils import randn_tensor

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
CONVENTIONS = ("exact", "flow_grpo")

Generator = torch.Generator | list[torch.Generator] | None


def _expand(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A scalar or a per-sample `[B]` tensor, viewed as `[B, 1, ...]` to broadcast against `like`."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if value.ndim == 0:
        return value
    return value.reshape(-1, *([1] * (like.ndim - 1)))


def _per_sample(std: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample `[B, 1, ...]` std as a scalar or `[B]`: the shape of a per-sample result, so that
    the `std == 0` guard costs one value per sample instead of one per latent element."""
    if std.ndim == 0:
        return std
    if std[0].numel() != 1:
        raise ValueError(f"std must be a scalar or per-sample [B, 1, ...], got shape {tuple(std.shape)}")
    return std.reshape(std.shape[0])


def _check_convention(name: str, value: str) -> None:
    if value not in CONVENTIONS:
        raise ValueError(f"{name}={value!r}: expected one of {CONVENTIONS} ('exact' is the library's default)")


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Log-density of `x` under `N(mean, std^2)`, averaged over all but the batch dimension.

    Where `std == 0` the transition is deterministic and has no density: the log-prob is 0 there, so
    such a step contributes a ratio of exactly 1 and no gradient.

    Args:
        x, mean (`torch.Tensor` of shape `[B, ...]`): float32.
        std (`torch.Tensor`, scalar or of shape `[B, 1, ...]`): float32, >= 0.

    Returns:
        `torch.Tensor` of shape `[B]`.
    """
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    # d^2 / (-2 s^2) is bit for bit -(d^2) / (2 s^2) (IEEE division and products by 2 are sign-symmetric) and
    # saves a full-size negation.
    log_prob = (x - mean) ** 2 / (-2 * safe_std**2) - torch.log(safe_std) - _HALF_LOG_2PI
    log_prob = log_prob.mean(dim=tuple(range(1, x.ndim)))
    return torch.where(_per_sample(std) > 0, log_prob, 0.0)


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
    log_prob_convention: str = "exact",
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
        log_prob_convention (`str`, defaults to `"exact"`): accepted for a uniform call with
            [`cps_step_with_logprob`]; both conventions give the Gaussian log-density here, as Flow-GRPO's does.

    Returns:
        `(prev_sample, log_prob, mean, std)`: the next sample `[B, ...]`, its log-prob `[B]`, the
        transition mean `[B, ...]` and the transition standard deviation `std_t sqrt(-dt)`
        (a scalar or `[B, 1, ...]`), all float32.
    """
    _check_convention("log_prob_convention", log_prob_convention)
    latents, velocity = latents.float(), velocity.float()
    sigma, sigma_next = _expand(sigma, latents), _expand(sigma_next, latents)
    dt = sigma_next - sigma
    std_t = noise_level * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_next, sigma)))
    mean = latents + (velocity + std_t**2 / (2 * sigma) * (latents + (1 - sigma) * velocity)) * dt
    std = std_t * torch.sqrt(-dt)
    prev_sample = _sample(mean, std, generator, prev_sample)
    return prev_sample, gaussian_log_prob(prev_sample.detach(), mean, std), mean, std


def cps_step_with_logprob(
    velocity: torch.Tensor,
    latents: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    noise_level: float,
    generator: Generator = None,
    prev_sample: torch.Tensor | None = None,
    log_prob_convention: str = "exact",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coefficient-preserving sampling step (Flow-CPS, Wang & Yu, 2025), used by Ovis-Image's GRPO.

    The clean and noise estimates `x0 = x - sigma v` and `x1 = x + (1 - sigma) v` are recombined so
    that the next sample keeps the interpolation's coefficients exactly: with `s_noise = sigma_next
    sin(a pi / 2)`, `mean = (1 - sigma_next) x0 + sqrt(sigma_next^2 - s_noise^2) x1` and
    `x' = mean + s_noise eps`. With `a = 0` this is the Euler step.

    Args:
        log_prob_convention (`str`, defaults to `"exact"`): `"exact"` is the Gaussian log-density (0 at
            `sigma_next = 0`, where the step is deterministic), the library's default because the log-ratio of a
            density is what the clipped surrogate and its clip range are defined on. `"flow_grpo"` is Flow-GRPO's
            `-mean((x' - mean)^2)` (no `1 / (2 s_noise^2)`, no constants, also at `sigma_next = 0`), which
            keeps a Flow-GRPO clip range meaningful.

    The other arguments and the returns are as in [`sde_step_with_logprob`]; `std` is `s_noise`.
    """
    _check_convention("log_prob_convention", log_prob_convention)
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
    prev_sample = _sample(mean, std, generator, prev_sample)
    if log_prob_convention == "flow_grpo":
        log_prob = -((prev_sample.detach() - mean) ** 2).mean(dim=tuple(range(1, mean.ndim)))
    else:
        log_prob = gaussian_log_prob(prev_sample.detach(), mean, std)
    return prev_sample, log_prob, mean, std


def _sample(mean: torch.Tensor, std: torch.Tensor, generator: Generator, prev_sample: torch.Tensor | None):
    """A draw from `N(mean, std^2)`, or the given `prev_sample` in float32. The sample is a constant of the
    density (callers detach it): gradients flow through the mean only."""
    if prev_sample is not None:
        return prev_sample.float()
    noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
    return mean + std * noise


def flow_grpo_log_prob(log_prob: torch.Tensor, std: torch.Tensor,
                       squared_error: torch.Tensor | None = None) -> torch.Tensor:
    """Flow-GRPO's CPS log-prob `-mean((x' - mean)^2)` from the exact Gaussian log-density `log_prob` of the same
    transition: `2 s^2 (log_prob + log s + log(2 pi) / 2)`, since `log_prob = -mean((x' - mean)^2) / (2 s^2) - log s
    - log(2 pi) / 2`. One deterministic formula of the recorded and of the recomputed log-prob, so that equal inputs
    give equal outputs and the on-policy ratio stays exactly 1; its gradient is `2 s^2` times the exact one.

    Where `std == 0` (the last CPS step, `sigma_next = 0`) the exact log-prob is 0 and carries no error: pass
    `squared_error` (`mean((x' - mean)^2)`, `[B]`) to get Flow-GRPO's `-squared_error` there (with its gradient),
    else it is 0, which is Flow-GRPO's value for the sampler's own transition (`x' = mean` exactly).

    Args:
        log_prob (`torch.Tensor` of shape `[B]`): exact log-prob (the library's convention).
        std (`torch.Tensor`, scalar or of shape `[B, 1, ...]`): the transition std.
        squared_error (`torch.Tensor` of shape `[B]`, *optional*).

    Returns:
        `torch.Tensor` of shape `[B]`, float32.
    """
    std = _per_sample(std)
    safe = torch.where(std > 0, std, torch.ones_like(std))
    converted = 2 * safe**2 * (log_prob + torch.log(safe) + _HALF_LOG_2PI)
    at_zero = -squared_error if squared_error is not None else torch.zeros_like(converted)
    return torch.where(std > 0, converted, at_zero)


def step_kl(
    mean: torch.Tensor,
    ref_mean: torch.Tensor,
    std: torch.Tensor,
    convention: str = "exact",
    dt: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """KL between the policy's and the reference's Gaussian steps (same std), averaged over all but the batch
    dimension. Returns `[B]`; 0 where `std == 0` (a deterministic step, whose KL Flow-GRPO makes infinite).

    Args:
        mean, ref_mean (`torch.Tensor` of shape `[B, ...]`): the two transition means.
        std (`torch.Tensor`, scalar or of shape `[B, 1, ...]`): the transition std returned by the step.
        convention (`str`, defaults to `"exact"`): `"exact"` is `||mean - ref_mean||^2 / (2 std^2)`, the KL of
            the two transitions, the default because the penalty then weighs each step by what it changes in the
            sampled distribution. `"flow_grpo"` is Flow-GRPO's `||mean - ref_mean||^2 / (2 std_t^2)` with
            `std_t` its noise scale: for the SDE step `std_t = std / sqrt(|dt|)` (pass the step's `dt`), which
            makes it `|dt|` times the exact KL, so Flow-GRPO's `beta` carries over; for the CPS step
            `std_t = std` (leave `dt=None`) and both conventions agree.
        dt (`float` or `torch.Tensor` of shape `[B]`, *optional*): `sigma_next - sigma` of an SDE step, with
            `convention="flow_grpo"` only.
    """
    _check_convention("convention", convention)
    if dt is not None and convention == "exact":
        raise ValueError("step_kl: dt is only used with convention='flow_grpo'; drop it for the exact KL")
    std = _per_sample(std)
    variance = std**2
    if dt is not None:
        variance = variance / torch.as_tensor(dt, dtype=torch.float32, device=std.device).abs()
    squared = ((mean - ref_mean) ** 2).mean(dim=tuple(range(1, mean.ndim)))
    kl = squared / (2 * torch.where(std > 0, variance, torch.ones_like(variance)))
    return torch.where(std > 0, kl, 0.0)


STEP_FUNCTIONS = {"sde": sde_step_with_logprob, "cps": cps_step_with_logprob}
