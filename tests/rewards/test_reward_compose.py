"""RewardSet and aggregate: weights, None policy, both modes, async concurrency, error reporting."""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np
import pytest

from rlhf_image.rewards import RewardSet, aggregate

PROMPTS = ["p0", "p1", "p2", "p3"]
IMAGES = [None] * 4


def reward_a(prompts, images, **columns):
    return [1.0, 2.0, 3.0, 4.0]


def reward_b(prompts, images, **columns):
    return [10.0, None, 30.0, 20.0]


def reward_const(prompts, images, **columns):
    return [5.0] * len(prompts)


def test_weighted_sum_and_per_reward():
    result = RewardSet([reward_a, reward_b], weights=[1.0, 0.5])(PROMPTS, IMAGES)
    assert result.names == ["reward_a", "reward_b"]
    np.testing.assert_array_equal(result.per_reward[:, 0], [1, 2, 3, 4])
    np.testing.assert_array_equal(result.per_reward[:, 1], [10, np.nan, 30, 20])
    # By hand: 1 + 0.5 * 10, unscored (None in b), 3 + 15, 4 + 10.
    np.testing.assert_allclose(result.total, [6.0, np.nan, 18.0, 14.0])
    np.testing.assert_array_equal(result.scored, [True, False, True, True])
    np.testing.assert_array_equal(result.column("reward_a"), [1, 2, 3, 4])


def test_default_weights_are_one():
    result = RewardSet([reward_a, reward_const])(PROMPTS, IMAGES)
    np.testing.assert_allclose(result.total, [6, 7, 8, 9])


def test_zero_weight_reward_is_logged_but_never_unscores():
    result = RewardSet([reward_a, reward_b], weights=[1.0, 0.0])(PROMPTS, IMAGES)
    np.testing.assert_allclose(result.total, [1, 2, 3, 4])
    assert np.isnan(result.per_reward[1, 1])
    metrics = result.metrics()
    assert metrics["rewards/reward_b/num_none"] == 1.0
    assert metrics["rewards/reward_b/mean"] == pytest.approx(20.0)
    assert metrics["rewards/total/num_unscored"] == 0.0


def test_normalize_then_sum_by_hand():
    per_reward = np.array([[1.0, 10.0], [2.0, np.nan], [3.0, 30.0], [4.0, 20.0]])
    weights = [1.0, 2.0]
    # Column a: mean 2.5, population std sqrt(1.25). Column b over its 3 scored values: mean 20,
    # std sqrt(200 / 3).
    za = (np.array([1, 2, 3, 4]) - 2.5) / math.sqrt(1.25)
    zb = (np.array([10, np.nan, 30, 20]) - 20.0) / math.sqrt(200 / 3)
    expected = za + 2 * zb
    np.testing.assert_allclose(aggregate(per_reward, weights, "normalize_then_sum"), expected)
    np.testing.assert_allclose(aggregate(per_reward, weights, "sum_then_normalize"), [21, np.nan, 63, 44])


def test_normalize_then_sum_constant_reward_is_zero():
    per_reward = np.array([[1.0, 5.0], [3.0, 5.0]])
    np.testing.assert_allclose(aggregate(per_reward, [1.0, 1.0], "normalize_then_sum"), [-1.0, 1.0])


def test_reward_set_mode_is_used():
    result = RewardSet([reward_a, reward_b], weights=[1.0, 0.5], mode="normalize_then_sum")(PROMPTS, IMAGES)
    np.testing.assert_allclose(result.total, aggregate(result.per_reward, [1.0, 0.5], "normalize_then_sum"))
    assert result.mode == "normalize_then_sum"


def test_aggregate_rejects_bad_input():
    with pytest.raises(ValueError, match="mode"):
        aggregate(np.zeros((2, 1)), [1.0], "mean")
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        aggregate(np.zeros((2, 2)), [1.0], "sum_then_normalize")
    with pytest.raises(ValueError, match="inf"):
        aggregate(np.array([[np.inf]]), [1.0], "sum_then_normalize")


@pytest.mark.parametrize("values, message", [
    ([1.0, 2.0], "'faulty' returned 2 values for 4 samples"),
    ([math.inf, 2.0, 1.0, 0.0], "'faulty' returned inf at index 0"),
])
def test_errors_name_reward_and_index(values, message):
    def faulty(prompts, images, **columns):
        return values

    with pytest.raises(ValueError, match=message):
        RewardSet([reward_a, faulty])(PROMPTS, IMAGES)


def test_nan_reward_makes_the_sample_unscored_not_summed():
    def flaky(prompts, images, **columns):
        return [1.0, 2.0, math.nan, 0.0]

    with pytest.warns(RuntimeWarning, match="'flaky' returned nan at index 2"):
        result = RewardSet([reward_a, flaky])(PROMPTS, IMAGES)
    assert np.isnan(result.per_reward[2, 1]) and np.isnan(result.total[2])
    assert np.isfinite(np.delete(result.total, 2)).all()


def test_async_rewards_run_concurrently():
    class Sleepy:
        def __init__(self, name, value):
            self.name, self.value = name, value

        async def __call__(self, prompts, images, **columns):
            await asyncio.sleep(0.3)
            return [self.value] * len(prompts)

    reward_set = RewardSet([Sleepy("slow_a", 1.0), reward_a, Sleepy("slow_b", 2.0)], weights=[1, 1, 1])
    start = time.perf_counter()
    result = reward_set(PROMPTS, IMAGES)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5, f"two 0.3 s async rewards took {elapsed:.2f} s: not concurrent"
    assert result.names == ["slow_a", "reward_a", "slow_b"]  # order kept whatever finishes first
    np.testing.assert_allclose(result.total, [4, 5, 6, 7])


def test_acall_from_async_code_and_columns():
    def matches(prompts, images, target_text, **columns):
        return [float(p == t) for p, t in zip(prompts, target_text)]

    async def main():
        return await RewardSet([matches]).acall(["x", "y"], [None, None], target_text=["x", "z"], other=[0, 0])

    np.testing.assert_allclose(asyncio.run(main()).total, [1.0, 0.0])


def test_construction_errors():
    with pytest.raises(ValueError, match="2 weights for 1 rewards"):
        RewardSet([reward_a], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="unique"):
        RewardSet([reward_a, reward_a])
    with pytest.raises(ValueError, match="at least one"):
        RewardSet([])
