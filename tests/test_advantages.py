"""Advantage options on hand-made numbers: the std of the batch gathered from every process, and per-prompt
statistics kept across the rollouts of an epoch (with their exact save and resume)."""

import json
import math

import pytest
import torch

from rlhf_image.advantages import PerPromptStatTracker, group_advantages, scored_std

EPS = 1e-4


def test_batch_std_over_every_process():
    # Process 0 holds group 0, process 1 holds group 1; gathered: 1 2 3 4 0 0 1 5, mean 2, variance 24 / 8 = 3.
    local = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.0, 0.0, 1.0, 5.0])]
    gathered = torch.cat(local)
    assert scored_std(gathered).item() == pytest.approx(math.sqrt(3))
    centred = [[-1.5, -0.5, 0.5, 1.5], [-1.5, -1.5, -0.5, 3.5]]  # minus each group's mean (2.5, 1.5)
    for rewards, expected in zip(local, centred):
        adv = group_advantages(rewards, torch.zeros(4), batch_std=True, batch_rewards=gathered)
        torch.testing.assert_close(adv, torch.tensor(expected) / (math.sqrt(3) + EPS))
    # Each process's own batch std is what batch_std gives without the gathered rewards: sqrt(1.25) on process 0.
    own = group_advantages(local[0], torch.zeros(4), batch_std=True)
    torch.testing.assert_close(own, torch.tensor(centred[0]) / (math.sqrt(1.25) + EPS))


def test_batch_std_skips_unscored_and_needs_batch_std():
    gathered = torch.tensor([1.0, float("nan"), 3.0, 5.0])
    assert scored_std(gathered).item() == pytest.approx(math.sqrt(8 / 3))
    assert scored_std(torch.tensor([2.0, float("nan")])).item() == 0.0
    with pytest.raises(ValueError, match="batch_std=True"):
        group_advantages(gathered, torch.zeros(4), batch_rewards=gathered)


def test_per_prompt_tracker_keeps_statistics_across_rollouts():
    tracker = PerPromptStatTracker()
    # Rollout 1: a -> 1, 3 (mean 2, std 1); b -> 0, 2 (mean 1, std 1).
    adv = tracker.update(["a", "a", "b", "b"], torch.tensor([1.0, 3.0, 0.0, 2.0]))
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, -1.0, 1.0]) / (1 + EPS))
    # Rollout 2: a -> 5, 7 against a's four rewards 1 3 5 7 (mean 4, std sqrt(5)); c has one scored reward (4)
    # and one unscored: both get 0, and the NaN is not recorded.
    adv = tracker.update(["a", "a", "c", "c"], torch.tensor([5.0, 7.0, float("nan"), 4.0]))
    expected = torch.tensor([1.0 / (math.sqrt(5) + EPS), 3.0 / (math.sqrt(5) + EPS), 0.0, 0.0])
    torch.testing.assert_close(adv, expected)
    assert tracker.stats() == {"prompts": 3.0, "mean_rewards_per_prompt": 7 / 3}
    tracker.clear()
    adv = tracker.update(["a", "a"], torch.tensor([5.0, 7.0]))  # a new epoch: a's history is gone
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0]) / (1 + EPS))


def test_per_prompt_tracker_with_batch_std_and_clip():
    tracker = PerPromptStatTracker(batch_std=True, clip=1.0)
    tracker.update(["a", "a"], torch.tensor([1.0, 3.0]))
    # a's history 1 3 5 7 has mean 4; the std is this rollout's: 5 7 4 -> variance (1/9 + 25/9 + 16/9) / 3.
    adv = tracker.update(["a", "a", "c"], torch.tensor([5.0, 7.0, 4.0]))
    std = math.sqrt(42 / 27)
    torch.testing.assert_close(adv, torch.tensor([1.0 / (std + EPS), 1.0, 0.0]))  # 3 / (std + eps) clipped to 1


def test_per_prompt_tracker_state_resumes_exactly():
    rewards = torch.rand(12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    prompts = ["a", "b", "c"] * 4
    run = PerPromptStatTracker(batch_std=True)
    run.update(prompts[:6], rewards[:6])
    saved = json.loads(json.dumps(run.state_dict()))
    resumed = PerPromptStatTracker(batch_std=True)
    resumed.load_state_dict(saved)
    assert torch.equal(resumed.update(prompts[6:], rewards[6:]), run.update(prompts[6:], rewards[6:]))
    with pytest.raises(ValueError, match="options of the run being resumed"):
        PerPromptStatTracker().load_state_dict(saved)
    with pytest.raises(ValueError, match="2 prompts for 3 rewards"):
        run.update(["a", "b"], torch.ones(3))
