"""The reward contract: naming, sync/async calls, output validation."""

from __future__ import annotations

import asyncio
import functools
import math
import subprocess
import sys

import numpy as np
import pytest

from rlhf_image.rewards import call_reward, is_async_reward, reward_name

PROMPTS = ["a", "b", "c"]
IMAGES = [None, None, None]  # the contract does not look at images; these rewards ignore them


def length_reward(prompts, images, **columns):
    return [float(len(p)) for p in prompts]


async def async_length_reward(prompts, images, **columns):
    await asyncio.sleep(0)
    return [float(len(p)) for p in prompts]


class Named:
    name = "my_reward"

    def __call__(self, prompts, images, **columns):
        return [1.0] * len(prompts)


class AsyncNamed:
    name = "my_async_reward"

    async def __call__(self, prompts, images, **columns):
        return [2.0] * len(prompts)


def test_reward_name():
    assert reward_name(length_reward) == "length_reward"
    assert reward_name(Named()) == "my_reward"
    assert reward_name(functools.partial(length_reward)) == "length_reward"

    class Anonymous:
        def __call__(self, prompts, images, **columns):
            return []

    assert reward_name(Anonymous()) == "Anonymous"


def test_is_async_reward():
    assert not is_async_reward(length_reward)
    assert is_async_reward(async_length_reward)
    assert is_async_reward(AsyncNamed())
    assert not is_async_reward(Named())
    assert is_async_reward(functools.partial(async_length_reward))


def test_call_sync_and_async():
    assert call_reward(length_reward, ["ab", "c"], [None, None]) == [2.0, 1.0]
    assert call_reward(async_length_reward, ["ab", "c"], [None, None]) == [2.0, 1.0]
    assert call_reward(AsyncNamed(), PROMPTS, IMAGES) == [2.0, 2.0, 2.0]


def test_call_async_reward_inside_running_loop():
    async def main():
        return call_reward(async_length_reward, ["abc"], [None])

    assert asyncio.run(main()) == [3.0]


def test_columns_are_passed_and_unknown_ones_ignored():
    def uses_target(prompts, images, target_text, **columns):
        return [float(t == p) for p, t in zip(prompts, target_text)]

    out = call_reward(uses_target, ["x", "y"], [None, None], target_text=["x", "z"], unrelated=[1, 2])
    assert out == [1.0, 0.0]


def test_output_conversion_and_none():
    out = call_reward(lambda p, i, **c: [1, np.float32(0.5), None], PROMPTS, IMAGES)
    assert out == [1.0, 0.5, None] and all(type(v) is float for v in out if v is not None)
    assert call_reward(lambda p, i, **c: np.array([1.0, 2.0, 3.0]), PROMPTS, IMAGES) == [1.0, 2.0, 3.0]


def test_nan_is_an_unscored_sample_reported_with_reward_and_index():
    def sometimes(prompts, images, **columns):
        return [1.0, math.nan, 0.0]

    with pytest.warns(RuntimeWarning, match="'sometimes' returned nan at index 1"):
        assert call_reward(sometimes, PROMPTS, IMAGES) == [1.0, None, 0.0]


@pytest.mark.parametrize("bad, message", [
    ([1.0, 2.0], "returned 2 values for 3 samples"),
    ([1.0, 0.0, math.inf], "inf at index 2"),
])
def test_invalid_values_name_reward_and_index(bad, message):
    def broken(prompts, images, **columns):
        return bad

    with pytest.raises(ValueError, match=f"'broken'.*{message}"):
        call_reward(broken, PROMPTS, IMAGES)


def test_invalid_types():
    class BadType:
        name = "bad_type"

        def __call__(self, prompts, images, **columns):
            return ["1", 2.0, 3.0]

    with pytest.raises(TypeError, match="'bad_type'.*str at index 0"):
        call_reward(BadType(), PROMPTS, IMAGES)
    with pytest.raises(TypeError, match="returned float"):
        call_reward(lambda p, i, **c: 1.0, PROMPTS, IMAGES)


def test_misaligned_inputs():
    with pytest.raises(ValueError, match="3 prompts but 2 images"):
        call_reward(length_reward, PROMPTS, [None, None])
    with pytest.raises(ValueError, match="column 'target_text' has 1 values"):
        call_reward(length_reward, PROMPTS, IMAGES, target_text=["x"])


def test_import_rewards_is_light():
    code = ("import sys, rlhf_image.rewards as rewards; "
            "rewards.RewardSet; rewards.extract_target; rewards.RemoteReward; rewards.serve_reward; "
            "heavy = [m for m in ('torch', 'transformers', 'rapidocr', 'onnxruntime') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
