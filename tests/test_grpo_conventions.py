"""GRPOConfig's Flow-GRPO conventions and GRPO-Guard, each against its formula written out here: off-policy (the
weights moved after sampling) a step's loss is the formula's, on-policy the ratio stays exactly 1."""

import math

import pytest
import torch
from grpo_helpers import brightness, dataset, logged, ovis_policy, tiny_config

from rlhf_image import GRPOConfig, GRPOTrainer
from rlhf_image.losses import clipped_surrogate
from rlhf_image.sampling import transition_log_prob
from rlhf_image.sde import cps_step_with_logprob, flow_grpo_log_prob, gaussian_log_prob

ROWS = [{"prompt": prompt} for prompt in ("a cat", "a red house") for _ in range(4)]


def per_sample_mean(x):
    return x.mean(dim=tuple(range(1, x.ndim)))


@pytest.mark.parametrize("sigma_next", [0.6, 0.0], ids=["noisy", "last-step"])
def test_flow_grpo_log_prob_is_minus_the_squared_error(sigma_next):
    generator = torch.Generator().manual_seed(0)
    latents, velocity = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    sample, exact, mean, std = cps_step_with_logprob(velocity, latents, 0.8, sigma_next, 0.7, generator=generator)
    _, theirs, _, _ = cps_step_with_logprob(velocity, latents, 0.8, sigma_next, 0.7, prev_sample=sample,
                                            log_prob_convention="flow_grpo")
    other = sample + 0.1  # a transition the step did not sample, as off-policy
    torch.testing.assert_close(flow_grpo_log_prob(exact, std), theirs, rtol=1e-5, atol=1e-7)
    squared = per_sample_mean((other - mean) ** 2)
    torch.testing.assert_close(flow_grpo_log_prob(gaussian_log_prob(other, mean, std), std, squared), -squared,
                               rtol=1e-5, atol=1e-7)
    # The gradient with respect to the mean is 2 s^2 times the exact one (that of -mean((x' - mean)^2)).
    mean = mean.clone().requires_grad_(True)
    flow_grpo_log_prob(gaussian_log_prob(other, mean, std), std, per_sample_mean((other - mean) ** 2)).sum().backward()
    torch.testing.assert_close(mean.grad, 2 * (other - mean.detach()) / mean[0].numel(), rtol=1e-4, atol=1e-7)


def off_policy(tmp_path, **options):
    """A trainer, a rollout's first micro-batch sampled with its weights, and then the weights moved."""
    args = tiny_config(tmp_path, gradient_accumulation_steps=2, num_inference_steps=4, **options)
    trainer = GRPOTrainer(ovis_policy(), brightness, args=args, train_dataset=ROWS)
    inputs = trainer._prepare_inputs(ROWS)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for p in trainer.model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    return trainer, inputs["trajectory"], inputs["advantages"]


def step_sigmas(trajectory, j):
    step = int(trajectory.step_indices[j])
    return float(trajectory.sigmas[step]), float(trajectory.sigmas[step + 1])


def test_flow_grpo_cps_log_prob_gives_flow_grpo_ratios(tmp_path):
    trainer, trajectory, advantages = off_policy(tmp_path, sde_type="cps", log_prob_convention="flow_grpo",
                                                 epsilon=0.2)
    for j in range(trajectory.log_probs.shape[1]):
        loss, stats, _ = trainer._step_loss(trainer.model, trajectory, j, advantages, 1.0)
        _, mean, _ = transition_log_prob(trainer.policy, trajectory, j, transformer=trainer.model)
        x_next = trajectory.latents[:, j + 1]
        log_ratio = (-per_sample_mean((x_next - mean) ** 2)) - (-per_sample_mean((x_next - trajectory.means[:, j]) ** 2))
        expected, _ = clipped_surrogate(log_ratio, advantages, 0.2)
        torch.testing.assert_close(stats["ratio"], log_ratio.exp(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)  # O(1) terms, mean near 0
        assert (log_ratio != 0).all() and (j < 3 or (stats["ratio"] != 1).any())


def test_flow_grpo_sde_kl_has_no_dt(tmp_path):
    trainer, trajectory, advantages = off_policy(tmp_path, sde_type="sde", kl_convention="flow_grpo", beta=0.5)
    sigmas = trajectory.sigmas
    for j in range(trajectory.log_probs.shape[1]):
        loss, _, kl = trainer._step_loss(trainer.model, trajectory, j, advantages, 1.0)
        _, mean, _ = transition_log_prob(trainer.policy, trajectory, j, transformer=trainer.model)
        with torch.no_grad(), trainer.reference_transformer() as reference:
            _, reference_mean, _ = transition_log_prob(trainer.policy, trajectory, j, transformer=reference)
        sigma, _ = step_sigmas(trajectory, j)
        # Flow-GRPO's noise scale: std_dev_t = sqrt(sigma / (1 - sigma)) * noise_level (sigma = 1 uses sigmas[1]).
        std_dev_t = math.sqrt(sigma / (1 - (float(sigmas[1]) if sigma == 1 else sigma))) * 0.7
        expected = per_sample_mean((mean - reference_mean) ** 2) / (2 * std_dev_t**2)
        torch.testing.assert_close(kl, expected.detach(), rtol=1e-4, atol=1e-9)
        assert (kl > 0).all()


def test_grpo_guard_normalises_the_log_ratio_and_weights_by_one_over_dt(tmp_path):
    trainer, trajectory, advantages = off_policy(tmp_path, sde_type="sde", grpo_guard=True, epsilon=0.05)
    for j in range(trajectory.log_probs.shape[1]):
        loss, stats, _ = trainer._step_loss(trainer.model, trajectory, j, advantages, 1.0)
        log_prob, mean, std = transition_log_prob(trainer.policy, trajectory, j, transformer=trainer.model)
        s = std.reshape(-1)
        squared = per_sample_mean((mean - trajectory.means[:, j]) ** 2)
        normalised = s * (log_prob - trajectory.log_probs[:, j] + squared / (2 * s**2))
        sigma, sigma_next = step_sigmas(trajectory, j)
        expected, _ = clipped_surrogate(normalised, advantages, 0.05)
        torch.testing.assert_close(loss, expected / abs(sigma_next - sigma), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats["ratio"], normalised.exp().detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("options", [
    {"sde_type": "cps", "log_prob_convention": "flow_grpo", "beta": 0.1, "kl_convention": "flow_grpo"},
    {"sde_type": "sde", "kl_convention": "flow_grpo", "beta": 0.1},
    {"sde_type": "sde", "grpo_guard": True, "beta": 0.1},
], ids=["cps-flow-grpo", "sde-flow-grpo-kl", "guard"])
def test_on_policy_ratio_stays_exactly_one(tmp_path, options):
    args = tiny_config(tmp_path, guidance_scale=3.0, num_iterations=2, max_steps=2, debug_ratio_check=True, **options)
    trainer = GRPOTrainer(ovis_policy(), brightness, args=args, train_dataset=dataset())
    trainer.train()
    assert logged(trainer, "ratio/min")[0] == logged(trainer, "ratio/max")[0] == 1.0
    assert logged(trainer, "ratio/on_policy_mismatch_total")[-1] == 0
    assert logged(trainer, "kl")[0] == 0.0  # at the reference on the first step
    assert all(math.isfinite(v) for v in logged(trainer, "loss"))


@pytest.mark.parametrize("overrides, message", [
    ({"log_prob_convention": "flowgrpo"}, "log_prob_convention='flowgrpo': expected one of"),
    ({"kl_convention": "sum"}, "kl_convention='sum': expected one of"),
    ({"grpo_guard": True, "sde_type": "cps"}, "derived for the SDE step"),
])
def test_bad_convention_settings_fail_at_construction(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=4, **overrides)
