"""The sampler: per-sample determinism, recorded log-probs, SDE windows."""

import pytest
import torch

from rlhf_image.policy import FlowPolicy
from rlhf_image.sampling import Trajectory, generate, transition_log_prob
from tiny_models import MAX_SEQUENCE_LENGTH

PROMPTS = ["one", "two two", 'say "HI"', "four", "five five five"]
KW = dict(height=32, width=32, num_steps=6)


@pytest.fixture(scope="module")
def policy(ovis_pipe):
    return FlowPolicy.from_pipeline(ovis_pipe, max_sequence_length=MAX_SEQUENCE_LENGTH)


@pytest.mark.parametrize("sde_type,window", [("ode", None), ("sde", None), ("cps", (1, 4))])
def test_sample_is_bit_identical_alone_in_a_batch_and_at_another_position(policy, sde_type, window):
    kw = dict(KW, sde_type=sde_type, window=window, guidance_scale=2.0)
    batch = generate(policy, PROMPTS[:4], [10, 11, 12, 13], **kw)
    alone = generate(policy, PROMPTS[2:3], [12], **kw)
    moved = generate(policy, [PROMPTS[2], PROMPTS[4], PROMPTS[0], PROMPTS[1], PROMPTS[3]], [12, 14, 10, 11, 13], **kw)
    for other, i in ((alone, 0), (moved, 0)):
        assert torch.equal(other.final_latents[i], batch.final_latents[2])
        assert torch.equal(other.images[i], batch.images[2])
        assert torch.equal(other.log_probs[i], batch.log_probs[2])
    assert torch.equal(moved.images[2], batch.images[0])  # and a sample that moved from 0 to 2


def test_different_seeds_give_different_samples(policy):
    out = generate(policy, ["same", "same"], [0, 1], **KW)
    assert not torch.equal(out.final_latents[0], out.final_latents[1])


@pytest.mark.parametrize("sde_type,window", [("sde", None), ("cps", None), ("sde", (1, 3)), ("cps", (0, 2))])
def test_recomputed_log_probs_equal_recorded_ones(policy, sde_type, window):
    traj = generate(policy, PROMPTS[:4], [0, 1, 2, 3], **KW, sde_type=sde_type, window=window, guidance_scale=3.0)
    k = 6 if window is None else window[1] - window[0]
    assert traj.log_probs.shape == (4, k) and traj.latents.shape == (4, k + 1, 4, 16, 16)
    with torch.no_grad():
        for j in range(len(traj.step_indices)):
            log_prob, _, _ = transition_log_prob(policy, traj, j)
            assert torch.equal(log_prob, traj.log_probs[:, j])


def test_window_records_only_its_steps_and_is_ode_elsewhere(policy):
    ode = generate(policy, PROMPTS[:2], [5, 6], **KW, decode=False)
    windowed = generate(policy, PROMPTS[:2], [5, 6], **KW, sde_type="sde", window=(2, 4), noise_level=0.8)
    assert windowed.step_indices.tolist() == [2, 3]
    assert windowed.log_probs.shape == (2, 2) and windowed.latents.shape[1] == 3
    # Before the window the chain is the ODE chain: the state entering step 2 is identical.
    ode_prefix = generate(policy, PROMPTS[:2], [5, 6], height=32, width=32, num_steps=6, decode=False,
                          sde_type="sde", window=(2, 2))
    assert ode_prefix.latents.shape[1] == 0
    assert not torch.equal(windowed.final_latents, ode.final_latents)  # the window injected noise
    zero_noise = generate(policy, PROMPTS[:2], [5, 6], **KW, sde_type="sde", window=(2, 4), noise_level=0.0)
    assert torch.equal(zero_noise.final_latents, ode.final_latents)


def test_window_ending_early_records_the_state_leaving_its_last_step(policy):
    """The last recorded state is the output of the window's last step, and the ODE chain continues from it."""
    traj = generate(policy, PROMPTS[:2], [3, 4], **KW, sde_type="sde", window=(1, 3), decode=False)
    assert not torch.equal(traj.latents[:, -1], traj.final_latents)
    from rlhf_image.sde import ode_step

    latents = traj.latents[:, -1]
    with torch.no_grad():
        for step in range(3, 6):
            sigma, sigma_next = traj.sigmas[step], traj.sigmas[step + 1]
            latents = ode_step(policy.predict_velocity(latents, sigma, traj.cond), latents, sigma, sigma_next)
    # Close, not equal: this continuation runs 2 rows per transformer call, the sampler ran padded micro-batches of 4.
    torch.testing.assert_close(latents, traj.final_latents, rtol=1e-5, atol=1e-5)


def test_bad_arguments_name_the_problem(policy):
    with pytest.raises(ValueError, match="outside the schedule"):
        generate(policy, ["a"], [0], **KW, sde_type="sde", window=(3, 9))
    with pytest.raises(ValueError, match="one seed per prompt"):
        generate(policy, ["a", "b"], [0], **KW)
    with pytest.raises(ValueError, match="unknown sde_type"):
        generate(policy, ["a"], [0], **KW, sde_type="ddim")


def test_select_and_cat_roundtrip(policy):
    traj = generate(policy, PROMPTS[:3], [0, 1, 2], **KW, sde_type="sde", window=(0, 2), guidance_scale=2.0)
    parts = Trajectory.cat([traj.select([2]), traj.select([0, 1])])
    assert parts.prompts == [PROMPTS[2], PROMPTS[0], PROMPTS[1]] and parts.seeds == [2, 0, 1]
    assert torch.equal(parts.latents, traj.latents[[2, 0, 1]])
    assert torch.equal(parts.negative_cond.prompt_embeds, traj.negative_cond.prompt_embeds[[2, 0, 1]])
    assert len(parts.pil_images()) == 3 and parts.pil_images()[0].size == (32, 32)
