"""Losses and advantages against hand computations."""

import math

import numpy as np
import pytest
import torch

from rlhf_image.advantages import group_advantages
from rlhf_image.losses import dpo_loss, flow_matching_loss, grpo_loss, interpolate


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
