"""The Diffusion-SDPO safeguard: the closed-form scale, its two gradient spaces against independent autograd
computations, and, on a real tiny transformer, a step where plain DPO raises the winner's error while the
safeguarded step does not."""

import copy

import pytest
import torch

from rlhf_image.losses import dpo_loss, interpolate, per_sample_mse
from rlhf_image.model_io import frozen_copy, reference_transformer
from rlhf_image.policy import Conditioning, FlowPolicy
from rlhf_image.sdpo import (output_space_loser_scale, parameter_space_loser_scale, safe_loser_scale,
                             scale_gradient)
from tiny_models import tiny_ovis_pipeline


def test_safe_loser_scale_closed_form():
    t = torch.tensor
    # Conflict (<g_w, g_l> > 0): lambda = (1 - mu) ||g_w||^2 / <g_w, g_l>.
    assert safe_loser_scale(t(2.0), t(8.0), mu=0.5).item() == pytest.approx(0.125)
    assert safe_loser_scale(t(2.0), t(8.0), mu=0.0).item() == pytest.approx(0.25)
    # Clipped to lambda_max when the cap is large, to lambda_min from below.
    assert safe_loser_scale(t(2.0), t(1.0), mu=0.0).item() == 1.0
    assert safe_loser_scale(t(2.0), t(1.0), mu=0.0, lambda_max=1.5).item() == 1.5
    assert safe_loser_scale(t(2.0), t(8.0), mu=0.9, lambda_min=0.1).item() == pytest.approx(0.1)
    # No conflict (<g_w, g_l> <= 0): any lambda is safe, the loser keeps lambda_max.
    assert safe_loser_scale(t(2.0), t(-3.0), mu=0.9).item() == 1.0
    assert safe_loser_scale(t(2.0), t(0.0), mu=0.9, lambda_max=0.7).item() == pytest.approx(0.7)
    # mu = 1 asks the whole winner decrease to survive: the conflicting loser is switched off.
    assert safe_loser_scale(t(2.0), t(8.0), mu=1.0).item() == 0.0


def test_scale_gradient_keeps_value_and_scales_backward():
    x = torch.tensor([1.5, -2.0], requires_grad=True)
    y = scale_gradient(x * 3, 0.25)
    assert torch.equal(y.detach(), torch.tensor([4.5, -6.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.75, 0.75]))


def test_output_space_scale_matches_autograd_of_the_errors():
    generator = torch.Generator().manual_seed(1)
    v_w, u_w, u_l = (torch.randn(3, 4, 8, 8, generator=generator) for _ in range(3))
    v_l = 0.5 * v_w + 0.3 * torch.randn(3, 4, 8, 8, generator=generator) + (u_l - u_w)
    # Independent computation, as in the paper's code: autograd of A = mean (v_w - u_w)^2, B likewise.
    pred_w, pred_l = v_w.clone().requires_grad_(True), v_l.clone().requires_grad_(True)
    (g_a,) = torch.autograd.grad(((pred_w - u_w) ** 2).mean(), pred_w)
    (g_b,) = torch.autograd.grad(((pred_l - u_l) ** 2).mean(), pred_l)
    dot, sq = (g_a * g_b).sum(), (g_a * g_a).sum()
    assert dot > 0  # the construction conflicts
    expected = min(1.0, max(0.0, (1 - 0.3) * sq.item() / (dot.item() + 1e-9)))
    got = output_space_loser_scale(v_w, u_w, v_l, u_l, mu=0.3)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert 0 < got.item() < 1


def _pair_problem(loser_offset: float):
    """One pair on the tiny Ovis transformer: the loser is the winner moved along the winner's own residual,
    so the loser's residual is about `(1 + loser_offset)` times the winner's and their gradients conflict."""
    pipe = tiny_ovis_pipeline()
    policy = FlowPolicy.from_pipeline(pipe, max_sequence_length=16)
    policy.transformer.requires_grad_(True)
    reference = frozen_copy(policy.transformer)
    generator = torch.Generator().manual_seed(0)
    x0_w = torch.randn(1, 4, 8, 8, generator=generator)
    noise = torch.randn(1, 4, 8, 8, generator=generator)
    sigma = torch.tensor([0.5])
    cond = policy.encode_prompt(["a red square"])
    with torch.no_grad():
        x_t, target = interpolate(x0_w, noise, sigma)
        residual = policy.predict_velocity(x_t, sigma, cond) - target
    x0 = torch.cat([x0_w, x0_w + loser_offset * residual])
    x_t, target = interpolate(x0, torch.cat([noise, noise]), torch.cat([sigma, sigma]))
    return policy, reference, (x_t, torch.cat([sigma, sigma]), Conditioning.cat([cond, cond]), target)


def _errors(policy, batch, transformer=None):
    x_t, sigma, cond, target = batch
    return per_sample_mse(policy.predict_velocity(x_t, sigma, cond, transformer=transformer), batch[3]).chunk(2)


def _one_sgd_step(policy, reference, batch, safeguard: str | None, mu: float, lr: float):
    """Winner and loser errors before/after one SGD step on the (safeguarded) DPO loss; and lambda."""
    policy = copy.copy(policy)
    policy.transformer = copy.deepcopy(policy.transformer)
    params = [p for p in policy.transformer.parameters() if p.requires_grad]
    err_w, err_l = _errors(policy, batch)
    with torch.no_grad(), reference_transformer(policy.transformer, reference) as ref:
        ref_w, ref_l = _errors(policy, batch, transformer=ref)
    scale = None
    if safeguard == "output":
        x_t, sigma, cond, target = batch
        with torch.no_grad():
            v_w, v_l = policy.predict_velocity(x_t, sigma, cond).chunk(2)
        scale = output_space_loser_scale(v_w, target[:1], v_l, target[1:], mu=mu)
    elif safeguard == "parameter":
        scale = parameter_space_loser_scale(err_w, err_l, params, mu=mu)
    loss, _ = dpo_loss(err_w, err_l if scale is None else scale_gradient(err_l, scale), ref_w, ref_l, beta=100.0)
    loss.backward()
    with torch.no_grad():
        for p in params:
            p -= lr * p.grad
        new_w, new_l = _errors(policy, batch)
    return err_w.item(), new_w.item(), err_l.item(), new_l.item(), None if scale is None else scale.item()


@pytest.mark.parametrize("loser_offset, lr", [(1.0, 1e-4), (0.5, 1e-3)])
def test_safeguard_keeps_the_winner_error_from_rising(loser_offset, lr):
    policy, reference, batch = _pair_problem(loser_offset)
    w0, w1, l0, l1, _ = _one_sgd_step(policy, reference, batch, None, mu=0.5, lr=lr)
    assert w1 > w0, "the construction must make plain DPO raise the winner's error"
    assert l1 > l0
    for space in ("output", "parameter"):
        sw0, sw1, _, _, scale = _one_sgd_step(policy, reference, batch, space, mu=0.5, lr=lr)
        assert sw0 == w0
        assert 0 < scale < 1, space
        assert sw1 <= sw0, f"{space}-space SDPO raised the winner error {sw0} -> {sw1}"


def test_parameter_space_safeguard_is_first_order_tight_at_mu_zero():
    # mu = 0 asks only d(winner error) <= 0 to first order: the change is second order, far below plain DPO's.
    policy, reference, batch = _pair_problem(1.0)
    w0, w1, *_ = _one_sgd_step(policy, reference, batch, None, mu=0.0, lr=1e-4)
    s0, s1, _, _, scale = _one_sgd_step(policy, reference, batch, "parameter", mu=0.0, lr=1e-4)
    assert 0 < scale < 1
    assert abs(s1 - s0) < 0.05 * (w1 - w0)


def test_parameter_space_scale_matches_manual_gradients():
    policy, reference, batch = _pair_problem(1.0)
    params = [p for p in policy.transformer.parameters() if p.requires_grad]
    err_w, err_l = _errors(policy, batch)
    scale = parameter_space_loser_scale(err_w, err_l, params, mu=0.2)
    # Independent: two full backward passes into .grad and flat vectors.
    policy.transformer.zero_grad()
    err_w.sum().backward(retain_graph=True)
    g_w = torch.cat([p.grad.flatten().clone() for p in params])
    policy.transformer.zero_grad()
    err_l.sum().backward()
    g_l = torch.cat([p.grad.flatten().clone() for p in params])
    expected = min(1.0, 0.8 * g_w.dot(g_w).item() / g_w.dot(g_l).item())
    assert g_w.dot(g_l).item() > 0
    assert scale.item() == pytest.approx(expected, rel=1e-4)
