"""What a weight sync sends, cut into chunks of bounded size, and how a worker puts it back.

The payload is the policy's trainable state: the peft state dict of the adapter when the transformer is a
peft (LoRA) model, otherwise every trainable parameter of the transformer, by name. Its bytes are laid end
to end and cut into chunks of at most `max_chunk_bytes`; a tensor larger than a chunk spans several. Each
chunk is one flat `uint8` tensor, so one chunk is one `ray.put` or one `broadcast`, whatever the dtypes.
Offsets are 64-byte aligned so that a tensor inside a chunk can be viewed in its dtype without a copy.

Transports (see `rlhf_image.rollout.engine`): Ray's object store (`ray.put` of each chunk as a numpy array, which
workers on the node map read-only from shared memory) or a `torch.distributed` process group (trainer rank
0, workers 1..N, one broadcast per chunk; see `rlhf_image.rollout.collective`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

_ALIGN = 64  # bytes; a multiple of every dtype's size


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the payload: its name, shape, dtype and size in bytes."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


@dataclass(frozen=True)
class Segment:
    """Bytes `[start, stop)` of tensor `tensor` (an index into `ChunkPlan.specs`), at `offset` in the chunk."""

    tensor: int
    start: int
    stop: int
    offset: int


@dataclass(frozen=True)
class ChunkPlan:
    """How a payload is cut into chunks; sent ahead of the chunks, so a receiver can allocate and reassemble.

    Args:
        specs (`tuple[TensorSpec]`): the tensors, in payload order.
        chunks (`tuple[tuple[Segment, ...], ...]`): the segments of each chunk.
        chunk_nbytes (`tuple[int, ...]`): the size of each chunk in bytes.
        lora (`bool`): the payload is a peft adapter state dict (else named trainable parameters).
    """

    specs: tuple[TensorSpec, ...]
    chunks: tuple[tuple[Segment, ...], ...]
    chunk_nbytes: tuple[int, ...]
    lora: bool

    @property
    def total_bytes(self) -> int:
        return sum(spec.nbytes for spec in self.specs)

    def __len__(self) -> int:
        return len(self.chunks)


def trainable_state(transformer: torch.nn.Module) -> tuple[dict[str, torch.Tensor], bool]:
    """The tensors a weight sync sends, and whether they are a LoRA adapter.

    Args:
        transformer (`torch.nn.Module`): the policy's transformer, a `peft.PeftModel` when training LoRA.

    Returns:
        `(state, lora)`: the peft state dict of the active adapter (`lora=True`) or the trainable parameters
        by name (`lora=False`); tensors are detached views of the live weights, on their device.
    """
    if isinstance(transformer, PeftModel):
        state = get_peft_model_state_dict(transformer, adapter_name=transformer.active_adapter)
        return {name: tensor.detach() for name, tensor in state.items()}, True
    state = {name: p.detach() for name, p in transformer.named_parameters() if p.requires_grad}
    if not state:
        raise ValueError("the transformer has no trainable parameter to sync; call `requires_grad_(True)` on what "
                         "trains, or wrap it with peft for LoRA")
    return state, False


def plan_chunks(state: dict[str, torch.Tensor], max_chunk_bytes: int, lora: bool) -> ChunkPlan:
    """Cut the payload `state` into chunks of at most `max_chunk_bytes` bytes (64-byte aligned pieces)."""
    if max_chunk_bytes < _ALIGN:
        raise ValueError(f"max_chunk_bytes must be at least {_ALIGN}, got {max_chunk_bytes}")
    max_chunk_bytes -= max_chunk_bytes % _ALIGN
    specs = tuple(TensorSpec(name, tuple(t.shape), t.dtype, t.numel() * t.element_size()) for name, t in state.items())
    chunks: list[tuple[Segment, ...]] = []
    sizes: list[int] = []
    current: list[Segment] = []
    used = 0
    for index, spec in enumerate(specs):
        start = 0
        while start < spec.nbytes:
            if used >= max_chunk_bytes:
                chunks.append(tuple(current))
                sizes.append(used)
                current, used = [], 0
            length = min(spec.nbytes - start, max_chunk_bytes - used)
            current.append(Segment(index, start, start + length, used))
            used = _aligned(used + length)
            start += length
    if current:
        chunks.append(tuple(current))
        sizes.append(used)
    return ChunkPlan(specs, tuple(chunks), tuple(sizes), lora)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def pack_chunk(state: dict[str, torch.Tensor], plan: ChunkPlan, index: int,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Chunk `index` of `state` as one flat `uint8` tensor on the state's device.

    Args:
        out (`torch.Tensor`, *optional*): a `uint8` buffer of at least the chunk's size to fill (reused
            between chunks to bound memory); the returned tensor is a view of it.
    """
    nbytes = plan.chunk_nbytes[index]
    segments = plan.chunks[index]
    device = state[plan.specs[segments[0].tensor].name].device
    out = torch.empty(nbytes, dtype=torch.uint8, device=device) if out is None else out[:nbytes]
    end = 0
    for seg in segments:
        out[end:seg.offset].zero_()  # alignment padding: zeros, so a chunk's bytes are deterministic
        source = _bytes(state[plan.specs[seg.tensor].name])
        end = seg.offset + seg.stop - seg.start
        out[seg.offset:end].copy_(source[seg.start:seg.stop])
    out[end:].zero_()
    return out


def iter_chunks(state: dict[str, torch.Tensor], plan: ChunkPlan) -> Iterator[torch.Tensor]:
    """All chunks in order, packed into one reused buffer: each is valid until the next is produced."""
    if not plan.chunks:
        return
    device = state[plan.specs[0].name].device
    buffer = torch.empty(max(plan.chunk_nbytes), dtype=torch.uint8, device=device)
    for index in range(len(plan)):
        yield pack_chunk(state, plan, index, buffer)


class StateAssembler:
    """Rebuilds the payload's tensors from chunks received in order.

    `add` returns the tensors completed by a chunk; a tensor held whole in the chunk is a view of the chunk
    (valid while the chunk is), a tensor split over chunks is gathered in its own buffer on `device`.
    """

    def __init__(self, plan: ChunkPlan, device: torch.device | str = "cpu"):
        self.plan = plan
        self.device = torch.device(device)
        self.partial: dict[int, torch.Tensor] = {}
        self.next_chunk = 0

    def add(self, chunk: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        index = self.next_chunk
        if chunk.dtype != torch.uint8 or chunk.numel() != self.plan.chunk_nbytes[index]:
            raise ValueError(f"chunk {index} should be {self.plan.chunk_nbytes[index]} uint8 bytes, got "
                             f"{chunk.numel()} of {chunk.dtype}")
        self.next_chunk += 1
        done = []
        for seg in self.plan.chunks[index]:
            spec = self.plan.specs[seg.tensor]
            piece = chunk[seg.offset:seg.offset + seg.stop - seg.start]
            if seg.start == 0 and seg.stop == spec.nbytes:
                done.append((spec.name, piece.view(spec.dtype).view(spec.shape)))
                continue
            if seg.tensor not in self.partial:
                self.partial[seg.tensor] = torch.empty(spec.nbytes, dtype=torch.uint8, device=self.device)
            buffer = self.partial[seg.tensor]
            buffer[seg.start:seg.stop].copy_(piece)
            if seg.stop == spec.nbytes:  # segments of one tensor arrive in byte order
                done.append((spec.name, self.partial.pop(seg.tensor).view(spec.dtype).view(spec.shape)))
        return done

    @property
    def complete(self) -> bool:
        return self.next_chunk == len(self.plan) and not self.partial


def ensure_adapter(transformer: torch.nn.Module, peft_config) -> torch.nn.Module:
    """The worker's transformer with the trainer's LoRA adapter structure: `get_peft_model(transformer,
    peft_config)` the first time (weights come with the sync), the model itself when it already has one."""
    if isinstance(transformer, PeftModel):
        return transformer
    return get_peft_model(transformer, peft_config).eval()


class StateLoader:
    """Copies received tensors into a worker's transformer.

    Full weights are copied parameter by parameter as they arrive (casting to the worker's dtype); a LoRA
    adapter is collected and loaded at the end with `peft.set_peft_model_state_dict`. `finish` checks that
    exactly the worker's trainable set was received.
    """

    def __init__(self, transformer: torch.nn.Module, plan: ChunkPlan):
        self.transformer = transformer
        self.plan = plan
        self.lora = plan.lora
        if self.lora != isinstance(transformer, PeftModel):
            raise ValueError("a LoRA payload needs a peft transformer and full weights a plain one")
        self.params = {} if self.lora else dict(transformer.named_parameters())
        self.adapter: dict[str, torch.Tensor] = {}
        self.received: set[str] = set()

    @torch.no_grad()
    def load(self, tensors: list[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in tensors:
            self.received.add(name)
            if self.lora:
                self.adapter[name] = tensor.clone()
                continue
            param = self.params.get(name)
            if param is None:
                raise KeyError(f"the trainer sent weight {name!r}, which the worker's model does not have: the "
                               "model recipe must build the trainer's architecture")
            if tuple(param.shape) != tuple(tensor.shape):
                raise ValueError(f"weight {name!r}: trainer shape {tuple(tensor.shape)}, worker {tuple(param.shape)}")
            param.copy_(tensor)

    def finish(self) -> None:
        expected = {spec.name for spec in self.plan.specs}
        if self.received != expected:
            raise RuntimeError(f"incomplete weight sync: {len(expected - self.received)} tensors missing")
        if self.lora:
            result = set_peft_model_state_dict(self.transformer, self.adapter,
                                               adapter_name=self.transformer.active_adapter)
            unexpected = list(result.unexpected_keys)
            missing = [k for k in result.missing_keys if "lora_" in k]
            if unexpected or missing:
                raise RuntimeError(f"LoRA adapter does not match the worker's: unexpected {unexpected[:4]}, "
                                   f"missing {missing[:4]}; the model recipe must build the trainer's base model")
