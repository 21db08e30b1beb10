"""The built-in model families: one `FlowPolicy` adapter per diffusers flow-matching pipeline.

How to add a family
-------------------
1. Read the family's diffusers pipeline (`pipeline_<family>.py`, its `__call__` and `encode_prompt`): what it feeds
   the transformer, how it combines CFG, which `sigmas` / `mu` it passes to `scheduler.set_timesteps`, how it
   draws the initial latents and decodes them.
2. Write `rlhf_image/families/<family>.py` with a `FlowPolicy` subclass (see `rlhf_image/policy.py`):
   - `__init__` takes the pipeline's components by their diffusers names (`transformer`, `vae`, `scheduler`,
     `text_encoder`, `tokenizer`, ...) plus options (`max_sequence_length`, `negative_prompt`, ...), so
     `FlowPolicy.from_pipeline` can build it from `pipe.components`;
   - `encode_prompt` returns a `Conditioning` padded to one fixed length (`pad_to_length`, with an
     `attention_mask` where the model takes one), so that a sample never depends on the other prompts of its batch;
   - `forward(transformer, latents, sigma, cond)` makes one transformer call on latents `[B, C, h, w]` and returns
     the velocity `eps - x0` in that layout (pack/unpack tokens, convert sigma to the model's timestep, flip the
     sign of `x0 - eps` models here);
   - override `guide` (CFG other than `v_neg + g (v - v_neg)`), `inference_sigmas` (a schedule other than FLUX's
     `linspace(1, 1/N, N)` + `calculate_shift`), `decode` / `encode_images` (a VAE other than `AutoencoderKL`),
     `latent_patch`, `num_latent_channels` or `_vae_scale_factor` where the family differs.
3. Add `"<PipelineClass>": "rlhf_image.families.<family>:<PolicyClass>"` to `BUILTIN_FAMILIES` below (users call
   `rlhf_image.register_family(PipelineClass, PolicyClass)` for their own).
4. Add a tiny random configuration built offline with the family's real text-encoder classes to
   `tests/tiny_models.py` and an entry to `FAMILIES` in `tests/test_families.py`: sampling at noise 0 must match the
   stock pipeline (its default scheduler settings and guidance style) within 1e-5 in float32, and GRPO, DPO and SFT
   must run and save a LoRA that the stock pipeline loads.
"""

from __future__ import annotations

import importlib
from typing import Any

# Pipeline class name -> "module:adapter class". Imported lazily: no family module is loaded until a pipeline
# of that family is wrapped, and `rlhf_image.policy` can import this table without an import cycle.
BUILTIN_FAMILIES = {
    "OvisImagePipeline": "rlhf_image.families.ovis_image:OvisImagePolicy",
    "FluxPipeline": "rlhf_image.families.flux:FluxPolicy",
    "StableDiffusion3Pipeline": "rlhf_image.families.sd3:SD3Policy",
    "Flux2Pipeline": "rlhf_image.families.flux2:Flux2Policy",
    "Flux2KleinPipeline": "rlhf_image.families.flux2:Flux2KleinPolicy",
    "QwenImagePipeline": "rlhf_image.families.qwen_image:QwenImagePolicy",
    "ZImagePipeline": "rlhf_image.families.z_image:ZImagePolicy",
    "ChromaPipeline": "rlhf_image.families.chroma:ChromaPolicy",
    "Lumina2Pipeline": "rlhf_image.families.lumina2:Lumina2Policy",
    "LongCatImagePipeline": "rlhf_image.families.longcat_image:LongCatImagePolicy",
}

__all__ = sorted({entry.rpartition(":")[2] for entry in BUILTIN_FAMILIES.values()} | {"BUILTIN_FAMILIES"})


def __getattr__(name: str) -> Any:
    for entry in BUILTIN_FAMILIES.values():
        module, _, class_name = entry.partition(":")
        if class_name == name:
            return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
