"""Forward-process RL losses for flow-matching models: DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117) and
Advantage Weighted Matching (AWM, Xue et al. 2025, arXiv 2509.25050). Pure functions over tensors.

Both train on forward-noised copies of the sampled clean latents `x0` (`x_t = (1 - s) x0 + s eps`, target
`u = eps - x0`, see [`~rlhf_image.losses.interpolate`]), so any sampler (ODE included) can produce the rollouts and
no log-probability is needed. Notation: `s` is the noise level (1 = noise), `v` the trained policy's velocity,
`v_old` the velocity of the old (data-collection) policy, `A` the group-relative advantage.

Where the paper leaves a constant open, the authors' code decides (NVlabs/DiffusionNFT `scripts/train_nft_sd3.py`
at commit 24af555, scxue/advantage_weighted_matching `scripts/train_sd3_awm.py` at be51372); line numbers below
refer to those files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .advantages import group_advantages
from .losses import per_sample_mse

AWM_WEIGHTINGS = ("uniform", "sigma", "sigma_sq", "ghuber")


def normalized_advantages(
    rewards: torch.Tensor | Sequence[float | None], group_ids: torch.Tensor, *, clip: float = 5.0, eps: float = 1e-4,
    batch_std: bool = True,
) -> torch.Tensor:
    """`a = clip(A / clip, -1, 1)` with `A = (R - mean_group) / (std_batch + eps)`: the advantage both methods use.

    The group mean is per prompt and the std is over the whole rollout batch (DiffusionNFT Sec. 3.3 "Optimality
    Reward": "`Z_c` ... could take the form of a global reward std"; both codes use `PerPromptStatTracker` with
    `global_std=True`, std + 1e-4). A `None` or non-finite reward is unscored: `a = 0`, and it is left out of
    the group mean and the batch std (see [`~rlhf_image.advantages.group_advantages`]).

    Args:
        rewards (`torch.Tensor` of shape `[N]` or a sequence of `float | None`): total reward per sample.
        group_ids (`torch.Tensor` of shape `[N]`): integer group (prompt) id per sample.
        clip (`float`, defaults to 5.0): `A_max` (`adv_clip_max` in both codes); `A` is clipped to
            `[-clip, clip]` and divided by it.
        eps (`float`, defaults to 1e-4).
        batch_std (`bool`, defaults to `True`): divide by the std of the whole batch (both papers' codes); `False`
            divides by each group's own std (GRPO's default).

    Returns:
        `torch.Tensor` of shape `[N]`, float32, in [-1, 1].
    """
    if not clip > 0:
        raise ValueError(f"clip must be positive, got {clip}")
    if not isinstance(rewards, torch.Tensor):
        rewards = torch.tensor([math.nan if r is None else float(r) for r in rewards], dtype=torch.float64)
    advantages = group_advantages(rewards, group_ids, batch_std=batch_std, eps=eps)
    return (advantages / clip).clamp(-1.0, 1.0)


def optimality_probability(
    rewards: torch.Tensor | Sequence[float | None], group_ids: torch.Tensor, *, clip: float = 5.0, eps: float = 1e-4,
    batch_std: bool = True,
) -> torch.Tensor:
    """DiffusionNFT's optimality probability `r = 1/2 + 1/2 clip((R - mean_group) / Z, -1, 1)` (Sec. 3.3
    "Optimality Reward", Algorithm 1 lines 4-5), with `Z = clip * (std_batch + eps)` as in the code
    (lines 910-929: `r = clamp(clamp(A, -5, 5) / 5 / 2 + 0.5, 0, 1)`). That is `r = (1 + a) / 2` with `a` from
    [`normalized_advantages`]; an unscored sample gets `r = 1/2`, the value of a sample at its group's mean.

    Returns:
        `torch.Tensor` of shape `[N]`, float32, in [0, 1].
    """
    return 0.5 + 0.5 * normalized_advantages(rewards, group_ids, clip=clip, eps=eps, batch_std=batch_std)


def implicit_velocities(
    velocity: torch.Tensor, old_velocity: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The implicit positive and negative policies (DiffusionNFT Theorem 3.2, Eq. 5; code lines 934-937):
    `v+ = (1 - beta) v_old + beta v` and `v- = (1 + beta) v_old - beta v`. `old_velocity` is detached.

    Args:
        velocity, old_velocity (`torch.Tensor` of shape `[B, ...]`).
        beta (`float`): guidance strength `beta > 0` (paper: 1, or 0.1 for faster reward increase).

    Returns:
        `(v_pos, v_neg)`, both `[B, ...]`.
    """
    old = old_velocity.detach()
    return (1 - beta) * old + beta * velocity, (1 + beta) * old - beta * velocity


def adaptive_x0_error(velocity: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor,
                      min_scale: float = 1e-5) -> torch.Tensor:
    """DiffusionNFT's self-normalised x0 regression (Sec. 3.3 "Adaptive Loss Weighting"; code lines 940-957):
    `||x_hat - x0||^2 / sg(mean |x_hat - x0|)` with `x_hat = x_t - s v`. Since `x_t = x0 + s u`,
    `x_hat - x0 = s (u - v)`, so this is `s^2 mean((v - u)^2) / max(s mean |v - u|, min_scale)`.

    Args:
        velocity, target (`torch.Tensor` of shape `[B, ...]`): prediction and `u = eps - x0`.
        sigma (`torch.Tensor` of shape `[B]`): noise level of each row.
        min_scale (`float`, defaults to 1e-5): lower bound of the detached normaliser (code: `clip(min=0.00001)`).

    Returns:
        `torch.Tensor` of shape `[B]`, float32.
    """
    s = sigma.float().reshape(-1, *([1] * (velocity.ndim - 1)))
    error = s * (velocity.float() - target.float())
    dims = tuple(range(1, error.ndim))
    scale = error.detach().abs().mean(dim=dims).clamp_min(min_scale)
    return (error**2).mean(dim=dims) / scale


def nft_loss(
    velocity: torch.Tensor,
    old_velocity: torch.Tensor,
    target: torch.Tensor,
    sigma: torch.Tensor,
    optimality: torch.Tensor,
    beta: float,
    *,
    adaptive_weighting: bool = True,
    loss_scale: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DiffusionNFT loss (Theorem 3.2, Eq. 5; code lines 934-960):
    `loss_scale * mean_b [r_b L(v+_b) + (1 - r_b) L(v-_b)] / beta`.

    `L` is the adaptive x0 error ([`adaptive_x0_error`]) or, with `adaptive_weighting=False`, the plain velocity
    error `mean (v -+ u)^2` (Eq. 5 as written). The division by `beta` is the code's (it keeps the gradient's size
    independent of `beta`); the code also multiplies by `adv_clip_max` (5): pass it as `loss_scale`.
    At `v = v_old` the gradient is `(2 r - 1)` times that of the (weighted) flow-matching error, so `r = 1/2` is
    neutral; with unlimited capacity the minimiser is `v_old + (2 / beta) Delta` (Eq. 6).

    Args:
        velocity (`torch.Tensor` of shape `[B, ...]`): the trained policy's prediction at `(x_t, s)`.
        old_velocity (`torch.Tensor` of shape `[B, ...]`): the old policy's prediction at the same input.
        target (`torch.Tensor` of shape `[B, ...]`): `u = eps - x0`.
        sigma (`torch.Tensor` of shape `[B]`): noise level per row.
        optimality (`torch.Tensor` of shape `[B]`): `r` in [0, 1] ([`optimality_probability`]).
        beta (`float`): guidance strength, > 0.
        adaptive_weighting (`bool`, defaults to `True`).
        loss_scale (`float`, defaults to 1.0).

    Returns:
        `(loss, stats)`: the scalar loss, and detached per-sample `[B]` tensors `positive` (`L(v+)`), `negative`
        (`L(v-)`) and `old_deviation` (`mean (v - v_old)^2`).
    """
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    v_pos, v_neg = implicit_velocities(velocity, old_velocity, beta)
    if adaptive_weighting:
        positive, negative = adaptive_x0_error(v_pos, target, sigma), adaptive_x0_error(v_neg, target, sigma)
    else:
        positive, negative = per_sample_mse(v_pos, target), per_sample_mse(v_neg, target)
    r = optimality.float()
    loss = loss_scale * ((r * positive + (1 - r) * negative) / beta).mean()
    stats = {"positive": positive.detach(), "negative": negative.detach(),
             "old_deviation": per_sample_mse(velocity.detach(), old_velocity.detach())}
    return loss, stats


def awm_error(velocity: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor, weighting: str = "uniform",
              power: float = 0.25) -> torch.Tensor:
    """AWM's per-sample matching error, the negative of its log-likelihood surrogate (AWM code
    `compute_log_prob_awm`, lines 210-252), from `e = mean (v - u)^2`:
    `uniform`: `e`; `sigma`: `s e`; `sigma_sq`: `s^2 e`; `ghuber` (the released configs):
    `s ((e + 1e-10)^p - 1e-10^p) / p` with `p = power`.

    Returns:
        `torch.Tensor` of shape `[B]`, float32.
    """
    error = per_sample_mse(velocity, target)
    s = sigma.float()
    if weighting == "uniform":
        return error
    if weighting == "sigma":
        return s * error
    if weighting == "sigma_sq":
        return s**2 * error
    if weighting == "ghuber":
        if not power > 0:
            raise ValueError(f"ghuber power must be positive, got {power}")
        return s * ((error + 1e-10) ** power - 1e-10**power) / power
    raise ValueError(f"unknown AWM weighting {weighting!r}; use one of {AWM_WEIGHTINGS}")


def awm_loss(velocity: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor, advantages: torch.Tensor,
             weighting: str = "uniform", power: float = 0.25) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Advantage Weighted Matching: `mean_b A_b E_w(v_b, u_b)`, the flow-matching error weighted by the advantage
    (`A` in [-1, 1], [`normalized_advantages`]; code lines 1292-1330 with `advantage_max = 1`).

    The code writes it as a PPO surrogate `mean(max(-A rho, -A clip(rho, 1 - c, 1 + c)))` with
    `rho = exp(-E_w + sg(E_w))`: its updates are on-policy (the old log-prob is the current one, detached), so
    `rho = 1` and the gradient is exactly that of this loss, whose value is informative (theirs is `-mean A`).

    Returns:
        `(loss, stats)` with the detached per-sample error `error` `[B]`.
    """
    error = awm_error(velocity, target, sigma, weighting, power)
    return (advantages.float() * error).mean(), {"error": error.detach()}


def old_policy_decay(step: int, *, rate: float = 0.001, max_decay: float = 0.5, flat_steps: int = 0) -> float:
    """The soft-update decay `eta` of the old policy after `step` optimizer steps (DiffusionNFT Sec. 3.3 "Soft
    Update", Appendix C: `eta_i = min(0.001 i, 0.5)`; code `return_decay`, lines 169-189: `0` before `flat_steps`,
    then `min(rate (step - flat_steps), max_decay)`; its OCR schedule is `flat_steps=75, rate=0.0075,
    max_decay=0.999`). `eta = 0` makes the old policy a copy of the current one (on-policy). The update itself,
    `old <- eta old + (1 - eta) param` (Algorithm 1 line 14; code lines 1034-1039), is
    [`~rlhf_image.ema.EMAModel.update`]."""
    if step < 0 or rate < 0 or not 0 <= max_decay < 1 or flat_steps < 0:
        raise ValueError(f"need step >= 0, rate >= 0, 0 <= max_decay < 1, flat_steps >= 0; got step={step}, "
                         f"rate={rate}, max_decay={max_decay}, flat_steps={flat_steps}")
    return 0.0 if step < flat_steps else min(rate * (step - flat_steps), max_decay)


def random_schedule_sigmas(sigmas: torch.Tensor, batch_size: int, count: int,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """DiffusionNFT's training noise levels: for each sample, `count` distinct steps of the sampling schedule in
    random order (Appendix C: "performed exactly on the corresponding sampling timesteps"; code lines 569 and
    807-816: a per-sample permutation of the `T` steps, of which `int(0.99 T)` are trained).

    Args:
        sigmas (`torch.Tensor` of shape `[T + 1]`): the schedule, ending at 0 (not trained on).
        batch_size (`int`), count (`int`, 1 <= count <= T).
        generator (`torch.Generator`, *optional*).

    Returns:
        `torch.Tensor` of shape `[count, batch_size]`: row `j` holds the noise levels of the `j`-th trained pass.
    """
    steps = sigmas.numel() - 1
    if not 1 <= count <= steps:
        raise ValueError(f"count must be in [1, {steps}] (steps of the schedule), got {count}")
    order = torch.stack([torch.randperm(steps, generator=generator)[:count] for _ in range(batch_size)], dim=1)
    return sigmas[order]


def stratified_schedule_sigmas(sigmas: torch.Tensor, count: int, low: int, high: int,
                               generator: torch.Generator | None = None) -> torch.Tensor:
    """AWM's training noise levels (code `time_type="discrete_wo_init"`, lines 1197-1205): the step indices
    `[low, high]` are cut into `count` strata at `floor(linspace(low, high, count + 1))` and one index is drawn
    uniformly from each stratum `[lower, upper)` (so `high` itself is never drawn); the same for every sample of
    a micro-batch. The released configs use 14 steps, `low = 1`, `high = int(0.9 * 14) = 12`, `count = 6`.

    Returns:
        `torch.Tensor` of shape `[count]`: the schedule's noise levels at the drawn indices.
    """
    steps = sigmas.numel() - 1
    if not (0 <= low < high <= steps and 1 <= count <= high - low):
        raise ValueError(f"need 0 <= low < high <= {steps} and 1 <= count <= high - low; got low={low}, high={high}, "
                         f"count={count}")
    bounds = torch.linspace(low, high, count + 1).long()
    lower, upper = bounds[:-1], bounds[1:]
    index = lower + (torch.rand(count, generator=generator) * (upper - lower)).long()
    return sigmas[index]
