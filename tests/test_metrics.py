"""rlhf_image.metrics: FLOP count against an independent count, peak FLOP/s, MFU, timers, reductions, tables."""

import json
import time

import PIL.Image
import pytest
import torch
from tiny_models import tiny_flux_pipeline, tiny_ovis_pipeline

from rlhf_image.metrics import (PhaseTimer, forward_flops, image_grid, measure_peak_flops, mfu, reduce_metrics,
                                save_sample_table)
from rlhf_image.policy import FlowPolicy


def _independent_flops(policy, cond, latents):
    """2 * rows * in * out for every Linear (hooks on a real forward) plus the two attention matmuls
    (Q K^T and A V, 2 * B * heads * L^2 * head_dim each) per attention call."""
    total = 0
    attention_lengths = []

    def linear_hook(module, inputs, output):
        nonlocal total
        rows = inputs[0].numel() // module.in_features
        total += 2 * rows * module.in_features * module.out_features

    def attention_hook(module, args, kwargs, output):
        text = kwargs.get("encoder_hidden_states")
        attention_lengths.append(kwargs["hidden_states"].shape[1] + (0 if text is None else text.shape[1]))

    transformer = policy.transformer
    handles = [m.register_forward_hook(linear_hook) for m in transformer.modules() if isinstance(m, torch.nn.Linear)]
    handles += [m.register_forward_hook(attention_hook, with_kwargs=True) for name, m in transformer.named_modules()
                if name.endswith(".attn")]
    with torch.no_grad():
        policy.predict_velocity(latents, 0.5, cond)
    for handle in handles:
        handle.remove()
    config = transformer.config
    heads, head_dim = config.num_attention_heads, config.attention_head_dim
    batch = latents.shape[0]
    return total + sum(2 * 2 * batch * heads * length**2 * head_dim for length in attention_lengths)


@pytest.mark.parametrize("make_pipe", [tiny_ovis_pipeline, tiny_flux_pipeline], ids=["ovis", "flux"])
def test_forward_flops_match_an_independent_count(make_pipe):
    policy = FlowPolicy.from_pipeline(make_pipe())
    cond = policy.encode_prompt(["a", "b", "c"])
    latents = torch.randn(3, policy.num_latent_channels, *policy.latent_size(32, 48))
    counted = forward_flops(policy, cond, 32, 48, batch_size=3)
    assert counted == _independent_flops(policy, cond, latents)
    assert forward_flops(policy, cond, 32, 48, batch_size=6) == 2 * counted  # linear in the batch
    assert forward_flops(policy, cond, 64, 48, batch_size=3) > counted


def test_peak_flops_is_measured_once():
    start = time.perf_counter()
    peak = measure_peak_flops("cpu", torch.float32, size=256)
    first = time.perf_counter() - start
    assert peak > 1e8  # any CPU does more than 0.1 GFLOP/s
    start = time.perf_counter()
    assert measure_peak_flops("cpu", torch.float32, size=256) == peak  # cached per (device, dtype)
    assert time.perf_counter() - start < first


def test_mfu_timer_and_reductions():
    assert mfu(3e12, 2.0, 1e12) == 1.5 and mfu(1.0, 0.0, 1.0) == 0.0
    timer = PhaseTimer("cpu")
    with timer.phase("train"):
        time.sleep(0.01)
    timer.add("train", 1.0)
    timer.add("reward", 0.5)
    seconds = timer.pop()
    assert 1.01 <= seconds["train"] < 1.5 and seconds["reward"] == 0.5 and timer.pop() == {}
    reduced = reduce_metrics({"ratio/min": [1.0, 0.5], "ratio/max": [1.0, 2.0], "loss": [1.0, 3.0, float("nan")],
                              "skipped_total": [1, 2], "empty": [float("nan")]})
    assert reduced["ratio/min"] == 0.5 and reduced["ratio/max"] == 2.0 and reduced["loss"] == 2.0
    assert reduced["skipped_total"] == 2.0 and reduced["empty"] != reduced["empty"]


def test_sample_table_files(tmp_path):
    images = [PIL.Image.new("RGB", (8, 6), (i * 40, 0, 0)) for i in range(5)]
    grid = image_grid(images, columns=4)
    assert grid.size == (32, 12) and grid.getpixel((8, 0)) == (40, 0, 0) and grid.getpixel((0, 6)) == (160, 0, 0)
    rows = [{"prompt": f"p{i}", "total": float(i)} for i in range(5)]
    path = save_sample_table(str(tmp_path), 7, images, rows)
    assert json.load(open(path)) == {"step": 7, "samples": rows}
    assert PIL.Image.open(tmp_path / "step_000007.png").size == (32, 12)
