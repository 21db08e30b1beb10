"""Shared pieces of the online-RL tests (GRPO, DiffusionNFT / AWM): verifiable rewards, prompts, tiny CPU configs."""

from __future__ import annotations

import numpy as np
from tiny_models import MAX_SEQUENCE_LENGTH, tiny_flux_pipeline

from rlhf_image.recipes.ovis_image.model import ovis_image_tiny, ovis_prefix_tokenizer
from rlhf_image import GRPOConfig, NFTConfig
from rlhf_image.policy import FlowPolicy

PROMPTS = ["a cat", "a dog", "a red house", "the sea", "a tree", "the sun", "a car", "a boat"]
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_out"]


def brightness(prompts, images, **columns):
    """Mean pixel value in [0, 1]: a verifiable reward the tiny models can climb."""
    return [float(np.asarray(image, dtype=np.float32).mean() / 255) for image in images]


def redness(prompts, images, **columns):
    """Mean of the red channel in [0, 1]."""
    return [float(np.asarray(image, dtype=np.float32)[..., 0].mean() / 255) for image in images]


def flat_for_animals(prompts, images, **columns):
    """Brightness, except a constant for the animal prompts: their groups have no reward spread (advantage 0)."""
    return [0.5 if prompt.startswith(("a cat", "a dog", "a boat")) else value
            for prompt, value in zip(prompts, brightness(prompts, images))]


def ovis_policy(seed: int = 0) -> FlowPolicy:
    """Tiny Ovis-Image with a short text sequence (the prefix tokenizer keeps the user prompt in 24 tokens)."""
    pipe = ovis_image_tiny(tokenizer=ovis_prefix_tokenizer(), seed=seed)
    return FlowPolicy.from_pipeline(pipe, max_sequence_length=24)


def flux_policy(seed: int = 0) -> FlowPolicy:
    """Tiny FLUX.1 with the T5 sequence at the tokenizers' 16 tokens (FluxPolicy defaults to 512)."""
    return FlowPolicy.from_pipeline(tiny_flux_pipeline(seed), max_sequence_length=MAX_SEQUENCE_LENGTH)


def dataset(n: int = len(PROMPTS)) -> list[dict]:
    return [{"prompt": PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" {i}")} for i in range(n)]


def tiny_config(output_dir, config_class=GRPOConfig, **overrides) -> GRPOConfig:
    """Two prompts x four images per step at 32x32 px, four denoising steps, on the CPU."""
    values = dict(
        output_dir=str(output_dir), use_cpu=True, report_to=[], disable_tqdm=True, seed=0,
        num_generations=4, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        num_inference_steps=4, resolution=32, guidance_scale=1.0, max_steps=2, learning_rate=1e-2,
        lr_scheduler_type="constant", save_strategy="no", log_samples_steps=0, logging_steps=1,
    )
    values.update(overrides)
    return config_class(**values)


def tiny_nft_config(output_dir, **overrides) -> NFTConfig:
    """[`tiny_config`] for the NFT trainer: ODE rollouts, and AWM's two strata fit the four-step schedule."""
    return tiny_config(output_dir, NFTConfig, **{"awm_num_timesteps": 2, **overrides})


def logged(trainer, key: str) -> list[float]:
    """Per-step values of `key` in the trainer's log history."""
    return [entry[key] for entry in trainer.state.log_history if key in entry]
