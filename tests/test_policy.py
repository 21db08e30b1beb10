"""FlowPolicy adapters: parity with the diffusers pipelines and the shared helpers."""

import numpy as np
import pytest
import torch

from rlhf_image.policy import Conditioning, FlowPolicy, pack_latents, unpack_latents
from rlhf_image.policies import FluxPolicy, OvisImagePolicy
from rlhf_image.sampling import generate
from tiny_models import MAX_SEQUENCE_LENGTH

PROMPTS = ['a sign that says "OPEN"', "a red cube on a table", "二维码 and a cat"]


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_ovis_sampler_equals_diffusers_pipeline(ovis_pipe, guidance_scale):
    policy = FlowPolicy.from_pipeline(ovis_pipe, max_sequence_length=MAX_SEQUENCE_LENGTH)
    assert isinstance(policy, OvisImagePolicy)
    generators = [torch.Generator().manual_seed(s) for s in (0, 1, 2)]
    expected = ovis_pipe(PROMPTS, guidance_scale=guidance_scale, height=32, width=48, num_inference_steps=5,
                         generator=generators, output_type="np", max_sequence_length=MAX_SEQUENCE_LENGTH).images
    ours = generate(policy, PROMPTS, [0, 1, 2], height=32, width=48, num_steps=5, guidance_scale=guidance_scale)
    assert ours.images.shape == (3, 3, 32, 48)
    assert np.abs(ours.images.permute(0, 2, 3, 1).numpy() - expected).max() < 1e-5


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_flux_sampler_equals_diffusers_pipeline(flux_pipe, guidance_scale):
    policy = FlowPolicy.from_pipeline(flux_pipe, max_sequence_length=MAX_SEQUENCE_LENGTH)
    assert isinstance(policy, FluxPolicy)
    generators = [torch.Generator().manual_seed(s) for s in (0, 1, 2)]
    expected = flux_pipe(PROMPTS, negative_prompt=[""] * 3 if guidance_scale > 1 else None,
                         true_cfg_scale=guidance_scale, height=32, width=32, num_inference_steps=5,
                         generator=generators, output_type="np", max_sequence_length=MAX_SEQUENCE_LENGTH).images
    ours = generate(policy, PROMPTS, [0, 1, 2], height=32, width=32, num_steps=5, guidance_scale=guidance_scale)
    assert np.abs(ours.images.permute(0, 2, 3, 1).numpy() - expected).max() < 1e-5


def test_pack_unpack_roundtrip_and_layout():
    latents = torch.arange(2 * 4 * 4 * 6, dtype=torch.float32).view(2, 4, 4, 6)
    tokens = pack_latents(latents)
    assert tokens.shape == (2, 6, 16)
    assert torch.equal(tokens[0, 0, :4], latents[0, 0, :2, :2].flatten())  # first 2x2 patch of channel 0
    assert torch.equal(unpack_latents(tokens, 4, 6), latents)


def test_only_the_transformer_trains(ovis_pipe):
    policy = FlowPolicy.from_pipeline(ovis_pipe)
    params = policy.trainable_parameters()
    assert len(params) == len(list(ovis_pipe.transformer.parameters()))
    assert not any(p.requires_grad for p in ovis_pipe.vae.parameters())
    assert not any(p.requires_grad for p in ovis_pipe.text_encoder.parameters())


def test_encode_images_inverts_the_latent_normalisation(ovis_pipe):
    policy = FlowPolicy.from_pipeline(ovis_pipe)
    images = torch.rand(2, 3, 32, 32)
    latents = policy.encode_images(images)
    assert latents.shape == (2, 4, 16, 16)
    raw = ovis_pipe.vae.encode(images * 2 - 1).latent_dist.mode()
    cfg = ovis_pipe.vae.config
    torch.testing.assert_close(latents, (raw - cfg.shift_factor) * cfg.scaling_factor)
    decoded = policy.decode(latents)
    expected = (ovis_pipe.vae.decode(raw).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(decoded, expected, atol=1e-5, rtol=1e-5)


def test_cfg_is_negative_plus_scaled_difference(ovis_pipe):
    policy = FlowPolicy.from_pipeline(ovis_pipe, max_sequence_length=MAX_SEQUENCE_LENGTH)
    cond, neg = policy.encode_prompt(PROMPTS[:2]), policy.encode_prompt(["", ""])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v_c = policy.predict_velocity(x, 0.5, cond)
        v_u = policy.predict_velocity(x, 0.5, neg)
        v = policy.predict_velocity(x, 0.5, cond, neg, guidance_scale=3.0)
    torch.testing.assert_close(v, v_u + 3.0 * (v_c - v_u))


def test_conditioning_select_and_cat():
    cond = Conditioning(torch.arange(12.0).view(3, 2, 2), torch.arange(3.0).view(3, 1))
    both = Conditioning.cat([cond.select([2]), cond.select([0, 1])])
    assert torch.equal(both.prompt_embeds, cond.prompt_embeds[[2, 0, 1]]) and len(both) == 3
    assert Conditioning(torch.zeros(1, 2, 2)).select([0]).pooled_prompt_embeds is None


def test_unknown_pipeline_is_a_clear_error():
    with pytest.raises(TypeError, match="no FlowPolicy adapter for object"):
        FlowPolicy.from_pipeline(object())
