"""One seed derivation for every random stream of the library.

Nothing a trainer draws comes from a hidden global stream: each draw uses a generator seeded by
[`derive_seed`]`(args.seed, stream, *keys)`, where `stream` names what is drawn ([`Stream`]) and `keys` say
which one (a global step, a sample index, a micro-batch number, an epoch). So a draw is a fixed function of
where it happens in training, not of how many draws came before it: a run resumed from a checkpoint draws
exactly what the uninterrupted run drew, and adding a draw somewhere never shifts another stream.
"""

from __future__ import annotations

import enum

import numpy as np
import torch


class Stream(enum.IntEnum):
    """The random streams; each is the first key after the seed in [`derive_seed`]. The numbers are part of the
    results (changing one changes every draw of that stream), so new streams get new numbers."""

    SAMPLE_NOISE = 0  # a rollout sample's initial and step noise; keys (global step, global sample index)
    SDE_WINDOW = 1  # GRPO: the stochastic window of a rollout batch; keys (global step,)
    TRAINED_STEPS = 2  # GRPO: the recorded steps a micro-batch trains on; keys (global step, micro-batch)
    EVALUATION = 3  # evaluation draws; keys (index of the sample or eval batch,)
    DATA_ORDER = 4  # the order of the training data; keys (epoch,)
    MICRO_BATCH = 5  # a training micro-batch's prompt dropout, sigmas and noise; keys (global micro-batch,)
    LORA_INIT = 6  # the initial LoRA weights; no keys
    GROUP_NOISE = 7  # `same_noise_per_group`: a group's shared initial noise; keys (global step, global group index)
    NOISED_COPIES = 8  # forward-process RL: a micro-batch's noise levels and noise; keys (global step, micro-batch
    # index in the rollout batch of every process: process index * gradient_accumulation_steps + micro index)


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that is a fixed function of non-negative integer `keys` (numpy's `SeedSequence` hash), for
    example `derive_seed(args.seed, Stream.SAMPLE_NOISE, step, index)`."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def seeded_generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A `torch.Generator` on `device` seeded with [`derive_seed`]`(*keys)`."""
    return torch.Generator(device).manual_seed(derive_seed(*keys))
