"""The library against an independent transcription of Flow-GRPO's formulas (github.com/yifan123/flow_grpo), on
identical inputs: the SDE and CPS steps with their log-probs, the clipped surrogate, the KL penalty and the
advantages. Each `flow_grpo_*` function below transcribes the math of the file and lines named in its comment;
nothing of Flow-GRPO is imported."""

import math

import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from rlhf_image.advantages import PerPromptStatTracker, group_advantages
from rlhf_image.losses import grpo_loss
from rlhf_image.sde import cps_step_with_logprob, sde_step_with_logprob, step_kl

NOISE_LEVEL = 0.7


def flow_grpo_step(sde_type, model_output, sample, sigma, sigma_prev, sigma_max, noise_level, prev_sample=None,
                   generator=None):
    """flow_grpo/diffusers_patch/sd3_sde_with_logprob.py at commit 54809b5, `sde_step_with_logprob`, lines 36-89:
    float32 inputs (36-40), `dt` (47), the 'sde' branch (49-68), the 'cps' branch (70-86), the mean over all but
    the batch dimension (88-89). `sigma`, `sigma_prev` are `[B, 1, ...]` (lines 44-45), `sigma_max` the
    schedule's second sigma (46)."""
    model_output, sample = model_output.float(), sample.float()
    dt = sigma_prev - sigma
    if sde_type == "sde":
        std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
        prev_sample_mean = (sample * (1 + std_dev_t**2 / (2 * sigma) * dt)
                            + model_output * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt)
        if prev_sample is None:
            noise = randn_tensor(model_output.shape, generator=generator, dtype=model_output.dtype)
            prev_sample = prev_sample_mean + std_dev_t * torch.sqrt(-1 * dt) * noise
        log_prob = (-((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * ((std_dev_t * torch.sqrt(-1 * dt)) ** 2))
                    - torch.log(std_dev_t * torch.sqrt(-1 * dt)) - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi))))
    else:
        std_dev_t = sigma_prev * math.sin(noise_level * math.pi / 2)
        pred_original_sample = sample - sigma * model_output
        noise_estimate = sample + model_output * (1 - sigma)
        prev_sample_mean = (pred_original_sample * (1 - sigma_prev)
                            + noise_estimate * torch.sqrt(sigma_prev**2 - std_dev_t**2))
        if prev_sample is None:
            noise = randn_tensor(model_output.shape, generator=generator, dtype=model_output.dtype)
            prev_sample = prev_sample_mean + std_dev_t * noise
        log_prob = -((prev_sample.detach() - prev_sample_mean) ** 2)
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return prev_sample, log_prob, prev_sample_mean, std_dev_t


def flow_grpo_policy_loss(log_prob, old_log_prob, advantages, adv_clip_max, clip_range):
    """scripts/train_sd3.py at commit ac4c86e, lines 881-893: advantage clamp, ratio, clipped surrogate."""
    advantages = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.mean(torch.maximum(unclipped_loss, clipped_loss))


def flow_grpo_kl(prev_sample_mean, prev_sample_mean_ref, std_dev_t):
    """scripts/train_sd3.py at commit ac4c86e, lines 895-896 (per sample, before the batch mean)."""
    dims = tuple(range(1, prev_sample_mean.ndim))
    kl = ((prev_sample_mean - prev_sample_mean_ref) ** 2).mean(dim=dims, keepdim=True) / (2 * std_dev_t**2)
    return kl.reshape(-1)


def flow_grpo_stat_tracker(prompts, rewards, global_std):
    """flow_grpo/stat_tracking.py at commit ac4c86e, `PerPromptStatTracker.update` with type 'grpo', lines 11-31,
    on a fresh tracker (train_sd3.py clears it after every update, line 780). Rewards are 1-D here: Flow-GRPO
    repeats each along the trained timesteps (train_sd3.py line 740), which gives the same value in every column."""
    prompts, rewards = np.array(prompts), np.array(rewards, dtype=np.float64)
    advantages = np.empty_like(rewards) * 0.0
    stats = {}
    for prompt in np.unique(prompts):
        stats[prompt] = list(rewards[prompts == prompt])
    for prompt in np.unique(prompts):
        prompt_rewards = rewards[prompts == prompt]
        mean = np.mean(np.stack(stats[prompt]), axis=0, keepdims=True)
        if global_std:
            std = np.std(rewards, axis=0, keepdims=True) + 1e-4
        else:
            std = np.std(np.stack(stats[prompt]), axis=0, keepdims=True) + 1e-4
        advantages[prompts == prompt] = (prompt_rewards - mean) / std
    return advantages


def _schedule(num_steps=10, shift=3.0):
    """SD3's shifted schedule (shift 3), ending at 0, as Flow-GRPO's scheduler holds it."""
    t = torch.linspace(1, 1 / num_steps, num_steps, dtype=torch.float64)
    sigmas = shift * t / (1 + (shift - 1) * t)
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)]).float()


def _latents(seed, shape=(4, 16, 32, 32)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("step", range(10))
def test_sde_step_and_log_prob_match_flow_grpo(step):
    sigmas = _schedule()
    v, x = _latents(step)
    sigma, sigma_next = sigmas[step], sigmas[step + 1]
    b = x.shape[0]
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(b)]  # noqa: E731
    ref = flow_grpo_step("sde", v, x, sigma.expand(b).view(b, 1, 1, 1), sigma_next.expand(b).view(b, 1, 1, 1),
                         sigmas[1].item(), NOISE_LEVEL, generator=gens())
    ours = sde_step_with_logprob(v, x, sigma, sigma_next, NOISE_LEVEL, gens())
    # Same noise, same sample; the means differ by float32 rounding (the two expand the same formula differently).
    scale = ref[2].abs().max()
    assert (ours[2] - ref[2]).abs().max() <= 4e-7 * scale
    assert (ours[0] - ref[0]).abs().max() <= 4e-7 * scale
    torch.testing.assert_close(ours[3].expand(b, 1, 1, 1), ref[3] * torch.sqrt(sigma - sigma_next), rtol=2e-7, atol=0)
    # The log-prob of a given transition under the same velocity, and under another one (off-policy).
    for velocity in (v, v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(7))):
        _, ref_lp, _, _ = flow_grpo_step("sde", velocity, x, sigma.expand(b).view(b, 1, 1, 1),
                                         sigma_next.expand(b).view(b, 1, 1, 1), sigmas[1].item(), NOISE_LEVEL,
                                         prev_sample=ref[0])
        _, lp, _, _ = sde_step_with_logprob(velocity, x, sigma, sigma_next, NOISE_LEVEL, prev_sample=ref[0])
        torch.testing.assert_close(lp, ref_lp, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("step", range(10))
def test_cps_step_matches_flow_grpo_with_its_log_prob_convention(step):
    sigmas = _schedule()
    v, x = _latents(20 + step)
    sigma, sigma_next = sigmas[step], sigmas[step + 1]
    b = x.shape[0]
    gens = lambda: [torch.Generator().manual_seed(200 + i) for i in range(b)]  # noqa: E731
    ref = flow_grpo_step("cps", v, x, sigma.expand(b).view(b, 1, 1, 1), sigma_next.expand(b).view(b, 1, 1, 1),
                         sigmas[1].item(), NOISE_LEVEL, generator=gens())
    ours = cps_step_with_logprob(v, x, sigma, sigma_next, NOISE_LEVEL, gens(), log_prob_convention="flow_grpo")
    for got, want in zip(ours[:3], ref[:3]):
        torch.testing.assert_close(got, want, rtol=0, atol=4e-7 * float(ref[2].abs().max()))
    off_policy = v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(8))
    _, ref_lp, _, _ = flow_grpo_step("cps", off_policy, x, sigma.expand(b).view(b, 1, 1, 1),
                                     sigma_next.expand(b).view(b, 1, 1, 1), sigmas[1].item(), NOISE_LEVEL,
                                     prev_sample=ref[0])
    _, lp, _, _ = cps_step_with_logprob(off_policy, x, sigma, sigma_next, NOISE_LEVEL, prev_sample=ref[0],
                                        log_prob_convention="flow_grpo")
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-9)


def test_clipped_surrogate_matches_flow_grpo():
    g = torch.Generator().manual_seed(3)
    old = torch.randn(64, generator=g)
    new = old + 2e-4 * torch.randn(64, generator=g)  # ratios around 1 +- 2e-4 against a clip range of 1e-4
    raw = 3 * torch.randn(64, generator=g)  # some beyond the advantage clip of 5
    loss, stats = grpo_loss(new, old, raw.clamp(-5, 5), clip_range=1e-4)
    ref = flow_grpo_policy_loss(new, old, raw, adv_clip_max=5, clip_range=1e-4)
    assert 0 < float(stats["clip_frac"].mean()) < 1
    assert torch.equal(loss, ref)


def test_kl_matches_flow_grpo_in_its_convention():
    sigmas, b = _schedule(), 4
    for step in range(10):
        v, x = _latents(40 + step)
        v_ref = v + 0.1 * torch.randn(v.shape, generator=torch.Generator().manual_seed(step))
        sigma, sigma_next = sigmas[step], sigmas[step + 1]
        s4, n4 = sigma.expand(b).view(b, 1, 1, 1), sigma_next.expand(b).view(b, 1, 1, 1)
        for sde_type, step_fn in (("sde", sde_step_with_logprob), ("cps", cps_step_with_logprob)):
            _, _, mean, std_t = flow_grpo_step(sde_type, v, x, s4, n4, sigmas[1].item(), NOISE_LEVEL, prev_sample=x)
            _, _, ref_mean, _ = flow_grpo_step(sde_type, v_ref, x, s4, n4, sigmas[1].item(), NOISE_LEVEL,
                                               prev_sample=x)
            _, _, ours_mean, std = step_fn(v, x, sigma, sigma_next, NOISE_LEVEL, prev_sample=x)
            _, _, ours_ref, _ = step_fn(v_ref, x, sigma, sigma_next, NOISE_LEVEL, prev_sample=x)
            dt = sigma_next - sigma if sde_type == "sde" else None
            kl = step_kl(ours_mean, ours_ref, std, convention="flow_grpo", dt=dt)
            if sde_type == "cps" and step == 9:  # sigma_next = 0: Flow-GRPO's KL is infinite, ours is 0
                assert not torch.isfinite(flow_grpo_kl(mean, ref_mean, std_t)).any()
                assert torch.equal(kl, torch.zeros(b))
                continue
            torch.testing.assert_close(kl, flow_grpo_kl(mean, ref_mean, std_t), rtol=2e-5, atol=0)


PROMPTS = ["cat", "dog", "sea"]


def _gathered_rewards():
    """Two processes, each holding whole groups of 4: process 0 has cat and dog, process 1 has sea and cat again."""
    g = torch.Generator().manual_seed(5)
    rewards = torch.rand(16, generator=g, dtype=torch.float64)
    prompts = [p for p in ("cat", "dog", "sea", "cat") for _ in range(4)]
    return prompts, rewards


@pytest.mark.parametrize("global_std", [False, True])
def test_advantages_match_flow_grpo_stat_tracker(global_std):
    prompts, rewards = _gathered_rewards()
    expected = flow_grpo_stat_tracker(prompts, rewards.numpy(), global_std)
    # Flow-GRPO pools a prompt's samples across the batch (cat appears on both processes): the tracker does too.
    tracker = PerPromptStatTracker(batch_std=global_std)
    np.testing.assert_allclose(tracker.update(prompts, rewards).numpy(), expected, rtol=1e-5, atol=1e-6)
    # With each prompt in one group, group_advantages is the same; with global_std each process divides by the
    # std of the gathered rewards.
    prompts, rewards = prompts[:12], rewards[:12]
    expected = flow_grpo_stat_tracker(prompts, rewards.numpy(), global_std)
    group_ids = torch.arange(12) // 4
    for process in range(2):
        rows = slice(0, 8) if process == 0 else slice(8, 12)
        kwargs = {"batch_std": True, "batch_rewards": rewards} if global_std else {}
        local = group_advantages(rewards[rows], group_ids[rows], **kwargs)
        np.testing.assert_allclose(local.numpy(), expected[rows], rtol=1e-5, atol=1e-6)
