"""The generic route: a stock pipeline driven without a family adapter (`rlhf_image.generic`). Sampling at noise 0
equals the pipeline, replaying a recorded stochastic step recomputes its log-prob bit for bit (ratio exactly 1), a
LoRA trains through the replay, and a non-linear CFG is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_models as tm
from rlhf_image.generic import GenericFlowPolicy, identify_combination

PROMPTS = ["a red cube on a table", "二维码 and a cat"]
# Families driven without their adapters, with their stock guidance style: SD3.5 (CFG in one batched call of
# [uncond, cond]), FLUX.1 dev (true CFG in two calls, guidance embedding), Z-Image (lists of per-sample tensors, one
# batched call, CFG counted from 0, output sign flipped), Chroma (true CFG in two calls, attention masks).
CASES = {
    "sd3.5": (lambda: tm.tiny_sd3_pipeline(version="3.5"), dict(guidance_scale=4.0, max_sequence_length=16)),
    "flux1-dev": (tm.tiny_flux_pipeline, dict(true_cfg_scale=4.0, negative_prompt=["", ""], max_sequence_length=16)),
    "z-image": (tm.tiny_z_image_pipeline, dict(guidance_scale=3.0, max_sequence_length=48)),
    "chroma": (tm.tiny_chroma_pipeline, dict(guidance_scale=4.0, max_sequence_length=16)),
}


def run_stock(pipe, kwargs):
    generators = [torch.Generator().manual_seed(s) for s in range(len(PROMPTS))]
    return pipe(prompt=list(PROMPTS), generator=generators, num_inference_steps=4, height=32, width=32,
                output_type="np", **kwargs).images


@pytest.mark.parametrize("name", list(CASES))
def test_generic_sampling_equals_the_pipeline_and_replay_is_exactly_on_policy(name):
    build, kwargs = CASES[name]
    pipe = build()
    policy = GenericFlowPolicy(pipe)
    ode = policy.sample(PROMPTS, [0, 1], num_steps=4, sde_type="ode", height=32, width=32, output_type="np",
                        **kwargs)
    assert np.abs(ode.output.images - run_stock(pipe, kwargs)).max() <= 1e-5
    for sde_type in ("sde", "cps"):
        trajectory = policy.sample(PROMPTS, [0, 1], num_steps=4, sde_type=sde_type, window=(1, 3), height=32,
                                   width=32, output_type="np", **kwargs)
        assert trajectory.step_indices == [1, 2]
        for j, step in enumerate(trajectory.steps):
            with torch.no_grad():
                log_prob, _, _ = policy.log_prob(trajectory, j)
            assert torch.equal(log_prob, step.log_prob)  # ratio exactly 1
            assert torch.isfinite(log_prob).all()


def test_a_lora_trains_through_the_replay():
    from peft import LoraConfig, get_peft_model

    pipe = tm.tiny_sd3_pipeline(version="3.5")
    policy = GenericFlowPolicy(pipe)
    kwargs = dict(guidance_scale=4.0, max_sequence_length=16)
    trajectory = policy.sample(PROMPTS, [0, 1], num_steps=3, sde_type="sde", height=32, width=32,
                               output_type="np", **kwargs)
    model = get_peft_model(pipe.transformer, LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                                        target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    log_prob, _, _ = policy.log_prob(trajectory, 0, transformer=model)
    (-log_prob.mean()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and sum(grad.abs().sum() for grad in grads) > 0
    optimizer.step()
    with torch.no_grad():
        after, _, _ = policy.log_prob(trajectory, 0, transformer=model)
    assert (after.mean() > log_prob.mean()).item()  # one ascent step raises the recorded transition's log-prob


def test_a_norm_rescaled_cfg_is_refused_and_plain_qwen_image_works():
    pipe = tm.tiny_qwen_image_pipeline()
    policy = GenericFlowPolicy(pipe)
    with pytest.raises(ValueError, match="not linear"):
        policy.sample(PROMPTS, [0, 1], num_steps=2, height=32, width=32, output_type="np", true_cfg_scale=4.0,
                      negative_prompt=["", ""], max_sequence_length=16)
    assert pipe.transformer.__class__.__name__ == "QwenImageTransformer2DModel"  # the stand-ins were removed
    kwargs = dict(true_cfg_scale=1.0, max_sequence_length=16)
    ode = policy.sample(PROMPTS, [0, 1], num_steps=3, sde_type="ode", height=32, width=32, output_type="np",
                        **kwargs)
    generators = [torch.Generator().manual_seed(s) for s in range(2)]
    stock = pipe(prompt=list(PROMPTS), generator=generators, num_inference_steps=3, height=32, width=32,
                 output_type="np", **kwargs).images
    assert np.abs(ode.output.images - stock).max() <= 1e-5


def test_identify_combination_finds_cfg_weights_and_refuses_what_is_not_linear():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(4, 50, generator=g)  # [uncond_0, uncond_1, cond_0, cond_1]
    velocity = rows[:2] + 4.5 * (rows[2:] - rows[:2])
    weights = identify_combination(rows, velocity)
    assert torch.equal(weights, torch.tensor([[-3.5, 0, 4.5, 0], [0, -3.5, 0, 4.5]]))
    rescaled = velocity * (rows[2:].norm(dim=-1, keepdim=True) / velocity.norm(dim=-1, keepdim=True))
    rescaled = rescaled * torch.linspace(0.5, 1.5, 50)  # a per-element rescaling no row weighting reproduces
    with pytest.raises(ValueError, match="not linear"):
        identify_combination(rows, rescaled)
    with pytest.raises(ValueError, match="linearly dependent"):
        identify_combination(torch.cat([rows, rows[:1]]), velocity)
