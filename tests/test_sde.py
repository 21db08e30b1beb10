"""The ODE/SDE/CPS steps against the Euler step and independent Gaussian densities."""

import math

import pytest
import torch
from torch.distributions import Normal

from rlhf_image.sde import cps_step_with_logprob, ode_step, sde_step_with_logprob, step_kl


def _inputs(seed=0, shape=(3, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("step_fn", [sde_step_with_logprob, cps_step_with_logprob])
@pytest.mark.parametrize("sigma,sigma_next", [(1.0, 0.9), (0.6, 0.45), (0.2, 0.0)])
def test_zero_noise_is_exactly_euler(step_fn, sigma, sigma_next):
    v, x = _inputs()
    euler = ode_step(v, x, sigma, sigma_next)
    prev, _, mean, _ = step_fn(v, x, sigma, sigma_next, noise_level=0.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(prev, euler) and torch.equal(mean, euler)
    assert torch.equal(euler, x + (torch.tensor(sigma_next) - torch.tensor(sigma)) * v)


def test_sde_log_prob_matches_normal_density():
    v, x = _inputs()
    sigma, sigma_next, a = torch.tensor([0.8, 0.5, 1.0]), torch.tensor([0.7, 0.3, 0.9]), 0.7
    prev, log_prob, mean, std = sde_step_with_logprob(v, x, sigma, sigma_next, a, torch.Generator().manual_seed(3))
    # Independent computation of the Flow-GRPO transition (DESIGN.md), float64.
    s, sn = sigma.double().view(-1, 1, 1, 1), sigma_next.double().view(-1, 1, 1, 1)
    dt = sn - s
    std_t = a * torch.sqrt(s / (1 - torch.where(s == 1, sn, s)))
    ref_mean = x.double() + (v.double() + std_t**2 / (2 * s) * (x.double() + (1 - s) * v.double())) * dt
    ref_std = std_t * torch.sqrt(-dt)
    ref = Normal(ref_mean, ref_std).log_prob(prev.double()).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std.expand_as(mean).double(), ref_std.expand_as(ref_mean), rtol=1e-6, atol=1e-7)
    assert log_prob.dtype == torch.float32


def test_cps_log_prob_matches_normal_density():
    v, x = _inputs(1)
    sigma, sigma_next, a = 0.7, 0.5, 0.6
    prev, log_prob, mean, std = cps_step_with_logprob(v, x, sigma, sigma_next, a, torch.Generator().manual_seed(3))
    s_noise = sigma_next * math.sin(a * math.pi / 2)
    x0, x1 = x.double() - sigma * v.double(), x.double() + (1 - sigma) * v.double()
    ref_mean = (1 - sigma_next) * x0 + math.sqrt(sigma_next**2 - s_noise**2) * x1
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-5)
    assert float(std) == pytest.approx(s_noise)
    ref = Normal(ref_mean, s_noise).log_prob(prev.double()).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("step_fn", [sde_step_with_logprob, cps_step_with_logprob])
def test_given_transition_reproduces_recorded_log_prob(step_fn):
    v, x = _inputs(2)
    prev, log_prob, mean, _ = step_fn(v, x, 0.5, 0.4, 0.7, torch.Generator().manual_seed(5))
    _, again, mean_again, _ = step_fn(v, x, 0.5, 0.4, 0.7, prev_sample=prev)
    assert torch.equal(again, log_prob) and torch.equal(mean_again, mean)


def test_log_prob_is_float32_for_bf16_models_and_differentiable():
    v, x = _inputs(3)
    v = v.bfloat16().requires_grad_(True)
    prev, log_prob, _, _ = sde_step_with_logprob(v, x.bfloat16(), 0.5, 0.4, 0.7, torch.Generator().manual_seed(0))
    assert prev.dtype == log_prob.dtype == torch.float32
    log_prob.sum().backward()
    assert v.grad is not None and torch.isfinite(v.grad.float()).all()


def test_per_sample_generators_make_noise_independent_of_batch():
    v, x = _inputs(4)
    gens = [torch.Generator().manual_seed(s) for s in (10, 11, 12)]
    batch, _, _, _ = sde_step_with_logprob(v, x, 0.5, 0.4, 0.7, gens)
    alone, _, _, _ = sde_step_with_logprob(v[1:2], x[1:2], 0.5, 0.4, 0.7, [torch.Generator().manual_seed(11)])
    assert torch.equal(batch[1:2], alone)


def test_cps_last_step_is_deterministic_with_zero_log_prob():
    v, x = _inputs(5)
    prev, log_prob, mean, std = cps_step_with_logprob(v, x, 0.2, 0.0, 0.7, torch.Generator().manual_seed(0))
    assert torch.equal(prev, mean) and torch.equal(log_prob, torch.zeros(3)) and float(std) == 0.0


def test_step_kl_is_gaussian_kl():
    v, x = _inputs(6)
    _, _, mean, std = sde_step_with_logprob(v, x, 0.5, 0.4, 0.7, prev_sample=x)
    _, _, ref_mean, _ = sde_step_with_logprob(v + 0.1, x, 0.5, 0.4, 0.7, prev_sample=x)
    kl = step_kl(mean, ref_mean, std)
    ref = torch.distributions.kl_divergence(Normal(mean.double(), std.double()), Normal(ref_mean.double(), std.double()))
    torch.testing.assert_close(kl.double(), ref.mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-7)
    assert torch.equal(step_kl(mean, mean, std), torch.zeros(3))
