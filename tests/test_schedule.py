"""Inference sigmas against diffusers' scheduler; training sigma distributions and shifts; the diffusers functions
the library uses (calculate_shift, the timestep densities, the SD3 loss weighting) against their formulas."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from rlhf_image.schedule import (calculate_shift, inference_sigmas, loss_weighting, sample_training_sigmas,
                                 scheduler_sigmas, shift_training_sigmas, time_shift)

DYNAMIC = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
               max_image_seq_len=4096)


@pytest.mark.parametrize("config", [DYNAMIC, dict(shift=3.0), dict(shift=1.0), {**DYNAMIC, "time_shift_type": "linear"}])
@pytest.mark.parametrize("num_steps,seq_len", [(50, 4096), (10, 1024), (4, 16), (28, 256)])
def test_inference_sigmas_equal_diffusers_scheduler(config, num_steps, seq_len):
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    mu = calculate_shift(seq_len) if config.get("use_dynamic_shifting") else None
    # What the Ovis-Image and FLUX pipelines pass to the scheduler.
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    ours = inference_sigmas(num_steps, seq_len, scheduler.config)
    assert ours.shape == (num_steps + 1,) and ours[-1] == 0
    assert torch.equal(ours, scheduler.sigmas)


def test_calculate_shift_is_the_linear_formula():
    assert calculate_shift(256) == pytest.approx(0.5)
    assert calculate_shift(4096) == pytest.approx(1.15)
    for seq_len in (1, 16, 256, 1024, 4096, 16384):
        for base, top, low, high in ((256, 4096, 0.5, 1.15), (256, 8192, 0.5, 0.9)):
            slope = (high - low) / (top - base)
            assert calculate_shift(seq_len, base, top, low, high) == seq_len * slope + (low - slope * base)


@pytest.mark.parametrize("option", [dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True),
                                    dict(shift_terminal=0.1), dict(time_shift_type="linear")])
@pytest.mark.parametrize("base", [DYNAMIC, dict(shift=3.0)])
def test_scheduler_options_are_computed_by_the_scheduler(base, option):
    config = {**base, **option}
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    mu = calculate_shift(1024) if config.get("use_dynamic_shifting") else None
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 10, 10), mu=mu)
    assert torch.equal(inference_sigmas(10, 1024, scheduler.config), scheduler.sigmas)
    # and with no sigmas passed (SD3's pipeline), what set_timesteps(num_steps) gives
    scheduler.set_timesteps(10, mu=mu)
    assert torch.equal(scheduler_sigmas(scheduler.config, 10, mu=mu), scheduler.sigmas)


def test_sd3_style_schedule_ends_where_the_scheduler_ends():
    """With no sigmas passed, 10 steps at shift 3 end at 0.0089 (the scheduler's shifted sigma_min), not at
    shift(1/10) = 0.25 as FLUX's linspace does."""
    config = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    assert scheduler_sigmas(config, 10)[-2].item() == pytest.approx(0.0089, abs=1e-4)
    assert inference_sigmas(10, 1024, config)[-2].item() == pytest.approx(0.25, abs=1e-6)


def test_logit_normal_training_sigmas_follow_the_distribution():
    g = torch.Generator().manual_seed(0)
    sigmas = sample_training_sigmas(200_000, "logit_normal", logit_mean=0.3, logit_std=0.8, generator=g)
    logits = torch.log(sigmas / (1 - sigmas))
    assert logits.mean().item() == pytest.approx(0.3, abs=0.01)
    assert logits.std().item() == pytest.approx(0.8, abs=0.01)


@pytest.mark.parametrize("size", [3, 4, 16, 1000])
@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (0.3, 0.8)])
def test_training_sigmas_are_the_formula(size, mean, std):
    """diffusers' compute_density_for_timestep_sampling draws sigmoid(m + n z) and U(0, 1) from the generator: equal
    bit for bit for the standard logit-normal and the uniform, within one float32 rounding otherwise (torch.normal
    computes m + n z in another order)."""
    ours = sample_training_sigmas(size, "logit_normal", logit_mean=mean, logit_std=std,
                                  generator=torch.Generator().manual_seed(3))
    formula = torch.sigmoid(mean + std * torch.randn(size, generator=torch.Generator().manual_seed(3)))
    if (mean, std) == (0.0, 1.0):
        assert torch.equal(ours, formula)
    torch.testing.assert_close(ours, formula, rtol=2.5e-7, atol=0)
    uniform = sample_training_sigmas(size, "uniform", generator=torch.Generator().manual_seed(3))
    assert torch.equal(uniform, torch.rand(size, generator=torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="unknown timestep sampling"):
        sample_training_sigmas(4, "beta")


@pytest.mark.parametrize("kind", ["exponential", "linear"])
@pytest.mark.parametrize("seq_len", [16, 1024, 4096])
def test_training_shift_follows_the_scheduler_time_shift_type(kind, seq_len):
    """The resolution shift is the scheduler's own: exponential or linear as its time_shift_type says (a linear-shift
    model was given the exponential shift before), at mu = calculate_shift(seq_len) from its config."""
    config = {**DYNAMIC, "time_shift_type": kind}
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    base = sample_training_sigmas(500, "uniform", generator=torch.Generator().manual_seed(1)).clamp(1e-4, 1 - 1e-4)
    shifted = shift_training_sigmas(base, seq_len, scheduler.config, "resolution")
    mu = calculate_shift(seq_len)
    torch.testing.assert_close(shifted, scheduler.time_shift(mu, 1.0, base).float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(shifted, time_shift(base, mu, kind).float())
    if kind == "exponential":
        assert (shifted >= base).all()  # mu > 0: toward noise
    static = shift_training_sigmas(base, seq_len, {"shift": 3.0}, "static")
    torch.testing.assert_close(static, 3 * base / (1 + 2 * base))
    assert torch.equal(shift_training_sigmas(base, seq_len, config, "none"), base)
    with pytest.raises(ValueError, match="time_shift_type"):
        shift_training_sigmas(base, seq_len, {**config, "time_shift_type": "cubic"}, "resolution")


def test_loss_weighting_is_the_sd3_formula():
    """diffusers' compute_loss_weighting_for_sd3 against the formulas, bit for bit."""
    s = torch.tensor([0.25, 0.5])
    assert torch.equal(loss_weighting(s, "sigma_sqrt"), torch.tensor([16.0, 4.0]))
    s = torch.rand(1000, generator=torch.Generator().manual_seed(0)).clamp(min=1e-3)
    assert torch.equal(loss_weighting(s, "sigma_sqrt"), (s**-2.0).float())
    assert torch.equal(loss_weighting(s, "cosmap"), 2 / (math.pi * (1 - 2 * s + 2 * s**2)))
    assert torch.equal(loss_weighting(s), torch.ones(1000))
    with pytest.raises(ValueError, match="unknown loss weighting"):
        loss_weighting(s, "snr")
