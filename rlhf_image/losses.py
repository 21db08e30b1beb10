"""Training losses for flow-matching models: the rectified-flow loss (pretraining/SFT), the clipped
GRPO surrogate with GRPO-Guard's ratio normalisation and step weights, and Flow-DPO. Each is a pure function
over tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def interpolate(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rectified-flow path and its velocity target.

    Args:
        x0 (`torch.Tensor` of shape `[B, ...]`): clean latents.
        noise (`torch.Tensor` of shape `[B, ...]`): standard normal noise `eps`.
        sigma (`torch.Tensor` of shape `[B]`): noise level in [0, 1].

    Returns:
        `(x_t, target)`: `x_t = (1 - sigma) x0 + sigma eps` and `target = eps - x0`, both `[B, ...]`.
    """
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise, noise - x0


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`mean ||pred - target||^2` over all but the batch dimension, in float32. Returns `[B]`."""
    return ((pred.float() - target.float()) ** 2).mean(dim=tuple(range(1, pred.ndim)))


def flow_matching_loss(
    velocity: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Rectified-flow loss `mean_b w_b ||v_b - (eps_b - x0_b)||^2`.

    Args:
        velocity, target (`torch.Tensor` of shape `[B, ...]`): prediction and `eps - x0`.
        weights (`torch.Tensor` of shape `[B]`, *optional*): per-sample loss weights (for example
            from [`~rlhf_image.schedule.loss_weighting`]); defaults to 1.
    """
    errors = per_sample_mse(velocity, target)
    if weights is not None:
        errors = errors * weights.float()
    return errors.mean()


def grpo_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip surrogate on one denoising step (Flow-GRPO): `mean(max(-A r, -A clip(r, 1-e, 1+e)))` with
    `r = exp(log_prob - old_log_prob)`.

    Args:
        log_prob (`torch.Tensor` of shape `[B]`): log-prob of the recorded transition under the policy.
        old_log_prob (`torch.Tensor` of shape `[B]`): log-prob recorded when sampling.
        advantages (`torch.Tensor` of shape `[B]`).
        clip_range (`float`): `epsilon`.

    Returns:
        `(loss, stats)` as in [`clipped_surrogate`].
    """
    return clipped_surrogate(log_prob - old_log_prob, advantages, clip_range)


def clipped_surrogate(
    log_ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`mean(max(-A r, -A clip(r, 1-e, 1+e)))` with `r = exp(log_ratio)`: [`grpo_loss`] on a given log-ratio (for
    example GRPO-Guard's, [`guard_log_ratio`]).

    Args:
        log_ratio, advantages (`torch.Tensor` of shape `[B]`).
        clip_range (`float`): `epsilon`.

    Returns:
        `(loss, stats)` with the ratio, the clipped fraction and the approximate KL
        `0.5 (log r)^2` (Schulman's k2 estimator) as detached tensors.
    """
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    stats = {
        "ratio": ratio.detach(),
        "clip_frac": ((ratio - 1.0).abs() > clip_range).float().detach(),
        "approx_kl": (0.5 * log_ratio**2).detach(),
    }
    return loss, stats


def guard_log_ratio(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    mean: torch.Tensor,
    old_mean: torch.Tensor,
    std: torch.Tensor,
) -> torch.Tensor:
    """GRPO-Guard's normalised log-ratio (Wang et al., 2025, arXiv 2510.22319, eq. 8, "RatioNorm") of a Gaussian
    step with the same std under both policies: `s (log r + ||mean - old_mean||^2 / (2 s^2))`, `s = std`.

    With `x' = old_mean + s eps`, `log r = <eps, d> / s - ||d||^2 / (2 s^2)` for `d = mean - old_mean`
    (norms and inner products are means over the latent dimensions, as the log-probs are): its mean is negative
    and its spread grows as `s` shrinks, so the clip range bites unevenly across steps. The normalised
    log-ratio is `<eps, d>`: centred on 0 at every step. On-policy (`mean == old_mean` bit for bit) it is exactly
    0, so the ratio is exactly 1. It needs the exact Gaussian log-probs (`log_prob_convention="exact"`) and the
    means recorded when sampling; it is 0 where `std == 0`.

    Args:
        log_prob, old_log_prob (`torch.Tensor` of shape `[B]`): log-probs of the recorded transition under the
            policy and when sampling.
        mean, old_mean (`torch.Tensor` of shape `[B, ...]`): the transition means under the policy and when
            sampling.
        std (`torch.Tensor`, scalar or of shape `[B, 1, ...]`): the transition std (the step's `std`).

    Returns:
        `torch.Tensor` of shape `[B]`, to pass to [`clipped_surrogate`].
    """
    std = std if std.ndim == 0 else std.reshape(std.shape[0])
    squared = ((mean - old_mean) ** 2).mean(dim=tuple(range(1, mean.ndim)))
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    normalised = safe_std * (log_prob - old_log_prob + squared / (2 * safe_std**2))
    return torch.where(std > 0, normalised, 0.0)


def guard_loss_weight(sigma: torch.Tensor | float, sigma_next: torch.Tensor | float) -> torch.Tensor:
    """GRPO-Guard's gradient reweighting (arXiv 2510.22319, eq. 12) for Flow-GRPO's SDE step: the step's loss is
    multiplied by `1 / |dt|`, `dt = sigma_next - sigma`.

    The gradient of the normalised log-ratio [`guard_log_ratio`] with respect to the velocity is
    `eps (1 + a^2 / 2) dt` for that step (its mean is `x + (1 + a^2 / 2) v dt + ...`), so without the weight
    steps with a large `|dt|` dominate the update; `1 + a^2 / 2` is the same at every step and is left out.

    Returns:
        `torch.Tensor`, scalar or of shape `[B]` (as `sigma`), float32.
    """
    dt = torch.as_tensor(sigma_next, dtype=torch.float32) - torch.as_tensor(sigma, dtype=torch.float32)
    if not bool((dt < 0).all()):
        raise ValueError(f"guard_loss_weight: need sigma_next < sigma (a denoising step), got dt = {dt.tolist()}")
    return 1.0 / dt.abs()


def dpo_loss(
    policy_chosen_err: torch.Tensor,
    policy_rejected_err: torch.Tensor,
    ref_chosen_err: torch.Tensor,
    ref_rejected_err: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow-DPO (Diffusion-DPO, Wallace et al. 2024, with velocity errors):
    `-log sigmoid(-beta / 2 [(e_theta(w) - e_ref(w)) - (e_theta(l) - e_ref(l))])`.

    Args:
        *_err (`torch.Tensor` of shape `[B]`): per-sample `mean ||v - u||^2` of policy and reference on
            the chosen (w) and rejected (l) images, noised with the same noise and sigma.
        beta (`float`): inverse temperature.

    Returns:
        `(loss, logits)`: the mean loss and the per-pair implicit reward margin
        `-beta / 2 [...]` (`[B]`); the pair is ranked correctly where the margin is > 0.
    """
    chosen_diff = policy_chosen_err - ref_chosen_err
    rejected_diff = policy_rejected_err - ref_rejected_err
    logits = -0.5 * beta * (chosen_diff - rejected_diff)
    return -F.logsigmoid(logits).mean(), logits
