"""The ODE/SDE/CPS steps against the Euler step and independent Gaussian densities."""

import math

import pytest
import torch
from torch.distributions import Normal

from diffusers.utils.torch_utils import randn_tensor

from rlhf_image.sde import cps_step_with_logprob, gaussian_log_prob, ode_step, sde_step_with_logprob, step_kl


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


# --- the std == 0 guard on the per-sample result: bit-identical to the guard on full-size tensors ---------------

def _old_gaussian_log_prob(x, mean, std):
    """The library's log-prob before the guard moved to the per-sample result (guard on every element)."""
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    log_prob = -((x - mean) ** 2) / (2 * safe_std**2) - torch.log(safe_std) - 0.5 * math.log(2 * math.pi)
    log_prob = torch.where(std > 0, log_prob, torch.zeros_like(log_prob))
    return log_prob.mean(dim=tuple(range(1, x.ndim)))


def _old_step(kind, velocity, latents, sigma, sigma_next, noise_level, generator=None, prev_sample=None):
    """The library's SDE and CPS steps before the change, verbatim but for the guard's place."""
    latents, velocity = latents.float(), velocity.float()

    def expand(value):
        value = torch.as_tensor(value, dtype=torch.float32)
        return value if value.ndim == 0 else value.reshape(-1, *([1] * (latents.ndim - 1)))

    sigma, sigma_next = expand(sigma), expand(sigma_next)
    if kind == "sde":
        dt = sigma_next - sigma
        std_t = noise_level * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_next, sigma)))
        mean = latents + (velocity + std_t**2 / (2 * sigma) * (latents + (1 - sigma) * velocity)) * dt
        std = std_t * torch.sqrt(-dt)
    elif noise_level == 0:
        mean, std = latents + (sigma_next - sigma) * velocity, torch.zeros_like(sigma_next)
    else:
        std = sigma_next * math.sin(noise_level * math.pi / 2)
        mean = (1 - sigma_next) * (latents - sigma * velocity) + torch.sqrt(sigma_next**2 - std**2) * (
            latents + (1 - sigma) * velocity)
    if prev_sample is None:
        noise = randn_tensor(mean.shape, generator=generator, dtype=torch.float32)
        prev_sample = mean + std * noise
    else:
        prev_sample = prev_sample.float()
    return prev_sample, _old_gaussian_log_prob(prev_sample.detach(), mean, std), mean, std


BIT_CASES = [  # (kind, sigma, sigma_next, noise_level)
    ("sde", 0.75, 0.6, 0.7),
    ("sde", 1.0, 0.9, 0.7),  # sigma == 1: std_t uses sigma_next
    ("sde", [1.0, 0.5, 0.3], [0.9, 0.4, 0.1], 0.9),  # per-sample sigmas, one at 1
    ("sde", 0.5, 0.4, 0.0),  # a = 0: std == 0
    ("cps", 0.7, 0.5, 0.6),
    ("cps", 0.2, 0.0, 0.7),  # last CPS step: std == 0
    ("cps", [0.6, 0.2, 0.4], [0.5, 0.0, 0.3], 0.8),  # std == 0 for one sample only
    ("cps", 0.5, 0.4, 0.0),  # a = 0
]


@pytest.mark.parametrize("kind,sigma,sigma_next,a", BIT_CASES)
@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (3, 64, 16)])
def test_per_sample_guard_is_bit_identical_to_the_full_size_guard(kind, sigma, sigma_next, a, shape):
    v, x = _inputs(7, shape)
    new_fn = sde_step_with_logprob if kind == "sde" else cps_step_with_logprob
    # Sampling: same generators, same draw, same log-prob.
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)]  # noqa: E731
    new = new_fn(v, x, sigma, sigma_next, a, gens())
    old = _old_step(kind, v, x, sigma, sigma_next, a, gens())
    for got, want in zip(new, old):
        assert torch.equal(got, want)
    # Training: a given transition, and the gradient with respect to the velocity.
    prev = old[0] + 0.01 * torch.randn(shape, generator=torch.Generator().manual_seed(9))
    v_new, v_old = v.clone().requires_grad_(True), v.clone().requires_grad_(True)
    _, lp_new, mean_new, _ = new_fn(v_new, x, sigma, sigma_next, a, prev_sample=prev)
    _, lp_old, mean_old, _ = _old_step(kind, v_old, x, sigma, sigma_next, a, prev_sample=prev)
    assert torch.equal(lp_new, lp_old) and torch.equal(mean_new, mean_old)
    weights = torch.tensor([1.0, -2.0, 0.5])
    (lp_new * weights).sum().backward()
    (lp_old * weights).sum().backward()
    assert torch.equal(v_new.grad, v_old.grad)


def test_zero_std_gives_zero_log_prob_per_sample():
    v, x = _inputs(8)
    _, log_prob, _, std = cps_step_with_logprob(v, x, torch.tensor([0.6, 0.2, 0.4]), torch.tensor([0.5, 0.0, 0.3]),
                                                0.8, prev_sample=x + 1)
    assert std.shape == (3, 1, 1, 1) and log_prob[1] == 0 and (log_prob[[0, 2]] != 0).all()
    with pytest.raises(ValueError, match="scalar or per-sample"):
        gaussian_log_prob(x, x, torch.full_like(x, 0.5))


# --- Flow-GRPO's conventions as options ---------------------------------------------------------------------------

def test_cps_flow_grpo_log_prob_is_minus_mean_squared_error_everywhere():
    v, x = _inputs(10)
    for sigma, sigma_next in ((0.7, 0.5), (0.2, 0.0)):
        prev = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(11))
        _, log_prob, mean, std = cps_step_with_logprob(v, x, sigma, sigma_next, 0.6, prev_sample=prev,
                                                       log_prob_convention="flow_grpo")
        expected = -((prev.double() - mean.double()) ** 2).mean(dim=(1, 2, 3))
        torch.testing.assert_close(log_prob.double(), expected, rtol=1e-6, atol=0)
        if float(std) > 0:  # the exact log-ratio is the Flow-GRPO one times 1 / (2 s^2)
            _, exact, _, _ = cps_step_with_logprob(v, x, sigma, sigma_next, 0.6, prev_sample=prev)
            _, exact_other, _, _ = cps_step_with_logprob(v + 0.01, x, sigma, sigma_next, 0.6, prev_sample=prev)
            _, fg_other, _, _ = cps_step_with_logprob(v + 0.01, x, sigma, sigma_next, 0.6, prev_sample=prev,
                                                      log_prob_convention="flow_grpo")
            torch.testing.assert_close((exact_other - exact).double(),
                                       (fg_other - log_prob).double() / (2 * float(std) ** 2), rtol=1e-3, atol=0)


def test_sde_log_prob_is_the_same_in_both_conventions_and_bad_names_fail():
    v, x = _inputs(12)
    exact = sde_step_with_logprob(v, x, 0.5, 0.4, 0.7, prev_sample=x)
    flow_grpo = sde_step_with_logprob(v, x, 0.5, 0.4, 0.7, prev_sample=x, log_prob_convention="flow_grpo")
    assert all(torch.equal(a, b) for a, b in zip(exact, flow_grpo))
    with pytest.raises(ValueError, match="log_prob_convention='flow-grpo'"):
        cps_step_with_logprob(v, x, 0.5, 0.4, 0.7, prev_sample=x, log_prob_convention="flow-grpo")
    with pytest.raises(ValueError, match="convention='natural'"):
        step_kl(x, x, torch.tensor(0.1), convention="natural")


def test_step_kl_flow_grpo_convention():
    v, x = _inputs(13)
    sigma, sigma_next, a = torch.tensor([0.9, 0.5, 0.3]), torch.tensor([0.8, 0.35, 0.1]), 0.7
    _, _, mean, std = sde_step_with_logprob(v, x, sigma, sigma_next, a, prev_sample=x)
    _, _, ref_mean, _ = sde_step_with_logprob(v + 0.1, x, sigma, sigma_next, a, prev_sample=x)
    dt = sigma_next - sigma
    # Flow-GRPO's formula in float64: ||mean - ref||^2 / (2 std_t^2), std_t = a sqrt(sigma / (1 - sigma)).
    std_t = a * torch.sqrt(sigma.double() / (1 - sigma.double()))
    expected = ((mean.double() - ref_mean.double()) ** 2).mean(dim=(1, 2, 3)) / (2 * std_t**2)
    kl = step_kl(mean, ref_mean, std, convention="flow_grpo", dt=dt)
    torch.testing.assert_close(kl.double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(kl, step_kl(mean, ref_mean, std) * dt.abs(), rtol=1e-5, atol=0)
    # CPS: the same in both conventions; 0 at sigma_next = 0 in both (Flow-GRPO's is infinite there).
    _, _, mean, std = cps_step_with_logprob(v, x, 0.3, 0.0, 0.7, prev_sample=x)
    _, _, ref_mean, _ = cps_step_with_logprob(v + 0.1, x, 0.3, 0.0, 0.7, prev_sample=x)
    assert torch.equal(step_kl(mean, ref_mean, std, convention="flow_grpo"), torch.zeros(3))
    with pytest.raises(ValueError, match="dt is only used"):
        step_kl(mean, ref_mean, std, dt=dt)
