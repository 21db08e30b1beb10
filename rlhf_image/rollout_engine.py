"""The rollout engine protocol: how a trainer gets samples and rewards, wherever they are computed.

A trainer hands an engine its policy and reward functions once (`bind`), tells it when the weights change
(`sync_weights`), and asks for rollouts (`rollout`). The engine returns everything the update needs in a
[`RolloutBatch`]: the trajectory (latents through the recorded window, the log-probs recorded while
sampling, the prompt conditioning) and the raw per-reward values. The math that turns rewards into
advantages (weights, aggregation, group normalisation) stays in the trainer.

[`InProcessRolloutEngine`] samples with [`~rlhf_image.sampling.generate`] on the trainer's own policy and
scores in the same process; `rlhf_image.rollout.RayRolloutEngine` does the same on Ray workers. An engine must not
assume it shares memory with the trainer: it receives weights only through `sync_weights` and returns
plain tensors (the trainer moves them to its device).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from rlhf_image.rewards.compose import RewardSet

from .policy import FlowPolicy
from .sampling import Trajectory, generate


@dataclass(frozen=True)
class RolloutSpec:
    """How to sample: fixed for a run (the window is passed per call).

    Args:
        height, width (`int`): image size in pixels.
        num_steps (`int`): denoising steps.
        sde_type (`str`): `"sde"`, `"cps"` or `"ode"` (evaluation).
        noise_level (`float`): SDE/CPS noise scale.
        guidance_scale (`float`): true CFG scale (1.0: none).
        micro_batch_size (`int`): rows per transformer call; the trainer's per-device batch size.
    """

    height: int
    width: int
    num_steps: int
    sde_type: str
    noise_level: float
    guidance_scale: float
    micro_batch_size: int


@dataclass
class RolloutBatch:
    """What one rollout returns.

    Args:
        trajectory ([`~rlhf_image.sampling.Trajectory`]): `N` samples with decoded images, recorded latents
            `[N, K + 1, C, h, w]`, log-probs `[N, K]` and conditioning, in the order of the prompts asked for.
        per_reward (`torch.Tensor` of shape `[N, R]`, float64): raw value of each reward function (columns in
            `reward_names` order), NaN where a reward returned `None`.
        reward_names (`list[str]` of length `R`).
        weights_version (`int`): the version (from `sync_weights`) of the weights that sampled the batch.
        timings (`dict[str, float]`): seconds spent per phase, at least `"rollout"` (sampling and decoding)
            and `"reward"`.
    """

    trajectory: Trajectory
    per_reward: torch.Tensor
    reward_names: list[str]
    weights_version: int
    timings: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class RolloutEngine(Protocol):
    """Samples trajectories with a policy's current weights and scores them with the reward functions."""

    def bind(self, policy: FlowPolicy, reward_funcs: Sequence[Callable], reward_names: Sequence[str]) -> None:
        """Called once by the trainer before the first rollout: the policy to sample from (its architecture and
        initial weights) and the reward functions (`fn(prompts, images, **columns) -> list[float | None]`)."""

    def sync_weights(self, policy: FlowPolicy, version: int) -> None:
        """Make the next rollouts use `policy`'s current trainable weights, tagged `version` (the trainer's
        global step). A remote engine sends the weights (only the adapter for LoRA)."""

    def rollout(
        self,
        prompts: list[str],
        seeds: list[int | tuple[int, int]],
        columns: dict[str, list[Any]],
        spec: RolloutSpec,
        window: tuple[int, int],
    ) -> RolloutBatch:
        """Sample one image per prompt and score it.

        Args:
            prompts (`list[str]` of length N), seeds (`list[int | tuple[int, int]]` of length N; an `(initial, steps)`
                pair seeds the initial noise and the step noise apart): sample `i` must depend only on
                `(prompts[i], seeds[i])` and the weights (see [`~rlhf_image.sampling.generate`]).
            columns (`dict[str, list]`): extra dataset columns, each of length N, passed to the rewards.
            spec ([`RolloutSpec`]).
            window (`tuple[int, int]`): stochastic, recorded steps `[start, end)`.
        """

    def close(self) -> None:
        """Release workers and resources; the engine is not used afterwards."""


class InProcessRolloutEngine:
    """The default engine: samples on the trainer's policy in this process, then scores.

    The policy object is shared with the trainer, so `sync_weights` only records the version. Rewards are
    called through `rlhf_image.rewards.compose.RewardSet`, which runs async rewards concurrently.
    """

    def __init__(self) -> None:
        self.policy: FlowPolicy | None = None
        self.reward_set: RewardSet | None = None
        self.reward_names: list[str] = []
        self.version = -1

    def bind(self, policy: FlowPolicy, reward_funcs: Sequence[Callable], reward_names: Sequence[str]) -> None:
        self.policy = policy
        self.reward_set = RewardSet(list(reward_funcs))
        self.reward_names = list(reward_names)
        if self.reward_set.names != self.reward_names:
            raise ValueError(f"reward names {self.reward_set.names} differ from the trainer's {self.reward_names}")

    def sync_weights(self, policy: FlowPolicy, version: int) -> None:
        if policy is not self.policy:
            raise ValueError("InProcessRolloutEngine samples with the policy given to `bind`; pass that policy")
        self.version = version

    def rollout(self, prompts: list[str], seeds: list[int | tuple[int, int]], columns: dict[str, list[Any]],
                spec: RolloutSpec, window: tuple[int, int]) -> RolloutBatch:
        if self.policy is None or self.reward_set is None:
            raise RuntimeError("call `bind` before `rollout`")
        timings = {}
        start = time.perf_counter()
        # A group repeats its prompt num_generations times: encode each distinct prompt once.
        distinct = list(dict.fromkeys(prompts))
        cond = self.policy.encode_prompt(distinct).select([distinct.index(p) for p in prompts])
        negative_cond = None
        if spec.guidance_scale > 1:
            negative_cond = self.policy.encode_negative_prompt(len(prompts))
        trajectory = generate(
            self.policy, prompts, seeds, height=spec.height, width=spec.width, num_steps=spec.num_steps,
            sde_type=spec.sde_type, noise_level=spec.noise_level, window=window,
            guidance_scale=spec.guidance_scale, micro_batch_size=spec.micro_batch_size, decode=True,
            cond=cond, negative_cond=negative_cond)
        _synchronize(trajectory.final_latents.device)
        timings["rollout"] = time.perf_counter() - start
        start = time.perf_counter()
        result = self.reward_set(prompts, trajectory.pil_images(), **columns)
        timings["reward"] = time.perf_counter() - start
        per_reward = torch.from_numpy(np.asarray(result.per_reward, dtype=np.float64))
        return RolloutBatch(trajectory, per_reward, list(self.reward_names), self.version, timings)

    def close(self) -> None:
        self.policy = None
        self.reward_set = None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SharedRolloutEngine:
    """One rollout engine for every training process: rank 0 holds `engine` (e.g. a `RayRolloutEngine` whose
    workers sample on GPUs of their own) and drives it for the whole step; the other ranks hold `None`.

    Each `rollout` call is collective. Every rank's `(prompts, seeds, columns)` are gathered on rank 0, which asks
    `engine` for all of them in rank order in one call and scatters each rank its own rows back: a rank receives
    the samples it would have sampled in-process (sample `i` depends only on its prompt, its seed and the weights,
    and every rank passes its seeds). An error on rank 0 (a reward error, a worker failure) is raised on every rank.
    `sync_weights` sends the weights from rank 0 only, once per step: with DDP or ZeRO-1/2 every rank holds the
    whole model. ZeRO-3 partitions the parameters across ranks and is refused.

    Args:
        engine ([`RolloutEngine`] or `None`): the engine on rank 0, `None` on every other rank.
        group (`torch.distributed.ProcessGroup`, *optional*): the trainer processes (default: the world). For
            object collectives under NCCL each rank's CUDA device must be set, as the `Trainer` does.
    """

    def __init__(self, engine: RolloutEngine | None, group: Any = None):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("SharedRolloutEngine needs an initialised torch.distributed process group (torchrun, "
                               "deepspeed); in a single process pass the engine itself")
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        if (engine is None) != (self.rank != 0):
            raise ValueError(f"SharedRolloutEngine: rank {self.rank} got "
                             f"{'no engine' if engine is None else 'an engine'}; rank 0 holds the engine, the other "
                             "ranks None")
        self.engine = engine

    def bind(self, policy: FlowPolicy, reward_funcs: Sequence[Callable], reward_names: Sequence[str]) -> None:
        if self.engine is not None:
            self.engine.bind(policy, reward_funcs, reward_names)

    def sync_weights(self, policy: FlowPolicy, version: int) -> None:
        if any(hasattr(p, "ds_id") for p in policy.transformer.parameters()):
            raise ValueError("SharedRolloutEngine: the policy's parameters are partitioned by DeepSpeed ZeRO-3; rank 0 "
                             "cannot send whole weights. Use ZeRO-2 (or DDP) with shared rollout workers")
        if self.engine is not None:
            self.engine.sync_weights(policy, version)

    def rollout(self, prompts: list[str], seeds: list[int | tuple[int, int]], columns: dict[str, list[Any]],
                spec: RolloutSpec, window: tuple[int, int]) -> RolloutBatch:
        import torch.distributed as dist

        requests = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object((list(prompts), list(seeds), dict(columns)), requests, dst=self._global(0),
                           group=self.group)
        shares: list[Any] = [None] * self.world_size
        if self.rank == 0:
            try:
                all_prompts = [p for request in requests for p in request[0]]
                all_seeds = [s for request in requests for s in request[1]]
                all_columns = {key: [v for request in requests for v in request[2][key]] for key in columns}
                batch = self.engine.rollout(all_prompts, all_seeds, all_columns, spec, window)
                start = 0
                for rank, request in enumerate(requests):
                    rows = list(range(start, start + len(request[0])))
                    start += len(rows)
                    shares[rank] = RolloutBatch(batch.trajectory.select(rows), batch.per_reward[rows],
                                                list(batch.reward_names), batch.weights_version, dict(batch.timings))
            except Exception as error:  # every rank must leave the collective, then raise it
                shares = [error] * self.world_size
        received: list[Any] = [None]
        dist.scatter_object_list(received, shares if self.rank == 0 else None, src=self._global(0), group=self.group)
        if isinstance(received[0], Exception):
            raise received[0]
        return received[0]

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def _global(self, rank: int) -> int:
        import torch.distributed as dist

        return rank if self.group is None else dist.get_global_rank(self.group, rank)
