"""rlhf_image.model_io: LoRA/full preparation, references, and saving in formats stock diffusers loads."""

import os

import pytest
import torch
from diffusers import FluxTransformer2DModel, OvisImageTransformer2DModel
from peft import LoraConfig
from tiny_models import tiny_flux_pipeline, tiny_ovis_pipeline

from rlhf_image.model_io import (LORA_WEIGHT_NAME, base_transformer, frozen_copy, is_lora, load_lora,
                                 prepare_transformer, reference_transformer, save_full, save_lora, write_model_card)
from rlhf_image.policy import FlowPolicy

LORA = dict(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])


def _velocity(policy, seed=0, transformer=None):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, policy.num_latent_channels, 4, 4, generator=generator)
    with torch.no_grad():
        return policy.predict_velocity(latents, 0.6, policy.encode_prompt(["a red square", "blue"]),
                                       transformer=transformer)


def _perturb(module, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))


@pytest.mark.parametrize("make_pipe", [tiny_ovis_pipeline, tiny_flux_pipeline], ids=["ovis", "flux"])
def test_lora_saved_loads_into_stock_pipeline(make_pipe, tmp_path):
    policy = FlowPolicy.from_pipeline(make_pipe())
    policy.transformer = prepare_transformer(policy.transformer, LoraConfig(**LORA))
    assert is_lora(policy.transformer)
    _perturb(policy.transformer)  # B starts at 0: make the adapter do something
    trained = _velocity(policy)
    path = save_lora(policy.transformer, str(tmp_path))
    assert os.path.basename(path) == LORA_WEIGHT_NAME
    fresh = make_pipe()
    base = _velocity(FlowPolicy.from_pipeline(fresh))
    if make_pipe is tiny_flux_pipeline:
        fresh.load_lora_weights(str(tmp_path))  # the plain diffusers call
    else:
        load_lora(fresh, str(tmp_path))  # OvisImagePipeline has no pipeline-level loader: transformer.load_lora_adapter
    loaded = _velocity(FlowPolicy.from_pipeline(fresh))
    assert not torch.equal(base, trained)
    assert torch.equal(loaded, trained)


def test_full_weights_saved_in_diffusers_layout(tmp_path):
    policy = FlowPolicy.from_pipeline(tiny_ovis_pipeline())
    policy.transformer = prepare_transformer(policy.transformer)
    _perturb(policy.transformer)
    save_full(policy.transformer, str(tmp_path))
    assert os.path.isfile(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors")
    pipe = tiny_ovis_pipeline()
    pipe.transformer = OvisImageTransformer2DModel.from_pretrained(str(tmp_path), subfolder="transformer").eval()
    assert torch.equal(_velocity(FlowPolicy.from_pipeline(pipe)), _velocity(policy))

    # A state dict gathered elsewhere (DeepSpeed ZeRO-3) takes the single-file path.
    flux = FlowPolicy.from_pipeline(tiny_flux_pipeline())
    state = {k: v + 1 for k, v in flux.transformer.state_dict().items()}
    save_full(flux.transformer, str(tmp_path / "gathered"), state_dict=state)
    reloaded = FluxTransformer2DModel.from_pretrained(str(tmp_path / "gathered"), subfolder="transformer")
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in state.items())


def test_prepare_trainable_parameters_and_dropout():
    policy = FlowPolicy.from_pipeline(tiny_ovis_pipeline())
    lora = prepare_transformer(policy.transformer, LoraConfig(lora_dropout=0.3, **LORA))
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert all(m.p == 0 for m in lora.modules() if isinstance(m, torch.nn.Dropout))
    full = prepare_transformer(FlowPolicy.from_pipeline(tiny_ovis_pipeline()).transformer)
    assert all(p.requires_grad for p in full.parameters())
    assert base_transformer(lora) is lora.get_base_model() and base_transformer(full) is full
    with pytest.raises(ValueError, match="already carries"):
        prepare_transformer(lora, LoraConfig(**LORA))
    assert prepare_transformer(lora) is lora  # a user's own peft model: its adapter alone stays trainable
    assert all("lora_" in n for n, p in lora.named_parameters() if p.requires_grad)


def test_reference_policies():
    policy = FlowPolicy.from_pipeline(tiny_ovis_pipeline())
    base = _velocity(policy)
    policy.transformer = prepare_transformer(policy.transformer, LoraConfig(**LORA))
    _perturb(policy.transformer)
    assert not torch.equal(_velocity(policy), base)
    with reference_transformer(policy.transformer) as reference:  # adapter disabled
        assert torch.equal(_velocity(policy, transformer=reference), base)
    assert not torch.equal(_velocity(policy), base)  # re-enabled on exit

    full = FlowPolicy.from_pipeline(tiny_ovis_pipeline())
    full.transformer = prepare_transformer(full.transformer)
    copy = frozen_copy(full.transformer)
    assert not any(p.requires_grad for p in copy.parameters())
    _perturb(full.transformer)
    with reference_transformer(full.transformer, copy) as reference:
        assert reference is copy
        assert torch.equal(_velocity(full, transformer=reference), base)
    with pytest.raises(ValueError, match="frozen reference transformer"):
        with reference_transformer(full.transformer):
            pass


def test_model_card(tmp_path):
    lora = prepare_transformer(FlowPolicy.from_pipeline(tiny_ovis_pipeline()).transformer, LoraConfig(**LORA))
    path = write_model_card(str(tmp_path), method="GRPO", base_model="org/base", transformer=lora,
                            details={"reward functions": "brightness (weight 1)", "steps": 7},
                            metrics={"rewards/brightness/mean": 0.625})
    text = open(path).read()
    for expected in ("base_model: org/base", "LoRA adapter", "brightness (weight 1)", "steps: 7", "0.625",
                     'DiffusionPipeline.from_pretrained("org/base")', "load_lora_adapter"):
        assert expected in text
    full = FlowPolicy.from_pipeline(tiny_ovis_pipeline()).transformer
    text = open(write_model_card(str(tmp_path), method="DPO", base_model=None, transformer=full)).read()
    assert "from diffusers import DiffusionPipeline, OvisImageTransformer2DModel" in text
    assert "was not recorded" in text and '"BASE_MODEL"' in text
