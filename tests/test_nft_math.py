"""DiffusionNFT and AWM math (rlhf_image.nft) against hand computations and the papers' theorems."""

import math

import pytest
import torch

from rlhf_image.losses import flow_matching_loss
from rlhf_image.nft import (adaptive_x0_error, awm_error, awm_loss, implicit_velocities, nft_loss,
                            normalized_advantages, old_policy_decay, optimality_probability, random_schedule_sigmas,
                            stratified_schedule_sigmas)
from rlhf_image.ema import EMAModel


def test_optimality_probability_hand_values():
    # Group means 1 and 1; batch std of [0, 2, 0, 2] is 1; A = +-1 / (1 + 1e-4).
    groups = torch.tensor([0, 0, 1, 1])
    r = optimality_probability(torch.tensor([0.0, 2.0, 0.0, 2.0]), groups, clip=5.0)
    a = 1 / 1.0001 / 5
    torch.testing.assert_close(r, torch.tensor([0.5 - a / 2, 0.5 + a / 2] * 2))
    # A small clip saturates: r is exactly 0 or 1.
    assert optimality_probability(torch.tensor([0.0, 2.0, 0.0, 2.0]), groups, clip=0.5).tolist() == [0, 1, 0, 1]
    assert torch.equal(normalized_advantages(torch.tensor([0.0, 2.0, 0.0, 2.0]), groups, clip=5.0) * 0.5 + 0.5, r)


def test_optimality_probability_uses_the_batch_std_not_the_group_std():
    # Group 0 spread 1, group 1 spread 3: a per-group std would give both groups r = 0.5 -+ 0.1.
    rewards = torch.tensor([0.0, 1.0, 0.0, 3.0])
    std = rewards.numpy().std()  # population std of the whole batch: sqrt(1.1875)
    r = optimality_probability(rewards, torch.tensor([0, 0, 1, 1]), clip=5.0)
    expected = 0.5 + 0.5 * torch.tensor([-0.5, 0.5, -1.5, 1.5]) / (std + 1e-4) / 5
    torch.testing.assert_close(r, expected.float())
    # With each group's own std (0.5 and 1.5) both groups are centred +-1 std.
    per_group = optimality_probability(rewards, torch.tensor([0, 0, 1, 1]), clip=5.0, batch_std=False)
    torch.testing.assert_close(per_group, 0.5 + 0.5 * torch.tensor([-0.5, 0.5, -1.5, 1.5])
                               / torch.tensor([0.5001, 0.5001, 1.5001, 1.5001]) / 5)


def test_unscored_rewards_are_neutral_and_do_not_poison_the_statistics():
    groups = torch.tensor([0, 0, 0, 1, 1])
    with_none = optimality_probability([0.0, None, 2.0, 7.0, None], groups, clip=5.0)
    with_nan = optimality_probability(torch.tensor([0.0, math.nan, 2.0, 7.0, math.nan]), groups, clip=5.0)
    assert torch.equal(with_none, with_nan)
    # Scored [0, 2 | 7]: group 0 centred +-1; the batch std over the three scored values only.
    std = torch.tensor([0.0, 2.0, 7.0]).std(unbiased=False).item()
    a = 1 / (std + 1e-4) / 5
    torch.testing.assert_close(with_none, torch.tensor([0.5 - a / 2, 0.5, 0.5 + a / 2, 0.5, 0.5]))
    assert torch.isfinite(with_none).all()
    # Nothing scored: every sample neutral.
    assert optimality_probability([None, None], torch.tensor([0, 0])).tolist() == [0.5, 0.5]


def test_implicit_velocities_hand_values():
    v, v_old = torch.tensor([3.0, -1.0]), torch.tensor([1.0, 1.0])
    v_pos, v_neg = implicit_velocities(v, v_old, beta=0.5)
    assert v_pos.tolist() == [2.0, 0.0]  # 0.5 * 1 + 0.5 * 3, 0.5 * 1 + 0.5 * (-1)
    assert v_neg.tolist() == [0.0, 2.0]  # 1.5 * 1 - 0.5 * 3, 1.5 * 1 + 0.5
    v_pos, v_neg = implicit_velocities(v, v_old, beta=1.0)
    assert torch.equal(v_pos, v) and v_neg.tolist() == [-1.0, 3.0]  # beta = 1: v+ = v, v- = 2 v_old - v


def test_adaptive_x0_error_hand_values_and_stop_gradient():
    target = torch.zeros(1, 4)
    velocity = torch.tensor([[1.0, -1.0, 2.0, 0.0]], requires_grad=True)
    error = adaptive_x0_error(velocity, target, torch.tensor([0.5]))
    # x0 error = 0.5 * (v - u) = [0.5, -0.5, 1, 0]: mean square 0.375, mean abs 0.5.
    assert error.item() == pytest.approx(0.375 / 0.5)
    error.sum().backward()
    # The normaliser is detached: d/dv = s * 2 s (v - u) / (N * 0.5).
    torch.testing.assert_close(velocity.grad, 0.5 * 2 * 0.5 * velocity.detach() / (4 * 0.5))
    # A zero error is clamped, not divided by zero.
    assert adaptive_x0_error(torch.zeros(1, 4), target, torch.tensor([0.5])).item() == 0.0


def test_nft_loss_hand_values_plain_and_adaptive():
    target = torch.zeros(2, 2)
    v = torch.tensor([[3.0, 3.0], [1.0, -1.0]])
    v_old = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    r = torch.tensor([1.0, 0.25])
    # beta 0.5: v+ = [[2, 2], [1, 0]], v- = [[0, 0], [1, 2]].
    loss, stats = nft_loss(v, v_old, target, torch.tensor([1.0, 0.5]), r, beta=0.5, adaptive_weighting=False)
    assert stats["positive"].tolist() == [4.0, 0.5] and stats["negative"].tolist() == [0.0, 2.5]
    per_sample = [(1 * 4 + 0 * 0) / 0.5, (0.25 * 0.5 + 0.75 * 2.5) / 0.5]  # [8, 4]
    assert loss.item() == pytest.approx(sum(per_sample) / 2)
    assert stats["old_deviation"].tolist() == [4.0, 2.0]
    scaled, _ = nft_loss(v, v_old, target, torch.tensor([1.0, 0.5]), r, beta=0.5, adaptive_weighting=False,
                         loss_scale=5.0)
    assert scaled.item() == pytest.approx(5 * loss.item())
    # Adaptive: x0 errors s (v+- - u). Row 0 (s = 1): + [2, 2] -> 4 / 2 = 2; - zero -> 0.
    # Row 1 (s = 0.5): + [0.5, 0] -> 0.125 / 0.25 = 0.5; - [0.5, 1] -> 0.625 / 0.75.
    loss, stats = nft_loss(v, v_old, target, torch.tensor([1.0, 0.5]), r, beta=0.5)
    torch.testing.assert_close(stats["positive"], torch.tensor([2.0, 0.5]))
    torch.testing.assert_close(stats["negative"], torch.tensor([0.0, 0.625 / 0.75]))
    expected = ((1 * 2.0) / 0.5 + (0.25 * 0.5 + 0.75 * 0.625 / 0.75) / 0.5) / 2
    assert loss.item() == pytest.approx(expected)


@pytest.mark.parametrize("adaptive", [False, True])
def test_nft_gradient_at_the_old_policy_is_2r_minus_1_times_flow_matching(adaptive):
    # At v = v_old both branches see the same error, so d loss / dv = (2 r - 1) d E(v) / dv.
    gen = torch.Generator().manual_seed(0)
    v_old, target = torch.randn(3, 2, 4, generator=gen), torch.randn(3, 2, 4, generator=gen)
    sigma, r = torch.tensor([0.2, 0.6, 0.9]), torch.tensor([0.0, 0.5, 0.9])
    v = v_old.clone().requires_grad_(True)
    nft_loss(v, v_old, target, sigma, r, beta=0.7, adaptive_weighting=adaptive)[0].backward()
    plain = v_old.clone().requires_grad_(True)
    error = adaptive_x0_error(plain, target, sigma) if adaptive else ((plain - target) ** 2).mean(dim=(1, 2))
    ((2 * r - 1) * error).mean().backward()
    torch.testing.assert_close(v.grad, plain.grad)
    assert v.grad[1].abs().max() < 1e-7  # r = 1/2 is neutral (up to rounding of beta)


def test_nft_minimiser_is_old_plus_two_over_beta_delta():
    # Theorem 3.2 (Eq. 6) at one point x_t with K targets u_k from the old policy and their r_k: with
    # v_old = mean_k u_k (the old policy's own optimum), the minimiser over v of the plain loss is
    # v_old + (2 / beta) Delta, Delta = alpha (v+ - v_old), alpha = mean r, v+ = sum r_k u_k / sum r_k.
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(6, 3, generator=gen)
    r = torch.tensor([0.9, 0.1, 0.5, 0.7, 0.2, 0.6])
    beta = 0.4
    v_old = u.mean(dim=0)
    alpha = r.mean()
    delta = alpha * ((r[:, None] * u).sum(0) / r.sum() - v_old)
    v_star = (v_old + 2 / beta * delta).requires_grad_(True)
    loss, _ = nft_loss(v_star.expand(6, 3), v_old.expand(6, 3), u, torch.ones(6), r, beta, adaptive_weighting=False)
    loss.backward()
    assert v_star.grad.abs().max() < 1e-6


def test_awm_error_weightings_hand_values():
    velocity, target, sigma = torch.tensor([[2.0, 0.0]]), torch.zeros(1, 2), torch.tensor([0.5])
    e = 2.0  # mean of [4, 0]
    assert awm_error(velocity, target, sigma, "uniform").item() == e
    assert awm_error(velocity, target, sigma, "sigma").item() == 0.5 * e
    assert awm_error(velocity, target, sigma, "sigma_sq").item() == 0.25 * e
    ghuber = awm_error(velocity, target, sigma, "ghuber", power=0.25).item()
    assert ghuber == pytest.approx(0.5 * ((e + 1e-10) ** 0.25 - 1e-10**0.25) / 0.25, rel=1e-6)
    with pytest.raises(ValueError, match="unknown AWM weighting"):
        awm_error(velocity, target, sigma, "elbo")


def test_awm_loss_hand_value_and_same_gradient_as_the_on_policy_ratio_form():
    target = torch.zeros(2, 2)
    sigma, advantages = torch.tensor([0.3, 0.8]), torch.tensor([0.5, -1.0])
    velocity = torch.tensor([[1.0, 1.0], [2.0, 0.0]], requires_grad=True)
    loss, stats = awm_loss(velocity, target, sigma, advantages)
    assert stats["error"].tolist() == [1.0, 2.0]
    assert loss.item() == pytest.approx((0.5 * 1.0 - 1.0 * 2.0) / 2)
    loss.backward()
    # The reference code's surrogate: log p = -E, rho = exp(log p - sg(log p)) = 1, PPO clip 1.
    for weighting in ("uniform", "ghuber"):
        ours = velocity.detach().clone().requires_grad_(True)
        awm_loss(ours, target, sigma, advantages, weighting)[0].backward()
        theirs = velocity.detach().clone().requires_grad_(True)
        log_prob = -awm_error(theirs, target, sigma, weighting)
        ratio = torch.exp(log_prob - log_prob.detach())
        surrogate = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(0.0, 2.0)).mean()
        assert surrogate.item() == pytest.approx(-advantages.mean().item())
        surrogate.backward()
        torch.testing.assert_close(ours.grad, theirs.grad)
    # Uniform weighting with A = 1 is the rectified-flow loss.
    plain, _ = awm_loss(velocity, target, sigma, torch.ones(2))
    assert plain.item() == pytest.approx(flow_matching_loss(velocity, target).item())


def test_old_policy_decay_schedules():
    # Paper default eta_i = min(0.001 i, 0.5).
    assert [old_policy_decay(i) for i in (0, 1, 100)] == [0.0, 0.001, pytest.approx(0.1)]
    assert old_policy_decay(500) == pytest.approx(0.5) and old_policy_decay(10_000) == 0.5
    # The code's OCR schedule: flat 75 steps, then 0.0075 per step up to 0.999.
    ocr = dict(rate=0.0075, max_decay=0.999, flat_steps=75)
    assert old_policy_decay(74, **ocr) == 0.0 and old_policy_decay(75, **ocr) == 0.0
    assert old_policy_decay(76, **ocr) == pytest.approx(0.0075)
    assert old_policy_decay(208, **ocr) == pytest.approx(0.9975) and old_policy_decay(209, **ocr) == 0.999
    with pytest.raises(ValueError):
        old_policy_decay(1, max_decay=1.0)


def test_soft_update_hand_values():
    # The old policy is an EMAModel updated with the schedule's decay: old <- eta old + (1 - eta) param.
    param = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    old = EMAModel([("w", param)], decay=0.0)
    param.data.copy_(torch.tensor([3.0, 6.0]))
    old.update(0.25)
    assert old.shadow["w"].tolist() == [2.5, 5.0]  # 0.25 * [1, 2] + 0.75 * [3, 6]
    old.update(0.0)
    assert old.shadow["w"].tolist() == [3.0, 6.0]  # eta = 0: a copy
    param.data.zero_()
    old.update(1.0)
    assert old.shadow["w"].tolist() == [3.0, 6.0]
    with pytest.raises(ValueError):
        old.update(1.5)


def test_random_schedule_sigmas_are_distinct_schedule_steps_per_sample():
    sigmas = torch.tensor([1.0, 0.875, 0.75, 0.5, 0.0])  # exact in float32
    drawn = random_schedule_sigmas(sigmas, batch_size=5, count=3, generator=torch.Generator().manual_seed(0))
    assert drawn.shape == (3, 5)
    for column in drawn.T:
        assert len(set(column.tolist())) == 3 and set(column.tolist()) <= {1.0, 0.875, 0.75, 0.5}
    again = random_schedule_sigmas(sigmas, batch_size=5, count=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(drawn, again)
    assert set(random_schedule_sigmas(sigmas, 1, 4)[:, 0].tolist()) == {1.0, 0.875, 0.75, 0.5}
    with pytest.raises(ValueError):
        random_schedule_sigmas(sigmas, 1, 5)


def test_stratified_schedule_sigmas_follow_the_released_awm_strata():
    # 14 steps, indices [1, 12], 6 strata: floor(linspace(1, 12, 7)) = [1, 2, 4, 6, 8, 10, 12].
    sigmas = torch.arange(15, dtype=torch.float32)  # sigma value = index, to read the drawn indices
    strata = [{1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}, {10, 11}]
    seen = [set() for _ in strata]
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        drawn = stratified_schedule_sigmas(sigmas, 6, low=1, high=12, generator=gen).long().tolist()
        for k, index in enumerate(drawn):
            assert index in strata[k]
            seen[k].add(index)
    assert seen == strata
    with pytest.raises(ValueError):
        stratified_schedule_sigmas(sigmas, 12, low=1, high=12)
