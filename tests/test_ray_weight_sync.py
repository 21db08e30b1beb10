"""Weight-sync payloads: chunk plans bound the bytes, and chunks rebuild the exact tensors (no Ray needed)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from rlhf_image.policy import FlowPolicy
from rlhf_image.rollout.engine import split_by_group
from rlhf_image.rollout.weight_sync import (StateAssembler, StateLoader, ensure_adapter, iter_chunks, pack_chunk, plan_chunks,
                                 trainable_state)
from tiny_models import MAX_SEQUENCE_LENGTH, tiny_ovis_pipeline

LORA = dict(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=True)


def mixed_state():
    g = torch.Generator().manual_seed(0)
    return {
        "big": torch.randn(50, 33, generator=g),  # 6600 bytes: spans several chunks
        "half": torch.randn(7, 3, generator=g).to(torch.bfloat16),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "ids": torch.arange(5),
        "mask": torch.tensor([True, False, True]),
        "strided": torch.randn(6, 4, generator=g).t(),  # not contiguous
    }


def rebuild(state, plan, device="cpu"):
    assembler, out = StateAssembler(plan, device), {}
    for chunk in iter_chunks(state, plan):
        out.update({name: t.clone() for name, t in assembler.add(chunk.clone())})
    assert assembler.complete
    return out


@pytest.mark.parametrize("max_chunk_bytes", [64, 1000, 4096, 1 << 20])
def test_chunks_are_bounded_and_rebuild_every_tensor_exactly(max_chunk_bytes):
    state = mixed_state()
    plan = plan_chunks(state, max_chunk_bytes, lora=False)
    assert all(n <= max_chunk_bytes for n in plan.chunk_nbytes)
    assert plan.total_bytes == sum(t.numel() * t.element_size() for t in state.values())
    # every byte of every tensor is in exactly one segment
    covered = {name: 0 for name in state}
    for segments in plan.chunks:
        for seg in segments:
            covered[plan.specs[seg.tensor].name] += seg.stop - seg.start
    assert covered == {name: t.numel() * t.element_size() for name, t in state.items()}
    out = rebuild(state, plan)
    assert list(out) == list(state)
    for name, tensor in state.items():
        assert out[name].dtype == tensor.dtype and out[name].shape == tensor.shape
        assert torch.equal(out[name], tensor), name
    if max_chunk_bytes == 1 << 20:
        assert len(plan) == 1


def test_pack_chunk_alone_equals_the_streamed_chunk_and_wrong_sizes_are_refused():
    state = mixed_state()
    plan = plan_chunks(state, 1000, lora=False)
    streamed = [c.clone() for c in iter_chunks(state, plan)]
    for i, chunk in enumerate(streamed):
        assert torch.equal(pack_chunk(state, plan, i), chunk)
    with pytest.raises(ValueError, match="chunk 0 should be"):
        StateAssembler(plan).add(streamed[0][:-64])
    with pytest.raises(ValueError, match="max_chunk_bytes"):
        plan_chunks(state, 32, lora=False)


def test_full_weights_load_into_a_fresh_replica():
    trainer = FlowPolicy.from_pipeline(tiny_ovis_pipeline(seed=0), max_sequence_length=MAX_SEQUENCE_LENGTH)
    trainer.transformer.requires_grad_(True)
    worker = FlowPolicy.from_pipeline(tiny_ovis_pipeline(seed=1), max_sequence_length=MAX_SEQUENCE_LENGTH)
    state, lora = trainable_state(trainer.transformer)
    assert not lora and set(state) == {n for n, _ in trainer.transformer.named_parameters()}
    plan = plan_chunks(state, 4096, lora)
    loader = StateLoader(worker.transformer, plan)
    assembler = StateAssembler(plan)
    for chunk in iter_chunks(state, plan):
        loader.load(assembler.add(chunk.clone()))
    loader.finish()
    for (name, a), (_, b) in zip(trainer.transformer.named_parameters(), worker.transformer.named_parameters()):
        assert torch.equal(a, b), name


def test_lora_sends_only_the_adapter_and_loads_it_into_the_workers_peft_model():
    trainer = FlowPolicy.from_pipeline(tiny_ovis_pipeline(seed=0), max_sequence_length=MAX_SEQUENCE_LENGTH)
    trainer.transformer = get_peft_model(trainer.transformer, LoraConfig(**LORA))
    with torch.no_grad():
        for name, p in trainer.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(len(name)))
    state, lora = trainable_state(trainer.transformer)
    assert lora and state and all("lora_" in name for name in state)
    adapter_bytes = sum(t.numel() * t.element_size() for t in state.values())
    full_bytes = sum(p.numel() * p.element_size() for p in trainer.transformer.get_base_model().parameters())
    assert adapter_bytes < full_bytes / 5

    worker = FlowPolicy.from_pipeline(tiny_ovis_pipeline(seed=0), max_sequence_length=MAX_SEQUENCE_LENGTH)
    worker.transformer = ensure_adapter(worker.transformer, trainer.transformer.peft_config["default"])
    plan = plan_chunks(state, 256, lora)
    loader = StateLoader(worker.transformer, plan)
    assembler = StateAssembler(plan)
    for chunk in iter_chunks(state, plan):
        loader.load(assembler.add(chunk.clone()))
    loader.finish()
    trained = dict(trainer.transformer.named_parameters())
    for name, p in worker.transformer.named_parameters():
        assert torch.equal(p, trained[name]), name

    with pytest.raises(ValueError, match="LoRA payload needs a peft transformer"):
        StateLoader(FlowPolicy.from_pipeline(tiny_ovis_pipeline(seed=0)).transformer, plan)


def test_an_incomplete_or_foreign_payload_is_refused():
    worker = FlowPolicy.from_pipeline(tiny_ovis_pipeline(seed=0)).transformer
    state = {"not_a_weight": torch.zeros(3)}
    plan = plan_chunks(state, 1024, lora=False)
    with pytest.raises(KeyError, match="not_a_weight"):
        StateLoader(worker, plan).load(StateAssembler(plan).add(pack_chunk(state, plan, 0)))
    name, param = next(iter(worker.named_parameters()))
    plan = plan_chunks({name: param.detach(), "x_embedder.bias": param.detach()}, 1024, lora=False)
    loader = StateLoader(worker, plan)
    loader.load([(name, param.detach().clone())])
    with pytest.raises(RuntimeError, match="incomplete weight sync"):
        loader.finish()


@pytest.mark.parametrize("prompts,workers,expected", [
    (list("aabbccdd"), 2, [(0, 4), (4, 8)]),
    (list("aabbccdd"), 1, [(0, 8)]),
    (list("aaabbbc"), 2, [(0, 3), (3, 7)]),
    (list("aaaa"), 2, [(0, 4), (4, 4)]),  # one group is never split
    (list("abcdef"), 3, [(0, 2), (2, 4), (4, 6)]),
])
def test_split_keeps_groups_whole_and_covers_the_batch(prompts, workers, expected):
    ranges = split_by_group(prompts, workers)
    assert ranges == expected
    for start, end in ranges:  # no group crosses a boundary
        assert start == 0 or start == len(prompts) or prompts[start] != prompts[start - 1]
