"""Every built-in family on a tiny random configuration built offline with its real text-encoder classes: sampling at
noise 0 equals its stock diffusers pipeline (default scheduler settings, its own guidance style) within 1e-5 in
float32; GRPO (LoRA) with CFG keeps the on-policy ratio exactly 1, and the saved LoRA loaded into a fresh stock
pipeline predicts what the trained policy predicts; DiffusionNFT trains two steps (its old policy moving between
them) and its saved LoRA loads the same way; DPO and SFT train two steps."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import pytest
import torch
from peft import LoraConfig

import tiny_models as tm
from rlhf_image import (DPOConfig, DPOTrainer, FlowMatchingConfig, FlowMatchingTrainer, FlowPolicy, GRPOConfig,
                        GRPOTrainer, NFTConfig, NFTTrainer)
from rlhf_image.model_io import load_lora
from rlhf_image.sampling import generate

PROMPTS = ['a sign that says "OPEN"', "a red cube on a table", "二维码 and a cat"]
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def no_cfg(scale: float) -> dict:
    return {}


@dataclass
class Family:
    """A tiny pipeline and how its stock `__call__` expresses the library's CFG scale `g`."""

    build: Callable
    adapter: str
    text_length: int = tm.MAX_SEQUENCE_LENGTH
    size: int = 32
    cfg_scale: float | None = 4.0  # None: the pipeline has no true CFG (parity only without it)
    pipe_kwargs: Callable[[float], dict] = field(default=lambda g: {"guidance_scale": g})


def true_cfg(g: float) -> dict:
    """FLUX.1 and Qwen-Image take true CFG as `true_cfg_scale` with an explicit negative prompt."""
    return {"true_cfg_scale": g, "negative_prompt": [""] * len(PROMPTS) if g > 1 else None}


FAMILIES = {
    "ovis-image": Family(tm.tiny_ovis_pipeline, "OvisImagePolicy"),
    "flux1-dev": Family(tm.tiny_flux_pipeline, "FluxPolicy", pipe_kwargs=true_cfg),
    "flux1-schnell": Family(lambda: tm.tiny_flux_pipeline(guidance_embeds=False,
                                                          scheduler_config=tm.SCHNELL_SCHEDULER_CONFIG),
                            "FluxPolicy", pipe_kwargs=true_cfg),
    "sd3": Family(lambda: tm.tiny_sd3_pipeline(version="3"), "SD3Policy"),
    "sd3.5": Family(lambda: tm.tiny_sd3_pipeline(version="3.5"), "SD3Policy"),
    "flux2": Family(tm.tiny_flux2_pipeline, "Flux2Policy", text_length=32, cfg_scale=None, pipe_kwargs=no_cfg),
    "flux2-klein": Family(tm.tiny_flux2_klein_pipeline, "Flux2KleinPolicy", text_length=32),
    "qwen-image": Family(tm.tiny_qwen_image_pipeline, "QwenImagePolicy", pipe_kwargs=true_cfg),
    "z-image": Family(tm.tiny_z_image_pipeline, "ZImagePolicy", text_length=48,
                      pipe_kwargs=lambda g: {"guidance_scale": g - 1}),  # Z-Image counts CFG from 0
    "chroma": Family(tm.tiny_chroma_pipeline, "ChromaPolicy"),
    "lumina2": Family(tm.tiny_lumina2_pipeline, "Lumina2Policy", text_length=48, size=64),
    "longcat-image": Family(tm.tiny_longcat_image_pipeline, "LongCatImagePolicy",  # prompts as given, not rewritten
                            pipe_kwargs=lambda g: {"guidance_scale": g, "enable_prompt_rewrite": False}),
}
CASES = [(name, 1.0) for name in FAMILIES] + [(name, f.cfg_scale) for name, f in FAMILIES.items() if f.cfg_scale]


@pytest.fixture(scope="session")
def family_pipes():
    """One tiny pipeline per family, built on first use and shared by the parity tests (which do not train)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = FAMILIES[name].build()
        return cache[name]

    return get


def policy_of(name: str, pipe) -> FlowPolicy:
    return FlowPolicy.from_pipeline(pipe, max_sequence_length=FAMILIES[name].text_length)


@pytest.mark.parametrize("name,scale", CASES, ids=[f"{n}-cfg{g:g}" for n, g in CASES])
def test_sampling_equals_the_stock_pipeline(family_pipes, name, scale):
    family, pipe = FAMILIES[name], family_pipes(name)
    policy = policy_of(name, pipe)
    assert type(policy).__name__ == family.adapter
    size = family.size
    kwargs = family.pipe_kwargs(scale)
    if "max_sequence_length" in inspect.signature(pipe.__call__).parameters:  # LongCat's is a pipeline attribute
        kwargs["max_sequence_length"] = family.text_length
    expected = pipe(prompt=list(PROMPTS), height=size, width=size, num_inference_steps=4, output_type="np",
                    generator=[torch.Generator().manual_seed(s) for s in range(3)], **kwargs).images
    ours = generate(policy, PROMPTS, [0, 1, 2], height=size, width=size, num_steps=4, guidance_scale=scale)
    assert torch.equal(policy.inference_sigmas(4, size, size), pipe.scheduler.sigmas.cpu())
    difference = np.abs(ours.images.permute(0, 2, 3, 1).numpy() - expected).max()
    assert difference <= 1e-5, difference


def red_reward(prompts, images, **columns):
    return [float(np.asarray(image, dtype=np.float32)[..., 0].mean() / 255) for image in images]


def lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGETS)


def probe_velocity(policy: FlowPolicy, size: int) -> torch.Tensor:
    h, w = policy.latent_size(size, size)
    x = torch.randn(2, policy.num_latent_channels, h, w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return policy.predict_velocity(x, torch.tensor([0.7, 0.3]), policy.encode_prompt(PROMPTS[:2])).float()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_grpo_lora_with_cfg_is_on_policy_and_its_lora_loads_in_the_stock_pipeline(tmp_path, name):
    family = FAMILIES[name]
    policy = policy_of(name, family.build())
    base = probe_velocity(policy, family.size)
    args = GRPOConfig(output_dir=str(tmp_path), max_steps=2, use_cpu=True, report_to=[], seed=0, num_generations=2,
                      per_device_train_batch_size=2, gradient_accumulation_steps=1, resolution=family.size,
                      num_inference_steps=2, guidance_scale=2.0, learning_rate=1e-3, save_strategy="no",
                      log_samples_steps=0, disable_tqdm=True)
    trainer = GRPOTrainer(policy, red_reward, args=args, peft_config=lora(),
                          train_dataset=[{"prompt": "a red square"}, {"prompt": "a blue circle"}])
    trainer.train()
    ratios = [(e["ratio/min"], e["ratio/max"]) for e in trainer.state.log_history if "ratio/min" in e]
    assert ratios == [(1.0, 1.0)] * 2  # batched CFG in sampling and training: bit-identical velocities
    trainer.save_model(str(tmp_path))
    trained = probe_velocity(trainer.policy, family.size)

    fresh = family.build()
    load_lora(fresh, str(tmp_path))  # the pipeline's load_lora_weights (Ovis-Image: the transformer's adapter)
    reloaded = probe_velocity(policy_of(name, fresh), family.size)
    assert (reloaded - trained).abs().max() < 1e-5
    assert (reloaded - base).abs().max() > 1e-4


@pytest.mark.parametrize("name", list(FAMILIES))
def test_nft_lora_two_steps_and_its_lora_loads_in_the_stock_pipeline(tmp_path, name):
    family = FAMILIES[name]
    policy = policy_of(name, family.build())
    base = probe_velocity(policy, family.size)
    args = NFTConfig(output_dir=str(tmp_path), max_steps=2, use_cpu=True, report_to=[], seed=0, num_generations=2,
                     per_device_train_batch_size=2, gradient_accumulation_steps=1, resolution=family.size,
                     num_inference_steps=2, learning_rate=1e-3, save_strategy="no", log_samples_steps=0,
                     disable_tqdm=True, beta=0.01, old_policy_decay_rate=0.5)
    trainer = NFTTrainer(policy, red_reward, args=args, peft_config=lora(),
                         train_dataset=[{"prompt": "a red square"}, {"prompt": "a blue circle"}])
    trainer.train()
    losses = [e["loss/policy"] for e in trainer.state.log_history if "loss/policy" in e]
    deviation = [e["old_deviation"] for e in trainer.state.log_history if "old_deviation" in e]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert deviation[0] == 0.0 and deviation[1] > 0  # the old policy is half a step behind at step 2
    trainer.save_model(str(tmp_path))
    trained = probe_velocity(trainer.policy, family.size)
    fresh = family.build()
    load_lora(fresh, str(tmp_path))
    reloaded = probe_velocity(policy_of(name, fresh), family.size)
    assert (reloaded - trained).abs().max() < 1e-5
    assert (reloaded - base).abs().max() > 1e-4


def square(colour: tuple[int, int, int], size: int) -> PIL.Image.Image:
    image = PIL.Image.new("RGB", (size, size))
    image.paste(PIL.Image.new("RGB", (size // 2, size // 2), colour), (size // 4, size // 4))
    return image


@pytest.mark.parametrize("name", list(FAMILIES))
def test_dpo_two_steps(tmp_path, name):
    family = FAMILIES[name]
    rows = [{"prompt": "a red square", "chosen": square((255, 0, 0), family.size),
             "rejected": square((0, 0, 255), family.size)}] * 2
    args = DPOConfig(output_dir=str(tmp_path), max_steps=2, use_cpu=True, report_to=[], seed=0,
                     resolution=family.size, per_device_train_batch_size=2, learning_rate=1e-3, save_strategy="no",
                     disable_tqdm=True)
    trainer = DPOTrainer(policy_of(name, family.build()), args=args, train_dataset=rows, peft_config=lora())
    trainer.train()
    losses = [e["dpo_loss"] for e in trainer.state.log_history if "dpo_loss" in e]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_sft_two_steps(tmp_path, name):
    family = FAMILIES[name]
    rows = [{"image": square(colour, family.size), "prompt": caption, "key": caption}
            for colour, caption in [((255, 0, 0), "a red square"), ((0, 0, 255), "a blue square")]]
    args = FlowMatchingConfig(output_dir=str(tmp_path), max_steps=2, use_cpu=True, report_to="none", seed=0,
                              resolution=family.size, per_device_train_batch_size=2, learning_rate=1e-3,
                              save_strategy="no", disable_tqdm=True, logging_steps=1)
    trainer = FlowMatchingTrainer(policy_of(name, family.build()), args=args, train_dataset=rows,
                                  peft_config=lora())
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
