"""The rollout worker: a Ray actor holding one policy replica, which samples with `rlhf_image`'s sampler.

The replica is built inside the actor from a picklable recipe (a callable returning a `FlowPolicy` or a
diffusers pipeline, e.g. `functools.partial(ovis_image_tiny, seed=0)`), never from the trainer's live
object. Its trainable weights then come only from weight syncs, each tagged with a version; a sampling task
names the version it needs and the worker refuses any other, so no sample is silently drawn from stale or
half-loaded weights.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import PIL.Image
import torch

from rlhf_image.policy import Conditioning, FlowPolicy
from rlhf_image.sampling import Trajectory, generate

from .collective import WeightGroup
from .weight_sync import ChunkPlan, StateAssembler, StateLoader, ensure_adapter


class StaleWeightsError(RuntimeError):
    """A task asked for weights the worker does not hold (an engine bug, never a user error)."""


@dataclass
class RolloutTask:
    """A slice of a rollout for one worker: samples `indices` of the batch, one transformer micro-batch.

    Args:
        indices (`list[int]`): positions of these samples in the rollout batch.
        prompts (`list[str]`), seeds (`list[int | tuple[int, int]]`): one per sample.
        sampling (`dict`): keyword arguments of [`~rlhf_image.sampling.generate`] (height, width, num_steps,
            sde_type, noise_level, window, guidance_scale, micro_batch_size).
        version (`int`): the weight sync (engine-side count) the samples must be drawn with.
    """

    indices: list[int]
    prompts: list[str]
    seeds: list[int | tuple[int, int]]
    sampling: dict[str, Any]
    version: int


@dataclass
class RewardInputs:
    """What a reward sees of a task: prompts and images as PIL (the conversion the in-process engine makes)."""

    indices: list[int]
    prompts: list[str]
    images: list[PIL.Image.Image]


def build_policy(recipe: Callable[[], Any], policy_kwargs: dict[str, Any] | None = None) -> FlowPolicy:
    """Call `recipe` and wrap a pipeline into its `FlowPolicy` (`FlowPolicy.from_pipeline(pipe, **policy_kwargs)`)."""
    model = recipe()
    if isinstance(model, FlowPolicy):
        if policy_kwargs:
            raise ValueError("policy_kwargs apply to recipes returning a pipeline; this recipe returned a FlowPolicy")
        return model
    return FlowPolicy.from_pipeline(model, **(policy_kwargs or {}))


def trajectory_to(trajectory: Trajectory, device: torch.device | str) -> Trajectory:
    """The same trajectory with every tensor moved to `device` (conditioning included)."""
    values = {}
    for f in fields(trajectory):
        value = getattr(trajectory, f.name)
        if isinstance(value, (torch.Tensor, Conditioning)):
            value = value.to(device)
        values[f.name] = value
    return Trajectory(**values)


class RolloutWorker:
    """One policy replica (a Ray actor; see `rlhf_image.rollout.engine.RayRolloutEngine`).

    Args:
        recipe (`Callable[[], FlowPolicy | DiffusionPipeline]`): builds the model; must give the trainer's
            architecture (and, for LoRA, its frozen base weights).
        policy_kwargs (`dict`, *optional*): for `FlowPolicy.from_pipeline` (e.g. `max_sequence_length`).
        torch_dtype (`torch.dtype`, *optional*): cast the model (default: as the recipe built it).
        device (`str`, defaults to `"cpu"`): `"cuda"` on a worker given a GPU (Ray makes it device 0).
        num_threads (`int`, *optional*): `torch.set_num_threads` in this process (CPU workers).
    """

    def __init__(self, recipe: Callable[[], Any], policy_kwargs: dict[str, Any] | None = None,
                 torch_dtype: torch.dtype | None = None, device: str = "cpu", num_threads: int | None = None):
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.device = torch.device(device)
        self.policy = build_policy(recipe, policy_kwargs)
        if self.device.type != "cpu" or torch_dtype is not None:
            self.policy.to(self.device, torch_dtype)
        self.policy.transformer.eval()
        self.version: int | None = None  # None: never synced, or a sync failed half-way
        self.group: WeightGroup | None = None

    def pid(self) -> int:
        return os.getpid()

    def ping(self) -> int | None:
        return self.version

    # --- weights ----------------------------------------------------------------------------------
    def _loader(self, plan: ChunkPlan, peft_config: Any) -> StateLoader:
        self.version = None
        if plan.lora:
            self.policy.transformer = ensure_adapter(self.policy.transformer, peft_config)
        return StateLoader(self.policy.transformer, plan)

    def load_from_object_store(self, version: int, plan: ChunkPlan, chunk_refs: list, peft_config: Any = None) -> int:
        """Fetch the chunks one by one from the object store (refs are nested in a list so Ray does not
        fetch them all up front) and load them; returns the byte count."""
        import ray

        loader = self._loader(plan, peft_config)
        assembler = StateAssembler(plan, self.device)
        for ref in chunk_refs:
            array = ray.get(ref)
            with warnings.catch_warnings():  # read-only shared memory: only read, then copied into the model
                warnings.simplefilter("ignore", UserWarning)
                chunk = torch.from_numpy(array)
            loader.load(assembler.add(chunk.to(self.device)))
        loader.finish()
        self.version = version
        return plan.total_bytes

    def node_id(self) -> str:
        """The Ray node this worker runs on (the engine meets its workers through a file when all share its node)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def join_group(self, backend: str, init_method: str, rank: int, world_size: int, name: str,
                   timeout_s: float) -> None:
        """Join the trainer's process group as `rank` (replacing any previous group) through `init_method`
        (`file:///path` or `tcp://addr:port`); this member's gloo device binds to the address Ray knows its node
        by (127.0.0.1 on a local instance)."""
        import ray

        self.leave_group()
        local_addr = ray.util.get_node_ip_address()
        self.group = WeightGroup(backend, init_method, rank, world_size, local_addr, name, timeout_s)

    def leave_group(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None

    def load_from_group(self, version: int, plan: ChunkPlan, peft_config: Any = None) -> int:
        """Receive the chunks by broadcast from the trainer (rank 0) and load them; returns the byte count."""
        if self.group is None:
            raise RuntimeError("join the process group before a collective weight sync")
        loader = self._loader(plan, peft_config)
        assembler = StateAssembler(plan, self.device)
        buffer = torch.empty(max(plan.chunk_nbytes, default=0), dtype=torch.uint8, device=self.group.device)
        for nbytes in plan.chunk_nbytes:
            chunk = buffer[:nbytes]
            self.group.broadcast(chunk)
            loader.load(assembler.add(chunk.to(self.device)))
        loader.finish()
        self.version = version
        return plan.total_bytes

    # --- sampling ---------------------------------------------------------------------------------
    def generate(self, task: RolloutTask) -> tuple[Trajectory, RewardInputs]:
        """Sample `task` with [`~rlhf_image.sampling.generate`]; returns the trajectory (on CPU) and the
        reward inputs as two objects, so rewards can be scored elsewhere without the latents."""
        if self.version != task.version:
            raise StaleWeightsError(f"task needs weights version {task.version}, worker holds {self.version}")
        trajectory = generate(self.policy, task.prompts, task.seeds, decode=True, **task.sampling)
        trajectory = trajectory_to(trajectory, "cpu")
        return trajectory, RewardInputs(task.indices, task.prompts, trajectory.pil_images())
