"""Inference sigmas against diffusers' scheduler; training sigma distributions."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from rlhf_image.schedule import (calculate_shift, inference_sigmas, loss_weighting, sample_training_sigmas,
                                 scheduler_sigmas, time_shift)

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


def test_calculate_shift_endpoints():
    assert calculate_shift(256) == pytest.approx(0.5)
    assert calculate_shift(4096) == pytest.approx(1.15)


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


def test_training_sigma_shifts():
    g = torch.Generator().manual_seed(1)
    base = sample_training_sigmas(1000, "uniform", generator=torch.Generator().manual_seed(1))
    shifted = sample_training_sigmas(1000, "uniform", shift=3.0, generator=g)
    torch.testing.assert_close(shifted, 3 * base / (1 + 2 * base))
    mu_shifted = sample_training_sigmas(1000, "uniform", mu=0.9, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(mu_shifted, time_shift(base, 0.9))
    assert (mu_shifted >= base).all()  # a positive shift moves toward noise
    with pytest.raises(ValueError, match="either `mu`"):
        sample_training_sigmas(4, mu=1.0, shift=2.0)
    with pytest.raises(ValueError, match="unknown timestep sampling"):
        sample_training_sigmas(4, "beta")


def test_loss_weighting():
    s = torch.tensor([0.25, 0.5])
    torch.testing.assert_close(loss_weighting(s, "sigma_sqrt"), torch.tensor([16.0, 4.0]))
    torch.testing.assert_close(loss_weighting(s, "cosmap"), 2 / (math.pi * (1 - 2 * s + 2 * s**2)))
    assert torch.equal(loss_weighting(s), torch.ones(2))
