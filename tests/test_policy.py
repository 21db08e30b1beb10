"""FlowPolicy: the shared helpers, Conditioning, the registry and the refusal of models that are not flow-matching
(family parity with the stock pipelines is in test_families.py)."""

import pytest
import torch

from rlhf_image.policy import Conditioning, FlowPolicy, pack_latents, unpack_latents
from rlhf_image.families import FluxPolicy
from tiny_models import MAX_SEQUENCE_LENGTH

PROMPTS = ['a sign that says "OPEN"', "a red cube on a table", "二维码 and a cat"]


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


def test_conditioning_select_cat_to_and_rows_cover_every_field():
    cond = Conditioning(torch.arange(12.0).view(3, 2, 2), torch.arange(3.0).view(3, 1),
                        attention_mask=torch.tensor([[1, 0], [1, 1], [0, 0]]), text_ids=torch.zeros(3, 2, 4).long(),
                        extra={"llama": torch.randn(3, 2, 2, 5)})
    both = Conditioning.cat([cond.select([2]), cond.select([0, 1])])
    assert len(both) == 3
    for name, value in cond.tensors().items():
        assert torch.equal(both.tensors()[name], value[[2, 0, 1]]), name
    half = cond.to(dtype=torch.bfloat16)
    assert half.prompt_embeds.dtype == half.extra["llama"].dtype == torch.bfloat16
    assert half.attention_mask.dtype == half.text_ids.dtype == torch.long  # masks and ids keep their dtype
    restacked = Conditioning.stack([cond.row(i) for i in (1, 2)])
    assert restacked.tensors().keys() == cond.tensors().keys()
    assert all(torch.equal(restacked.tensors()[k], v[1:]) for k, v in cond.tensors().items())
    assert Conditioning(torch.zeros(1, 2, 2)).select([0]).pooled_prompt_embeds is None
    with pytest.raises(ValueError, match="different layouts"):
        Conditioning.cat([cond, Conditioning(torch.zeros(1, 3, 2))])


def test_unknown_pipeline_is_a_clear_error():
    with pytest.raises(TypeError, match="no FlowPolicy adapter for object"):
        FlowPolicy.from_pipeline(object())


def test_a_unet_pipeline_is_not_flow_matching():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    with pytest.raises(TypeError, match="DDPMPipeline is not a flow-matching model/scheduler .*UNet2DModel"):
        FlowPolicy.from_pipeline(DDPMPipeline(unet=unet, scheduler=DDPMScheduler()))


@pytest.mark.parametrize("scheduler_class", ["DDPMScheduler", "EulerDiscreteScheduler"])
def test_a_swapped_in_scheduler_is_refused_by_the_policy_and_every_trainer(flux_pipe, scheduler_class, tmp_path):
    import diffusers
    from diffusers import FluxPipeline

    from rlhf_image import (DPOConfig, DPOTrainer, FlowMatchingConfig, FlowMatchingTrainer, GRPOConfig,
                            GRPOTrainer)

    pipe = FluxPipeline(**{**flux_pipe.components, "scheduler": getattr(diffusers, scheduler_class)()})
    message = f"{scheduler_class} is not a flow-matching model/scheduler"
    with pytest.raises(TypeError, match=message):
        FlowPolicy.from_pipeline(pipe)
    common = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], resolution=32)
    with pytest.raises(TypeError, match=message):
        GRPOTrainer(pipe, lambda prompts, images, **kw: [0.0] * len(images), args=GRPOConfig(**common),
                    train_dataset=[{"prompt": "x"}])
    with pytest.raises(TypeError, match=message):
        DPOTrainer(pipe, args=DPOConfig(**common), train_dataset=[{"prompt": "x", "chosen": "a", "rejected": "b"}])
    with pytest.raises(TypeError, match=message):
        FlowMatchingTrainer(pipe, args=FlowMatchingConfig(**common), train_dataset=[])


def with_options(scheduler, **options):
    """A copy of `scheduler` with `options` set (`from_config` would drop keys listed as defaults)."""
    config = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    copy = type(scheduler)(**{**config, **options})
    assert all(copy.config[k] == v for k, v in options.items())
    return copy


@pytest.mark.parametrize("option", ["stochastic_sampling", "invert_sigmas"])
def test_scheduler_options_that_are_not_a_schedule_are_refused_with_one_message(flux_pipe, option):
    from diffusers import FluxPipeline

    scheduler = with_options(flux_pipe.scheduler, **{option: True})
    pipe = FluxPipeline(**{**flux_pipe.components, "scheduler": scheduler})
    with pytest.raises(ValueError, match=rf"scheduler options \['{option}'\] are not supported"):
        FlowPolicy.from_pipeline(pipe)


@pytest.mark.parametrize("option", [dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True),
                                    dict(shift_terminal=0.2), dict(time_shift_type="linear")])
def test_every_schedule_option_gives_the_pipelines_own_sigmas(flux_pipe, option):
    from diffusers import FluxPipeline

    scheduler = with_options(flux_pipe.scheduler, **option)
    pipe = FluxPipeline(**{**flux_pipe.components, "scheduler": scheduler})
    policy = FlowPolicy.from_pipeline(pipe, max_sequence_length=MAX_SEQUENCE_LENGTH)
    pipe("a cat", height=32, width=48, num_inference_steps=6, output_type="latent",
         max_sequence_length=MAX_SEQUENCE_LENGTH)
    assert torch.equal(policy.inference_sigmas(6, 32, 48), pipe.scheduler.sigmas)


def test_register_family_makes_from_pipeline_accept_a_pipeline_class(flux_pipe):
    from diffusers import FluxPipeline

    from rlhf_image import register_family
    from rlhf_image.policy import policy_class_for, registered_families

    class MyFlux(FluxPipeline):
        pass

    class MyPolicy(FluxPolicy):
        pass

    pipe = MyFlux(**flux_pipe.components)
    assert policy_class_for(pipe) is FluxPolicy  # a subclass finds its base class's adapter
    register_family(MyFlux, MyPolicy)
    try:
        assert type(FlowPolicy.from_pipeline(pipe, max_sequence_length=MAX_SEQUENCE_LENGTH)) is MyPolicy
        assert registered_families()["MyFlux"] == "MyPolicy"
        assert type(FlowPolicy.from_pipeline(flux_pipe)) is FluxPolicy
    finally:
        from rlhf_image import policy as policy_module
        del policy_module._FAMILIES[MyFlux]
    with pytest.raises(TypeError, match="not a FlowPolicy subclass"):
        register_family(MyFlux, dict)


@pytest.mark.parametrize("batched", [True, False])
def test_cfg_in_one_batched_call_or_two_is_exactly_on_policy(ovis_pipe, batched):
    from rlhf_image.sampling import generate, transition_log_prob

    policy = FlowPolicy.from_pipeline(ovis_pipe, max_sequence_length=MAX_SEQUENCE_LENGTH, batched_cfg=batched)
    calls = []
    hook = policy.transformer.register_forward_hook(lambda m, args, kwargs, out: calls.append(
        kwargs["hidden_states"].shape[0]), with_kwargs=True)
    try:
        trajectory = generate(policy, PROMPTS, [0, 1, 2], height=32, width=32, num_steps=3, sde_type="sde",
                              guidance_scale=4.0, micro_batch_size=2, decode=False)
    finally:
        hook.remove()
    # two micro-batches of 2 rows, 3 steps: one call of 4 rows or two calls of 2 rows per step
    assert calls == ([4] * 6 if batched else [2] * 12)
    for j in range(3):
        for rows in ([0, 1], [2, 2]):  # the sampler's micro-batches (the last one padded)
            with torch.no_grad():
                log_prob, _, _ = transition_log_prob(policy, trajectory.select(rows), j)
            assert torch.equal(log_prob, trajectory.log_probs[rows, j])


def test_batched_and_two_call_cfg_agree_to_float_rounding(ovis_pipe):
    one = FlowPolicy.from_pipeline(ovis_pipe, max_sequence_length=MAX_SEQUENCE_LENGTH, batched_cfg=True)
    two = FlowPolicy.from_pipeline(ovis_pipe, max_sequence_length=MAX_SEQUENCE_LENGTH, batched_cfg=False)
    cond, neg = one.encode_prompt(PROMPTS), one.encode_negative_prompt(3)
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(one.predict_velocity(x, 0.6, cond, neg, 4.0),
                                   two.predict_velocity(x, 0.6, cond, neg, 4.0), atol=1e-5, rtol=1e-5)
