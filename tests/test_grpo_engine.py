"""The rollout engine protocol and the in-process engine."""

import math

import numpy as np
import pytest
import torch
from grpo_helpers import brightness, ovis_policy

from rlhf_image import InProcessRolloutEngine, RolloutEngine
from rlhf_image.rollout_engine import RolloutSpec
from rlhf_image.sampling import generate

SPEC = RolloutSpec(height=32, width=32, num_steps=4, sde_type="sde", noise_level=0.7, guidance_scale=2.0,
                   micro_batch_size=4)


def picky(prompts, images, target, **columns):
    return [None if t == "skip" else float(len(t)) for t in target]


def test_in_process_engine_samples_scores_and_keeps_order():
    policy = ovis_policy()
    engine = InProcessRolloutEngine()
    assert isinstance(engine, RolloutEngine)
    engine.bind(policy, [brightness, picky], ["brightness", "picky"])
    engine.sync_weights(policy, version=7)
    prompts = ["a cat"] * 3 + ["the sea"] * 3
    targets = ["ab", "skip", "abc", "a", "abcd", "skip"]
    batch = engine.rollout(prompts, [5, 6, 7, 8, 9, 10], {"target": targets}, SPEC, (1, 3))
    assert batch.weights_version == 7 and batch.reward_names == ["brightness", "picky"]
    assert set(batch.timings) >= {"rollout", "reward"}
    trajectory = batch.trajectory
    assert trajectory.prompts == prompts and trajectory.step_indices.tolist() == [1, 2]
    assert trajectory.log_probs.shape == (6, 2) and trajectory.negative_cond is not None
    # Rewards are those of the returned images, row by row; None became NaN.
    assert batch.per_reward.dtype == torch.float64 and batch.per_reward.shape == (6, 2)
    assert batch.per_reward[:, 0].tolist() == brightness(prompts, trajectory.pil_images())
    expected = [float("nan") if t == "skip" else float(len(t)) for t in targets]
    assert all(math.isnan(a) and math.isnan(b) or a == b for a, b in zip(batch.per_reward[:, 1].tolist(), expected))
    # Sampling is `generate`'s (prompts encoded once per distinct prompt: same images up to rounding).
    reference = generate(policy, prompts, [5, 6, 7, 8, 9, 10], height=32, width=32, num_steps=4, sde_type="sde",
                         window=(1, 3), guidance_scale=2.0, micro_batch_size=4)
    np.testing.assert_allclose(trajectory.images.numpy(), reference.images.numpy(), atol=1e-5)
    engine.close()


def test_engine_misuse_is_reported():
    engine = InProcessRolloutEngine()
    with pytest.raises(RuntimeError, match="bind"):
        engine.rollout(["a"], [0], {}, SPEC, (0, 4))
    policy = ovis_policy()
    engine.bind(policy, [brightness], ["brightness"])
    with pytest.raises(ValueError, match="policy given to `bind`"):
        engine.sync_weights(ovis_policy(), version=0)
    with pytest.raises(ValueError, match="differ"):
        InProcessRolloutEngine().bind(policy, [brightness], ["other"])
