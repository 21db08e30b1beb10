"""Losses and advantages against hand computations."""

import math

import numpy as np
import pytest
import torch

from rlhf_image.advantages import group_advantages
from rlhf_image.losses import (clipped_surrogate, dpo_loss, flow_matching_loss, grpo_loss, guard_log_ratio,
                               guard_loss_weight, interpolate)
from rlhf_image.sde import gaussian_log_prob


def test_interpolation_and_flow_matching_loss():
    x0, eps = torch.ones(2, 1, 2, 2), torch.full((2, 1, 2, 2), 3.0)
    x_t, target = interpolate(x0, eps, torch.tensor([0.25, 1.0]))
    assert torch.equal(x_t[0], torch.full((1, 2, 2), 1.5)) and torch.equal(x_t[1], eps[1])
    assert torch.equal(target, eps - x0)
    v = target + torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)
    assert flow_matching_loss(v, target).item() == pytest.approx((1 + 4) / 2)
    assert flow_matching_loss(v, target, torch.tensor([2.0, 0.5])).item() == pytest.approx((2 + 2) / 2)


def test_grpo_loss_clipping():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.0, 1.5, 0.5, 1.1]))
    adv = torch.tensor([1.0, 1.0, -1.0, -2.0])
    loss, stats = grpo_loss(new, old, adv, clip_range=0.2)
    r = torch.tensor([1.0, 1.5, 0.5, 1.1])
    expected = torch.maximum(-adv * r, -adv * r.clamp(0.8, 1.2)).mean()
    assert loss.item() == pytest.approx(expected.item())
    # By hand: [-1, -1.2, 0.8, 2.2] -> mean 0.2
    assert loss.item() == pytest.approx(0.2)
    assert stats["clip_frac"].tolist() == [0.0, 1.0, 1.0, 0.0]


def test_grpo_loss_on_policy_gradient_is_advantage_weighted_score():
    log_prob = torch.tensor([0.3, -0.2], requires_grad=True)
    loss, stats = grpo_loss(log_prob, log_prob.detach(), torch.tensor([2.0, -1.0]), 0.2)
    loss.backward()
    assert torch.equal(stats["ratio"], torch.ones(2))
    torch.testing.assert_close(log_prob.grad, torch.tensor([-1.0, 0.5]))


def test_dpo_loss_hand_computation_and_log2():
    pw, pl, rw, rl = torch.tensor([0.10]), torch.tensor([0.30]), torch.tensor([0.12]), torch.tensor([0.28])
    loss, margin = dpo_loss(pw, pl, rw, rl, beta=100.0)
    inner = -100.0 / 2 * ((0.10 - 0.12) - (0.30 - 0.28))  # = 2.0
    assert margin.item() == pytest.approx(inner, rel=1e-5)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-inner))), rel=1e-5)
    same, _ = dpo_loss(pw, pl, pw, pl, beta=100.0)
    assert same.item() == pytest.approx(math.log(2))


def test_group_advantages_formula():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 1.0, 5.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv = group_advantages(rewards, groups)
    expected = []
    for g in (rewards[:4].numpy(), rewards[4:].numpy()):
        expected.extend((g - g.mean()) / (g.std() + 1e-4))
    np.testing.assert_allclose(adv.numpy(), np.array(expected), rtol=1e-5)
    clipped = group_advantages(rewards, groups, clip=1.0)
    assert clipped.abs().max() <= 1.0
    batch = group_advantages(rewards, groups, batch_std=True)
    np.testing.assert_allclose(batch[:4].numpy(), (rewards[:4] - 2.5).numpy() / (rewards.numpy().std() + 1e-4), rtol=1e-5)


def test_unscored_samples_get_zero_and_do_not_poison_the_group():
    rewards = torch.tensor([1.0, float("nan"), 3.0, 5.0, float("nan"), 2.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    adv = group_advantages(rewards, groups)
    scored = np.array([1.0, 3.0, 5.0])
    np.testing.assert_allclose(adv[[0, 2, 3]].numpy(), (scored - 3.0) / (scored.std() + 1e-4), rtol=1e-5)
    assert adv[1] == 0 and adv[4] == 0 and adv[5] == 0  # group 1 has one scored sample: no signal
    assert torch.isfinite(adv).all()


def test_clipped_surrogate_is_grpo_loss_on_the_log_ratio():
    g = torch.Generator().manual_seed(0)
    new, old, adv = torch.randn(8, generator=g), torch.randn(8, generator=g), torch.randn(8, generator=g)
    loss, stats = grpo_loss(new, old, adv, 0.3)
    loss2, stats2 = clipped_surrogate(new - old, adv, 0.3)
    assert torch.equal(loss, loss2) and all(torch.equal(stats[k], stats2[k]) for k in stats)


def test_guard_log_ratio_hand_computed():
    # One sample, two latent dims: old mean 0, x' = (0.5, 0.25), std s = 0.5 (eps = (1, 0.5)), d = (0.2, 0.1).
    x, old_mean, mean = torch.tensor([[0.5, 0.25]]), torch.zeros(1, 2), torch.tensor([[0.2, 0.1]])
    std = torch.tensor(0.5)
    log_prob, old_log_prob = gaussian_log_prob(x, mean, std), gaussian_log_prob(x, old_mean, std)
    # log r = mean((x' - old)^2 - (x' - mean)^2) / (2 s^2) = mean(0.25 - 0.09, 0.0625 - 0.0225) / 0.5 = 0.2
    assert (log_prob - old_log_prob).item() == pytest.approx(0.2, abs=1e-6)
    # eq. 8: s (log r + mean(d^2) / (2 s^2)) = 0.5 (0.2 + 0.025 / 0.5) = 0.125 = mean(eps * d) = (0.2 + 0.05) / 2
    normalised = guard_log_ratio(log_prob, old_log_prob, mean, old_mean, std)
    assert normalised.item() == pytest.approx(0.125, abs=1e-6)


def test_guard_log_ratio_is_centred_exact_on_policy_and_has_the_noise_as_gradient():
    g = torch.Generator().manual_seed(1)
    b, dims, std = 4, 512, torch.tensor([0.3, 0.1, 0.05, 0.0]).view(4, 1)
    old_mean = torch.randn(b, dims, generator=g)
    noise = torch.randn(b, dims, generator=g)
    x = old_mean + std * noise
    mean = (old_mean + 0.02 * torch.randn(b, dims, generator=g)).requires_grad_(True)
    log_prob, old_log_prob = gaussian_log_prob(x, mean, std), gaussian_log_prob(x, old_mean, std)
    normalised = guard_log_ratio(log_prob, old_log_prob, mean, old_mean, std)
    d = (mean - old_mean).detach()
    torch.testing.assert_close(normalised[:3], (noise * d).mean(dim=1)[:3], rtol=1e-4, atol=1e-7)
    assert normalised[3] == 0  # std == 0: no density, ratio 1
    normalised[:3].sum().backward()
    torch.testing.assert_close(mean.grad[:3], noise[:3] / dims, rtol=1e-4, atol=1e-7)
    # Over the sampling noise the plain log-ratio has mean -mean(d^2) / (2 s^2) < 0 (the left shift), the
    # normalised one mean 0: 4000 draws of one transition, checked within 5 standard errors.
    draws, s, d = 4000, 0.1, 0.02 * torch.randn(1, 64, generator=g)
    x = s * torch.randn(draws, 64, generator=g)
    zeros = torch.zeros(draws, 64)
    std = torch.tensor(s)
    log_ratio = gaussian_log_prob(x, d.expand(draws, 64), std) - gaussian_log_prob(x, zeros, std)
    centred = guard_log_ratio(log_ratio, torch.zeros(draws), d.expand(draws, 64), zeros, std)
    shift, error = -(d**2).mean() / (2 * s**2), log_ratio.std() / draws**0.5
    assert abs(log_ratio.mean() - shift) < 5 * error and shift < -5 * error
    assert abs(centred.mean()) < 5 * centred.std() / draws**0.5
    # On-policy (the recorded mean recomputed bit for bit) the normalised log-ratio is exactly 0.
    same = guard_log_ratio(old_log_prob, old_log_prob, old_mean, old_mean.clone(), std)
    assert torch.equal(same, torch.zeros(b))


def test_guard_loss_weight_is_inverse_step_size():
    assert guard_loss_weight(0.8, 0.6).item() == pytest.approx(5.0)
    torch.testing.assert_close(guard_loss_weight(torch.tensor([1.0, 0.25]), torch.tensor([0.9, 0.0])),
                               torch.tensor([10.0, 4.0]))
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        guard_loss_weight(0.5, 0.5)
