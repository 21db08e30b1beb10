"""The Diffusion-SDPO safeguard (Fu et al. 2025, arXiv 2511.03317; used by Ovis-Image's DPO stage).

Notation: `A` is the winner's (chosen) error and `B` the loser's (rejected) error of the policy,
`A = mean_i e_theta(w_i)`, `B = mean_i e_theta(l_i)`, with `e = mean ||v - (eps - x0)||^2` per sample. The
Flow-DPO loss `L = -log sigmoid(-beta / 2 [(A_i - A_ref) - (B_i - B_ref)])` increases with the winner error and
decreases with the loser error; for one pair its gradient is `c (grad A - grad B)` with
`c = beta / 2 * sigmoid(-margin) > 0`. SDPO multiplies the loser branch's gradient by `lambda >= 0`, so an SGD
step is `d theta = -eta c (grad A - lambda grad B)` and, to first order,

    d A = <grad A, d theta> = -eta c (||grad A||^2 - lambda <grad A, grad B>).

Asking the step to decrease `A` by at least `mu` times what the winner gradient alone would
(`d A <= -eta c mu ||grad A||^2`, `mu` in [0, 1]) gives `lambda <grad A, grad B> <= (1 - mu) ||grad A||^2`:

    lambda = clip((1 - mu) ||g_A||^2 / (<g_A, g_B> + eps), lambda_min, lambda_max)   if <g_A, g_B> > 0
    lambda = lambda_max                                                                otherwise

(when the two gradients do not conflict any `lambda >= 0` is safe). This is the rule of the official code
(AIDC-AI/Diffusion-SDPO, `get_adaptive_lose_l_scale`, `lambda_max = 1`). Note: DESIGN.md writes the coefficient as
`clip(mu <g_w, g_l> / (||g_l||^2 + eps), ...)`; that is not the paper's coefficient (it is the projection of
`g_w` on `g_l`, which is also first-order safe by Cauchy-Schwarz but switches the loser off exactly when the
gradients do not conflict). We follow the paper's code.

Which gradients:
- `output` space (the paper's practical form, no extra backward pass): `g_A = dA / dv_w` and `g_B = dB / dv_l`,
  the gradients of the two errors w.r.t. the *predicted velocities* of the winner and loser rows, i.e.
  `2 (v_w - u_w) / n` and `2 (v_l - u_l) / n`; their inner product pairs each winner row with its own loser row.
  It stands for the parameter-space product `<J_w^T g_A, J_l^T g_B>` when `J_w J_l^T` is close to a multiple of
  the identity (winner and loser share noise, sigma and prompt; the multiple cancels in the ratio).
- `parameter` space (exact first-order condition, two extra backward passes): `g_A = grad_theta A` and
  `g_B = grad_theta B` over the trainable parameters.
Sign conventions: both are gradients of the *errors* (not of the loss), so `<g_A, g_B> > 0` means that pushing the
loser's error up also pushes the winner's error up: the conflict SDPO guards against. Detach rules: `lambda` is
computed from detached values and carries no gradient; it scales the loser branch through
[`scale_gradient`] (forward value unchanged, backward multiplied by `lambda`), so the logged loss is the plain
DPO loss. One `lambda` per micro-batch, with the unweighted means `A` and `B` as in the official code; the
first-order guarantee is exact for the DPO update when the pairs' sigmoid weights `c_i` are equal (a single pair,
or the first step from the reference). Under data parallelism each rank computes `lambda` on its micro-batch.
"""

from __future__ import annotations

import torch


def safe_loser_scale(
    winner_sq_norm: torch.Tensor,
    winner_dot_loser: torch.Tensor,
    mu: float,
    lambda_min: float = 0.0,
    lambda_max: float = 1.0,
    eps: float = 1e-9,
) -> torch.Tensor:
    """The SDPO loser scale from `||g_A||^2` and `<g_A, g_B>` (scalars): see the module docstring.

    Returns:
        `torch.Tensor` (0-dim, float32, detached) in `[lambda_min, lambda_max]`.
    """
    sq_norm = winner_sq_norm.detach().float()
    dot = winner_dot_loser.detach().float()
    capped = (1.0 - mu) * sq_norm / (dot + eps)
    scale = torch.where(dot > 0, capped, torch.full_like(capped, lambda_max))
    return scale.clamp(min=lambda_min, max=lambda_max)


def output_space_loser_scale(
    velocity_w: torch.Tensor,
    target_w: torch.Tensor,
    velocity_l: torch.Tensor,
    target_l: torch.Tensor,
    mu: float,
    lambda_min: float = 0.0,
    lambda_max: float = 1.0,
    eps: float = 1e-9,
) -> torch.Tensor:
    """SDPO scale with gradients w.r.t. the predicted velocities.

    Args:
        velocity_w, velocity_l (`torch.Tensor` of shape `[B, C, h, w]`): policy velocities of the winner and loser
            rows (detached here).
        target_w, target_l (`torch.Tensor` of shape `[B, C, h, w]`): their targets `eps - x0`.
        mu, lambda_min, lambda_max, eps: see [`safe_loser_scale`].

    Returns:
        `torch.Tensor` (0-dim, float32).
    """
    n = velocity_w.numel()
    # Closed-form gradients of A = mean((v_w - u_w)^2) and B = mean((v_l - u_l)^2) w.r.t. v_w and v_l.
    grad_a = 2.0 * (velocity_w.detach().float() - target_w.float()) / n
    grad_b = 2.0 * (velocity_l.detach().float() - target_l.float()) / n
    return safe_loser_scale((grad_a * grad_a).sum(), (grad_a * grad_b).sum(), mu, lambda_min, lambda_max, eps)


def parameter_space_loser_scale(
    winner_error: torch.Tensor,
    loser_error: torch.Tensor,
    params: list[torch.nn.Parameter],
    mu: float,
    lambda_min: float = 0.0,
    lambda_max: float = 1.0,
    eps: float = 1e-9,
) -> torch.Tensor:
    """SDPO scale with gradients w.r.t. the trainable parameters (two extra backward passes; the graph is kept
    for the loss's own backward).

    Args:
        winner_error, loser_error (`torch.Tensor` of shape `[B]`): per-pair policy errors `e_theta(w)`, `e_theta(l)`,
            still attached to the graph.
        params (`list[torch.nn.Parameter]`): the trainable parameters.
        mu, lambda_min, lambda_max, eps: see [`safe_loser_scale`].

    Returns:
        `torch.Tensor` (0-dim, float32).
    """
    grads_a = torch.autograd.grad(winner_error.mean(), params, retain_graph=True, allow_unused=True)
    grads_b = torch.autograd.grad(loser_error.mean(), params, retain_graph=True, allow_unused=True)
    sq_norm = winner_error.new_zeros((), dtype=torch.float32)
    dot = winner_error.new_zeros((), dtype=torch.float32)
    for ga, gb in zip(grads_a, grads_b):
        if ga is None:
            continue
        sq_norm = sq_norm + (ga.float() * ga.float()).sum()
        if gb is not None:
            dot = dot + (ga.float() * gb.float()).sum()
    return safe_loser_scale(sq_norm, dot, mu, lambda_min, lambda_max, eps)


def scale_gradient(values: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """`values` in the forward pass, `scale * d values` in the backward pass (the SDPO detach trick)."""
    detached = values.detach()
    return detached + scale * (values - detached)
