"""`RayRolloutEngine`: rollouts on Ray actors behind the trainer's `RolloutEngine` protocol.

    trainer = GRPOTrainer(model, reward_funcs, args=GRPOConfig(...), train_dataset=dataset,
                          rollout_engine=RayRolloutEngine(functools.partial(ovis_image_tiny, seed=0), num_workers=2))

Rollout workers ([`~rlhf_image.rollout.worker.RolloutWorker`]) each hold a policy replica built from a picklable recipe
and sample with `rlhf_image.sampling.generate`; a batch is split by prompt group (consecutive samples with the
same prompt, trl's layout), so a group is sampled on one worker, into tasks of one micro-batch each. Per-sample
seeds and fixed micro-batches make every sample independent of the split: one worker, two workers or the
in-process engine give bit-identical trajectories. Each finished task is scored at once, in the driver or on
reward workers ([`~rlhf_image.rollout.reward_worker.RewardWorker`]), while the other tasks are still sampling.

Weights reach the workers only through `sync_weights`, which is versioned: a task carries the version it must
be sampled with and a worker refuses any other. Only the LoRA adapter is sent when training LoRA, otherwise the
trainable state dict; either way in chunks of at most `max_chunk_bytes`, through Ray's object store or a
`torch.distributed` group (NCCL on GPUs, gloo on CPU; trainer rank 0, workers 1..N).

A worker that dies is replaced: the new actor gets the weights of the version its tasks need and only the
unfinished tasks are issued again (results are keyed by sample index, so none is lost or counted twice). After
`max_failures` replacements the engine stops with `RolloutWorkerError`; it never writes to disk nor to the
trainer's policy, so the trainer's checkpoints stay as they were.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rlhf_image.policy import FlowPolicy
from rlhf_image.rollout_engine import RolloutBatch, RolloutSpec
from rlhf_image.sampling import Trajectory

from .cluster import RaySession, init_ray
from .collective import WeightGroup, listening_socket
from .reward_worker import RewardWorker
from .weight_sync import ChunkPlan, iter_chunks, pack_chunk, plan_chunks, trainable_state
from .worker import RolloutTask, RolloutWorker

TRANSPORTS = ("object_store", "collective")


class RolloutWorkerError(RuntimeError):
    """Rollout or reward workers died more often than `max_failures` allows."""


@dataclass
class _Snapshot:
    """One synced version in the object store: the plan and one ref per chunk (a recovery source)."""

    plan: ChunkPlan
    refs: list
    peft_config: Any


@dataclass
class _Slot:
    """A worker position; `actor` is replaced when it dies, `loaded` is the version last queued on it."""

    index: int
    actor: Any
    generation: int = 0
    loaded: int | None = None


@dataclass
class RolloutHandle:
    """A submitted rollout; pass it to `collect`."""

    id: int
    version: int


@dataclass
class _Rollout:
    handle: RolloutHandle
    tasks: list[RolloutTask]
    slot_of_task: list[int]
    columns: dict[str, list[Any]]
    submitted: float
    generating: dict = field(default_factory=dict)  # trajectory ref -> (task id, inputs ref, actor generation)
    scoring: dict = field(default_factory=dict)  # score ref -> (task id, inputs ref, reward slot)
    trajectories: dict = field(default_factory=dict)  # task id -> Trajectory
    scores: dict = field(default_factory=dict)  # task id -> np.ndarray [n, R]
    sampled_at: float | None = None


class RayRolloutEngine:
    """Rollouts on Ray workers, for any trainer taking a `rollout_engine` (see `rlhf_image.rollout_engine`).

    Args:
        model_recipe (`Callable[[], FlowPolicy | DiffusionPipeline]`): picklable; builds the model inside each
            worker, e.g. `functools.partial(ovis_image_tiny, seed=0)`. It must build the trainer's architecture
            and, for LoRA, its frozen base weights (only the adapter is synced).
        num_workers (`int`, defaults to 1): rollout workers.
        policy_kwargs (`dict`, *optional*): for `FlowPolicy.from_pipeline` when the recipe returns a pipeline.
        torch_dtype (`torch.dtype`, *optional*): cast the workers' models (default: as built).
        num_cpus_per_worker (`float`, defaults to 1.0), num_gpus_per_worker (`float`, *optional*): resources
            per rollout worker; GPUs default to 1 when the cluster has GPUs, else 0.
        worker_threads (`int`, *optional*): `torch.set_num_threads` in CPU workers.
        num_reward_workers (`int`, defaults to 0): reward actors; 0 scores in the driver (still overlapping
            sampling, task by task).
        reward_recipes (`list[Callable[[], RewardFunc]]`, *optional*): zero-argument builders of the rewards,
            called inside reward workers (for rewards that do not pickle); by default the trainer's reward
            functions are pickled to the reward workers. Names must match the trainer's.
        num_cpus_per_reward_worker (`float`, defaults to 1.0).
        weight_transport (`str`, defaults to `"object_store"`): `"object_store"` (`ray.put` of chunks) or
            `"collective"` (broadcast over a `torch.distributed` group).
        collective_backend (`str`, *optional*): `"nccl"` or `"gloo"`; defaults to NCCL with GPU workers.
        max_chunk_bytes (`int`, defaults to 256 MiB): bytes per weight chunk (bounds the memory of a sync).
        max_staleness (`int`, defaults to 0): 0: a rollout is always sampled with the latest synced weights and
            must be collected before the next sync. 1: one-step off-policy: a rollout submitted before a sync
            may still be sampling with the previous version while the new weights are sent (object store only).
        max_failures (`int`, defaults to 3): worker deaths tolerated over the engine's life.
        address (`str`, *optional*): an existing Ray cluster to join (`"auto"`, `"ray://head:10001"`); by default
            a private local instance bound to 127.0.0.1 is started (see `rlhf_image.rollout.cluster`), unless Ray is
            already initialised in this process.
        ray_init_kwargs (`dict`, *optional*): more `ray.init` arguments (`num_cpus`, `runtime_env`, ...).
        timeout_s (`float`, defaults to 1800): longest wait for one result, sync or group rendezvous.

    Scaling out: the same code runs on a cluster. Start Ray on each node (`ray start --head` on one,
    `ray start --address=<head>:6379` on the others), run the trainer on a GPU node with `address="auto"`, and
    set `num_workers` to the GPUs left for sampling (`num_gpus_per_worker=1` each); use
    `weight_transport="collective"` (NCCL) for full fine-tuning of large models, and reward workers on CPU
    nodes for CPU-bound rewards such as OCR.
    """

    def __init__(
        self,
        model_recipe: Callable[[], Any],
        *,
        num_workers: int = 1,
        policy_kwargs: dict[str, Any] | None = None,
        torch_dtype: torch.dtype | None = None,
        num_cpus_per_worker: float = 1.0,
        num_gpus_per_worker: float | None = None,
        worker_threads: int | None = None,
        num_reward_workers: int = 0,
        reward_recipes: Sequence[Callable[[], Callable]] | None = None,
        num_cpus_per_reward_worker: float = 1.0,
        weight_transport: str = "object_store",
        collective_backend: str | None = None,
        max_chunk_bytes: int = 256 * 2**20,
        max_staleness: int = 0,
        max_failures: int = 3,
        address: str | None = None,
        ray_init_kwargs: dict[str, Any] | None = None,
        timeout_s: float = 1800.0,
    ):
        _check(callable(model_recipe), "model_recipe", "pass a picklable callable building the model, e.g. "
               "functools.partial(ovis_image_tiny, seed=0)")
        _check(num_workers >= 1, "num_workers", "use at least 1 rollout worker")
        _check(num_reward_workers >= 0, "num_reward_workers", "use 0 (score in the driver) or more")
        _check(reward_recipes is None or num_reward_workers > 0, "reward_recipes",
               "reward recipes build rewards inside reward workers: set num_reward_workers >= 1")
        _check(weight_transport in TRANSPORTS, "weight_transport", f"use one of {TRANSPORTS}")
        _check(collective_backend in (None, "gloo", "nccl"), "collective_backend", "use 'nccl', 'gloo' or None")
        _check(max_staleness in (0, 1), "max_staleness", "use 0 (on-policy) or 1 (one-step off-policy)")
        _check(max_staleness == 0 or weight_transport == "object_store", "max_staleness",
               "one-step off-policy sends weights while workers sample, which needs weight_transport='object_store'")
        _check(max_chunk_bytes >= 1024, "max_chunk_bytes", "use at least 1024 bytes (e.g. 256 MiB)")
        _check(max_failures >= 0, "max_failures", "use 0 (fail on the first death) or more")
        _check(num_cpus_per_worker >= 0 and num_cpus_per_reward_worker >= 0, "num_cpus_per_worker",
               "CPU resources cannot be negative")

        import ray

        self.session: RaySession = init_ray(address, **(ray_init_kwargs or {}))
        if num_gpus_per_worker is None:
            num_gpus_per_worker = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        self.num_gpus_per_worker = num_gpus_per_worker
        self.weight_transport = weight_transport
        self.collective_backend = collective_backend or ("nccl" if num_gpus_per_worker > 0 else "gloo")
        self.max_chunk_bytes = max_chunk_bytes
        self.max_staleness = max_staleness
        self.max_failures = max_failures
        self.timeout_s = timeout_s
        self.reward_recipes = list(reward_recipes) if reward_recipes is not None else None
        self.num_reward_workers = num_reward_workers
        self.num_cpus_per_reward_worker = num_cpus_per_reward_worker
        self.worker_threads = worker_threads

        self._worker_cls = ray.remote(RolloutWorker).options(
            num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker, max_restarts=0, max_task_retries=0)
        self._worker_args = (model_recipe, policy_kwargs, torch_dtype,
                             "cuda" if num_gpus_per_worker > 0 else "cpu", worker_threads)
        self.workers = [_Slot(i, self._worker_cls.remote(*self._worker_args)) for i in range(num_workers)]
        self.reward_workers: list[_Slot] = []
        self._reward_args: tuple | None = None
        self._reward_set = None
        self._policy: FlowPolicy | None = None
        self.reward_names: list[str] = []

        self._syncs = 0  # engine-side versions: 1, 2, ... (the trainer's tags are in _tags)
        self._tags: dict[int, int] = {}
        self._snapshots: dict[int, _Snapshot] = {}
        self._load_refs: list = []
        self._group: WeightGroup | None = None
        self._group_count = 0
        self._rendezvous_dir: str | None = None  # the store files of groups whose members share this node
        self._pending: dict[int, _Rollout] = {}
        self._next_id = 0
        self.num_failures = 0  # worker deaths so far
        self.num_tasks_reissued = 0  # sampling tasks issued again after their worker died
        self.last_sync_seconds = float("nan")
        self._closed = False

    # --- protocol ------------------------------------------------------------------------------------
    def bind(self, policy: FlowPolicy, reward_funcs: Sequence[Callable], reward_names: Sequence[str]) -> None:
        """Record the trainer's policy (its weights are sent at the first sync) and set up the rewards."""
        import ray

        from rlhf_image.rewards.compose import RewardSet

        self._check_open()
        self._policy = policy
        self.reward_names = list(reward_names)
        for slot in self.reward_workers:  # bound again: the new rewards replace the old workers
            ray.kill(slot.actor, no_restart=True)
        self.reward_workers = []
        if self.num_reward_workers == 0:
            self._reward_set = RewardSet(list(reward_funcs))
            names = list(self._reward_set.names)
        else:
            if self.reward_recipes is not None:
                funcs, build = self.reward_recipes, True
            else:
                funcs, build = list(reward_funcs), False
            self._reward_cls = ray.remote(RewardWorker).options(
                num_cpus=self.num_cpus_per_reward_worker, max_restarts=0, max_task_retries=0)
            self._reward_args = (funcs, build, self.worker_threads)
            self.reward_workers = [_Slot(i, self._reward_cls.remote(*self._reward_args))
                                   for i in range(self.num_reward_workers)]
            names = ray.get(self.reward_workers[0].actor.names.remote(), timeout=self.timeout_s)
        if names != self.reward_names:
            raise ValueError(f"the engine's rewards are named {names} but the trainer's {self.reward_names}; "
                             "reward_recipes must build the trainer's reward functions, in order")

    def sync_weights(self, policy: FlowPolicy, version: int) -> None:
        """Send `policy`'s trainable weights (the adapter for LoRA) to every worker, tagged `version`.

        With `max_staleness=0` this returns once every worker holds them (a worker replaced meanwhile loads them
        before its first task); with 1 it returns once they are in the object store (workers load them after
        the tasks already queued on them).
        """
        self._check_open()
        new = self._syncs + 1
        stale = [r.handle.id for r in self._pending.values() if new - r.handle.version > self.max_staleness]
        if stale:
            raise RuntimeError(f"rollouts {stale} were submitted but not collected; with max_staleness="
                               f"{self.max_staleness} collect them before syncing weights again")
        start = time.perf_counter()
        self._policy = policy  # a replacement worker's weights come from here (collective transport)
        state, lora = trainable_state(policy.transformer)
        plan = plan_chunks(state, self.max_chunk_bytes, lora)
        peft_config = policy.transformer.peft_config[policy.transformer.active_adapter] if lora else None
        if self.weight_transport == "object_store":
            self._wait_loads()
            self._snapshots[new] = self._put_snapshot(state, plan, peft_config)
            self._syncs = new
            self._load_refs = [(self._queue_load(slot, new), slot.generation) for slot in self.workers]
            if self.max_staleness == 0:
                self._wait_loads()
        else:
            self._syncs = new
            self._broadcast(state, plan, peft_config, new)
        self._tags[new] = version
        self._drop_snapshots()
        self.last_sync_seconds = time.perf_counter() - start

    def rollout(self, prompts: list[str], seeds: list[int | tuple[int, int]], columns: dict[str, list[Any]],
                spec: RolloutSpec, window: tuple[int, int]) -> RolloutBatch:
        """Sample and score one batch (see `rlhf_image.rollout_engine.RolloutEngine.rollout`)."""
        return self.collect(self.submit(prompts, seeds, columns, spec, window))

    def close(self) -> None:
        """Kill the workers and stop Ray if this engine started it."""
        import ray

        if self._closed:
            return
        self._closed = True
        if self._group is not None:
            self._group.close()
            self._group = None
        if self._rendezvous_dir is not None:
            shutil.rmtree(self._rendezvous_dir, ignore_errors=True)
        if ray.is_initialized():
            for slot in self.workers + self.reward_workers:
                ray.kill(slot.actor, no_restart=True)
        self._snapshots.clear()
        self._pending.clear()
        self.session.shutdown()

    # --- split submission and collection (one-step off-policy) ---------------------------------------
    def submit(self, prompts: list[str], seeds: list[int | tuple[int, int]], columns: dict[str, list[Any]],
               spec: RolloutSpec, window: tuple[int, int]) -> RolloutHandle:
        """Queue a rollout on the workers with the latest synced weights and return at once."""
        self._check_open()
        if self._policy is None:
            raise RuntimeError("call `bind` before `submit`/`rollout`")
        if not prompts:
            raise ValueError("a rollout needs at least one prompt")
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds: pass one seed per prompt")
        for name, values in columns.items():
            if len(values) != len(prompts):
                raise ValueError(f"column {name!r} has {len(values)} values for {len(prompts)} prompts")
        if self._syncs == 0:
            self.sync_weights(self._policy, -1)  # the policy's weights at bind time
        sampling = dict(height=spec.height, width=spec.width, num_steps=spec.num_steps, sde_type=spec.sde_type,
                        noise_level=spec.noise_level, window=tuple(window), guidance_scale=spec.guidance_scale,
                        micro_batch_size=spec.micro_batch_size)
        handle = RolloutHandle(self._next_id, self._syncs)
        self._next_id += 1
        tasks, slots = [], []
        for worker, (first, end) in enumerate(split_by_group(prompts, len(self.workers))):
            for start in range(first, end, spec.micro_batch_size):
                stop = min(start + spec.micro_batch_size, end)
                tasks.append(RolloutTask(list(range(start, stop)), prompts[start:stop], list(seeds[start:stop]),
                                         sampling, handle.version))
                slots.append(worker)
        rollout = _Rollout(handle, tasks, slots, {k: list(v) for k, v in columns.items()}, time.perf_counter())
        for task_id in range(len(tasks)):
            self._submit_task(rollout, task_id)
        self._pending[handle.id] = rollout
        return handle

    def collect(self, handle: RolloutHandle) -> RolloutBatch:
        """Wait for a submitted rollout (replacing workers that die) and return it as a `RolloutBatch`."""
        import ray

        self._check_open()
        if handle.id not in self._pending:
            raise KeyError(f"rollout {handle.id} is not pending (already collected, or from another engine)")
        rollout = self._pending[handle.id]
        if self._load_refs and handle.version == self._syncs:
            self._wait_loads()  # surfaces a failed load (max_staleness=1) before its tasks' errors
        while rollout.generating or rollout.scoring:
            ready, _ = ray.wait(list(rollout.generating) + list(rollout.scoring), num_returns=1,
                                timeout=self.timeout_s)
            if not ready:
                raise TimeoutError(f"no rollout result for {self.timeout_s} s (timeout_s)")
            ref = ready[0]
            if ref in rollout.generating:
                task_id, inputs_ref, generation = rollout.generating.pop(ref)
                try:
                    rollout.trajectories[task_id] = ray.get(ref)
                except ray.exceptions.RayActorError as error:
                    self._replace_worker(self.workers[rollout.slot_of_task[task_id]], generation, error)
                    self._submit_task(rollout, task_id)
                    self.num_tasks_reissued += 1
                    continue
                if not rollout.generating:
                    rollout.sampled_at = time.perf_counter()
                self._score(rollout, task_id, inputs_ref)
            else:
                task_id, inputs_ref, slot, generation = rollout.scoring.pop(ref)
                try:
                    rollout.scores[task_id] = ray.get(ref)
                except ray.exceptions.RayActorError as error:
                    self._replace_reward_worker(slot, generation, error)
                    self._score(rollout, task_id, inputs_ref)
        del self._pending[handle.id]
        self._drop_snapshots()
        return self._assemble(rollout)

    # --- internals -----------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this RayRolloutEngine is closed (after `close()` or a fatal worker failure)")

    def _submit_task(self, rollout: _Rollout, task_id: int) -> None:
        task = rollout.tasks[task_id]
        slot = self.workers[rollout.slot_of_task[task_id]]
        if slot.loaded != task.version:  # a replacement worker: give it the task's weights first
            self._load_now(slot, task.version)
        trajectory_ref, inputs_ref = slot.actor.generate.options(num_returns=2).remote(task)
        rollout.generating[trajectory_ref] = (task_id, inputs_ref, slot.generation)

    def _score(self, rollout: _Rollout, task_id: int, inputs_ref) -> None:
        import ray

        task = rollout.tasks[task_id]
        columns = {k: v[task.indices[0]:task.indices[-1] + 1] for k, v in rollout.columns.items()}
        if not self.reward_workers:
            inputs = ray.get(inputs_ref)
            rollout.scores[task_id] = self._reward_set(inputs.prompts, inputs.images, **columns).per_reward
            return
        slot = min(self.reward_workers, key=lambda s: sum(entry[2] is s for entry in rollout.scoring.values()))
        rollout.scoring[slot.actor.score.remote(inputs_ref, columns)] = (task_id, inputs_ref, slot, slot.generation)

    def _assemble(self, rollout: _Rollout) -> RolloutBatch:
        order = sorted(range(len(rollout.tasks)), key=lambda t: rollout.tasks[t].indices[0])
        indices = [i for t in order for i in rollout.tasks[t].indices]
        if indices != list(range(len(indices))):
            raise RuntimeError("rollout tasks do not cover the batch exactly once")  # a bug, never silent
        trajectory = Trajectory.cat([rollout.trajectories[t] for t in order])
        per_reward = torch.from_numpy(np.concatenate([rollout.scores[t] for t in order]).astype(np.float64))
        end = time.perf_counter()
        timings = {"rollout": rollout.sampled_at - rollout.submitted, "reward": end - rollout.sampled_at,
                   "weight_sync": self.last_sync_seconds}
        version = self._tags[rollout.handle.version]
        return RolloutBatch(trajectory, per_reward, list(self.reward_names), version, timings)

    # weights
    def _put_snapshot(self, state: dict[str, torch.Tensor], plan: ChunkPlan, peft_config: Any) -> _Snapshot:
        import ray

        # numpy arrays go to shared memory without pickling; workers on the node read them in place.
        refs = [ray.put(chunk.cpu().numpy()) for chunk in (pack_chunk(state, plan, i) for i in range(len(plan)))]
        return _Snapshot(plan, refs, peft_config)

    def _queue_load(self, slot: _Slot, version: int):
        snapshot = self._snapshot(version)
        slot.loaded = version
        return slot.actor.load_from_object_store.remote(version, snapshot.plan, snapshot.refs, snapshot.peft_config)

    def _snapshot(self, version: int) -> _Snapshot:
        if version not in self._snapshots:
            # collective transport: a replacement worker gets the current weights from the last synced policy,
            # unchanged since that sync (max_staleness is 0 there: the trainer waits for the rollout).
            if version != self._syncs:
                raise RuntimeError(f"weights version {version} is no longer available")
            state, lora = trainable_state(self._policy.transformer)
            transformer = self._policy.transformer
            peft_config = transformer.peft_config[transformer.active_adapter] if lora else None
            self._snapshots[version] = self._put_snapshot(state, plan_chunks(state, self.max_chunk_bytes, lora),
                                                          peft_config)
        return self._snapshots[version]

    def _drop_snapshots(self) -> None:
        keep = {r.handle.version for r in self._pending.values()}
        if self.weight_transport == "object_store":
            keep.add(self._syncs)
        for version in [v for v in self._snapshots if v not in keep]:
            del self._snapshots[version]

    def _wait_loads(self) -> None:
        """Wait for the loads queued by the last sync; a worker that died meanwhile is replaced (its successor
        loads the weights before its first task)."""
        import ray

        for slot, (ref, generation) in zip(self.workers, self._load_refs):
            try:
                ray.get(ref, timeout=self.timeout_s)
            except ray.exceptions.RayActorError as error:
                self._replace_worker(slot, generation, error)
        self._load_refs = []

    def _load_now(self, slot: _Slot, version: int) -> None:
        """Load `version` on `slot` and wait, replacing the worker until a load succeeds."""
        import ray

        while True:
            generation = slot.generation
            try:
                ray.get(self._queue_load(slot, version), timeout=self.timeout_s)
                return
            except ray.exceptions.RayActorError as error:
                self._replace_worker(slot, generation, error)

    def _broadcast(self, state: dict[str, torch.Tensor], plan: ChunkPlan, peft_config: Any, version: int) -> None:
        """Send the chunks over the process group; rebuild the group and retry when a worker died."""
        import ray

        while True:
            self._check_alive()
            if self._group is None:
                self._build_group()
            refs = [slot.actor.load_from_group.remote(version, plan, peft_config) for slot in self.workers]
            try:
                for chunk in iter_chunks(state, plan):
                    self._group.broadcast(chunk.to(self._group.device))
                ray.get(refs, timeout=self.timeout_s)
            except (RuntimeError, ray.exceptions.RayError) as error:
                self._group.close()  # unblocks the survivors, whose loads then fail
                self._group = None
                ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
                if not self._check_alive():
                    raise RuntimeError(f"collective weight sync failed with every worker alive: {error}") from error
                continue
            for slot in self.workers:
                slot.loaded = version
            return

    def _check_alive(self) -> int:
        """Replace dead rollout workers; returns how many were replaced."""
        import ray

        replaced = 0
        for slot in self.workers:
            generation = slot.generation
            try:
                ray.get(slot.actor.ping.remote(), timeout=self.timeout_s)
            except ray.exceptions.RayActorError as error:
                self._replace_worker(slot, generation, error)
                replaced += 1
        return replaced

    def _build_group(self) -> None:
        """Rendezvous of the trainer (rank 0) and the workers; the trainer's side is built in a thread so that
        a worker failing to join raises here at once instead of after the rendezvous timeout. Workers all on the
        trainer's node meet it through a file (no socket, no name lookup), others through its TCP store."""
        import ray

        addr = ray.util.get_node_ip_address()  # the trainer's node as the workers reach it (127.0.0.1 locally)
        self._group_count += 1
        name = f"rlhf_image_weights_{self._group_count}"
        world = len(self.workers) + 1
        here = ray.get_runtime_context().get_node_id()
        nodes = ray.get([slot.actor.node_id.remote() for slot in self.workers], timeout=self.timeout_s)
        fd = None
        if all(node == here for node in nodes):
            if self._rendezvous_dir is None:
                self._rendezvous_dir = tempfile.mkdtemp(prefix="rlhf_image_weights_")
            init_method = f"file://{os.path.join(self._rendezvous_dir, name)}"
        else:
            fd, port = listening_socket(addr)
            init_method = f"tcp://{f'[{addr}]' if ':' in addr else addr}:{port}"
        joins = [slot.actor.join_group.remote(self.collective_backend, init_method, rank, world, name, self.timeout_s)
                 for rank, slot in enumerate(self.workers, start=1)]
        built: dict[str, Any] = {}

        def build() -> None:
            try:
                built["group"] = WeightGroup(self.collective_backend, init_method, 0, world, addr, name,
                                             self.timeout_s, listen_fd=fd)
            except BaseException as error:  # re-raised in the caller's thread
                built["error"] = error

        thread = threading.Thread(target=build, name="weight-group-rank0", daemon=True)
        thread.start()
        ray.get(joins, timeout=self.timeout_s)  # raises a worker's error (dead actor, bad address) right away
        thread.join()
        if "error" in built:
            raise built["error"]
        self._group = built["group"]

    # failures
    def _replace_worker(self, slot: _Slot, generation: int, error: Exception) -> None:
        """Start a new actor in `slot` if it still holds the one that failed (`generation`); it has no weights
        yet (`loaded=None`): the next task or sync on the slot loads them."""
        import ray

        if slot.generation != generation:
            return  # already replaced because of an earlier task of the same actor
        self._count_failure(f"rollout worker {slot.index}", error)
        ray.kill(slot.actor, no_restart=True)
        slot.actor = self._worker_cls.remote(*self._worker_args)
        slot.generation += 1
        slot.loaded = None
        if self._group is not None:  # the group lost a member: rebuilt before the next collective sync
            self._group.close()
            self._group = None

    def _replace_reward_worker(self, slot: _Slot, generation: int, error: Exception) -> None:
        import ray

        if slot.generation != generation:
            return
        self._count_failure(f"reward worker {slot.index}", error)
        ray.kill(slot.actor, no_restart=True)
        slot.actor = self._reward_cls.remote(*self._reward_args)
        slot.generation += 1

    def _count_failure(self, what: str, error: Exception) -> None:
        self.num_failures += 1
        if self.num_failures > self.max_failures:
            self.close()
            raise RolloutWorkerError(
                f"{what} died ({type(error).__name__}); that is failure {self.num_failures} with max_failures="
                f"{self.max_failures}, so the run stops. The engine wrote nothing: the trainer's last checkpoint "
                "is intact. Raise max_failures if deaths are expected (preemptible nodes).") from error


def split_by_group(prompts: Sequence[str], num_workers: int) -> list[tuple[int, int]]:
    """Contiguous sample ranges `[start, end)`, one per worker, that never cut a group (a run of equal
    consecutive prompts) and balance the sample counts; a worker may get an empty range."""
    runs, start = [], 0
    for i in range(1, len(prompts) + 1):
        if i == len(prompts) or prompts[i] != prompts[start]:
            runs.append((start, i))
            start = i
    ranges, first, run = [], 0, 0
    for worker in range(num_workers):
        target = len(prompts) * (worker + 1) / num_workers
        end = first
        # take a group while its middle lies within this worker's share (the last worker takes the rest)
        while run < len(runs) and (sum(runs[run]) / 2 <= target or worker == num_workers - 1):
            end = runs[run][1]
            run += 1
        ranges.append((first, end))
        first = end
    return ranges


def _check(ok: bool, name: str, fix: str) -> None:
    if not ok:
        raise ValueError(f"RayRolloutEngine: invalid `{name}`: {fix}")
