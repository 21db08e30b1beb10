"""Saving a GRPO result for users: stock diffusers loads it and reproduces the trained policy."""

import torch
from diffusers import OvisImageTransformer2DModel
from grpo_helpers import LORA_TARGETS, brightness, dataset, flux_policy, ovis_policy, tiny_config
from peft import LoraConfig
from tiny_models import MAX_SEQUENCE_LENGTH, tiny_flux_pipeline

from rlhf_image.recipes.ovis_image.model import ovis_image_tiny, ovis_prefix_tokenizer

from rlhf_image import GRPOTrainer
from rlhf_image.model_io import LORA_WEIGHT_NAME
from rlhf_image.policy import FlowPolicy


def velocity(policy):
    latents = torch.randn(2, policy.num_latent_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return policy.predict_velocity(latents, 0.7, policy.encode_prompt(["a cat", "the sea"]))


def test_lora_result_loads_with_pipe_load_lora_weights(tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS)
    trainer = GRPOTrainer(flux_policy(), brightness, args=tiny_config(tmp_path / "run", learning_rate=3e-2),
                          train_dataset=dataset(), peft_config=lora)
    trainer.train()
    trainer.save_model(str(tmp_path / "lora"))
    assert (tmp_path / "lora" / LORA_WEIGHT_NAME).is_file()
    card = (tmp_path / "lora" / "README.md").read_text()
    assert "brightness (weight 1)" in card and "steps: 2" in card and "rewards/brightness/mean" in card

    pipe = tiny_flux_pipeline()
    base = velocity(FlowPolicy.from_pipeline(pipe, max_sequence_length=MAX_SEQUENCE_LENGTH))
    pipe.load_lora_weights(str(tmp_path / "lora"))
    loaded = velocity(FlowPolicy.from_pipeline(pipe, max_sequence_length=MAX_SEQUENCE_LENGTH))
    trained = velocity(trainer.policy)
    assert not torch.equal(trained, base)
    assert torch.equal(loaded, trained)


def test_full_result_loads_from_the_transformer_subfolder(tmp_path):
    trainer = GRPOTrainer(ovis_policy(), brightness, args=tiny_config(tmp_path / "run", learning_rate=1e-3),
                          train_dataset=dataset())
    trainer.train()
    trainer.save_model(str(tmp_path / "full"))
    pipe = ovis_image_tiny(tokenizer=ovis_prefix_tokenizer())
    base = velocity(FlowPolicy.from_pipeline(pipe, max_sequence_length=24))
    pipe.transformer = OvisImageTransformer2DModel.from_pretrained(str(tmp_path / "full"), subfolder="transformer")
    loaded = velocity(FlowPolicy.from_pipeline(pipe, max_sequence_length=24))
    trained = velocity(trainer.policy)
    assert not torch.equal(trained, base)
    assert torch.equal(loaded, trained)
    assert "Full transformer weights" in (tmp_path / "full" / "README.md").read_text()
