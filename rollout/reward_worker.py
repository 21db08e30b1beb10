"""Reward workers: reward functions in their own Ray actors (e.g. OCR on CPU nodes while GPUs sample).

The engine submits each sampled micro-batch for scoring as soon as it arrives, so scoring overlaps the
generation of the rest of the batch; a worker returns the raw per-reward values, and the trainer composes them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .worker import RewardInputs


class RewardWorker:
    """The reward functions of a run, in one actor.

    Args:
        reward_funcs (`list`): reward callables under the `rewards` contract, shipped by pickling, or
            zero-argument recipes that build them here when `build=True` (for rewards holding resources
            that do not pickle, like an ONNX session).
        build (`bool`, defaults to `False`): call each entry of `reward_funcs` to build the reward.
        num_threads (`int`, *optional*): `torch.set_num_threads` in this process.
    """

    def __init__(self, reward_funcs: list[Callable], build: bool = False, num_threads: int | None = None):
        from rlhf_image.rewards.compose import RewardSet

        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.reward_set = RewardSet([f() for f in reward_funcs] if build else list(reward_funcs))

    def names(self) -> list[str]:
        return list(self.reward_set.names)

    def pid(self) -> int:
        return os.getpid()

    def score(self, inputs: RewardInputs, columns: dict[str, list[Any]]) -> np.ndarray:
        """Raw per-reward values `[n, R]` (float64, NaN where a reward returned `None`)."""
        return self.reward_set(inputs.prompts, inputs.images, **columns).per_reward
