"""A `FlowPolicy` adapter for a diffusers family rlhf-image does not ship (Stable Diffusion 3), checked against the
stock pipeline, then trained with GRPO + LoRA and loaded back with plain diffusers.

An adapter implements two methods: `encode_prompt` (here: the pipeline's own) and `_transformer_forward` (one
transformer call on 2x2-packed latent tokens). Everything else (sampling with log-probs, GRPO, DPO, LoRA, saving)
comes from the library. A tiny SD3 pipeline built from configs (two CLIP text encoders, no T5) stands in for
`StableDiffusion3Pipeline.from_pretrained(...)`.

    python examples/flow_policy_adapter.py --output_dir /tmp/sd3-grpo --max_steps 2
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3Pipeline)
from peft import LoraConfig
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast

from rlhf_image import GRPOConfig, GRPOTrainer
from rlhf_image.policy import Conditioning, FlowPolicy, pack_latents, unpack_latents
from rlhf_image.sampling import generate


# [start:adapter]
class SD3Policy(FlowPolicy):
    """Stable Diffusion 3 / 3.5: `SD3Transformer2DModel`, CLIP-L + CLIP-G (+ T5) text encoders, SD3 VAE."""

    def __init__(self, pipe: StableDiffusion3Pipeline, max_sequence_length: int = 256, negative_prompt: str = ""):
        self.pipe = pipe  # its encode_prompt is reused as it is
        self.max_sequence_length = max_sequence_length
        super().__init__(pipe.transformer, pipe.vae, pipe.scheduler.config, negative_prompt)

    def frozen_modules(self) -> list[torch.nn.Module]:
        encoders = (self.pipe.text_encoder, self.pipe.text_encoder_2, self.pipe.text_encoder_3)
        return [self.vae, *[module for module in encoders if module is not None]]

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, prompts, prompts, device=self.device,
                                                       do_classifier_free_guidance=False,
                                                       max_sequence_length=self.max_sequence_length)
        return Conditioning(embeds, pooled)

    def _transformer_forward(self, transformer, tokens, sigma, cond, height, width):
        latents = unpack_latents(tokens, height, width)  # SD3 takes [B, C, h, w] and patchifies inside
        velocity = transformer(hidden_states=latents, timestep=sigma * 1000,  # SD3 expects t in [0, 1000]
                               encoder_hidden_states=cond.prompt_embeds.to(self.dtype),
                               pooled_projections=cond.pooled_prompt_embeds.to(self.dtype), return_dict=False)[0]
        return pack_latents(velocity)
# [end:adapter]


def byte_tokenizer(max_length: int = 16) -> PreTrainedTokenizerFast:
    """A CLIP-style byte-level tokenizer built offline (a real model ships its own)."""
    specials = ["<|pad|>", "<|endoftext|>", "<|startoftext|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.add_special_tokens(specials)
    backend.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[(t, vocab[t]) for t in specials])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   bos_token="<|startoftext|>", model_max_length=max_length)


def tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """SD3 architecture at CPU size: two CLIP encoders (pooled 32 + 32), no T5 (SD3 supports dropping it)."""
    torch.manual_seed(seed)
    tokenizers = [byte_tokenizer(), byte_tokenizer()]
    encoders = [CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, projection_dim=32, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)).eval() for tok in tokenizers]
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                        caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16)
    vae = AutoencoderKL(latent_channels=4, block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae.eval(),
        text_encoder=encoders[0], tokenizer=tokenizers[0], text_encoder_2=encoders[1], tokenizer_2=tokenizers[1],
        text_encoder_3=None, tokenizer_3=None)


def check_against_pipeline(policy: SD3Policy, num_steps: int = 4, size: int = 32) -> float:
    """Largest difference between the library's deterministic sampler and the stock pipeline from the same noise:
    about 1e-7 when the adapter is right (a wrong timestep scale or token layout gives differences of order 1)."""
    # [start:check]
    trajectory = generate(policy, ["a red square"], seeds=[0], height=size, width=size, num_steps=num_steps,
                          sde_type="ode", decode=False)
    noise = policy.initial_noise(size, size, [torch.Generator().manual_seed(0)])
    reference = policy.pipe(prompt_embeds=trajectory.cond.prompt_embeds,
                            pooled_prompt_embeds=trajectory.cond.pooled_prompt_embeds, latents=noise,
                            height=size, width=size, num_inference_steps=num_steps, guidance_scale=1.0,
                            sigmas=np.linspace(1.0, 1 / num_steps, num_steps).tolist(),  # the library's schedule
                            output_type="latent").images
    difference = (reference - trajectory.final_latents).abs().max().item()
    # [end:check]
    return difference


def red_reward(prompts, images, **columns):
    """Mean red minus mean green-and-blue, in [-1, 1]."""
    pixels = [np.asarray(image, dtype=np.float32) / 255 for image in images]
    return [float(p[..., 0].mean() - p[..., 1:].mean()) for p in pixels]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", default="sd3-grpo-lora")
    parser.add_argument("--max_steps", type=int, default=2)
    cli = parser.parse_args(argv)

    difference = check_against_pipeline(SD3Policy(tiny_sd3_pipeline(), max_sequence_length=16))
    print(f"max |library ODE sample - StableDiffusion3Pipeline| = {difference:.3g}")

    # [start:train]
    policy = SD3Policy(tiny_sd3_pipeline(), max_sequence_length=16)
    args = GRPOConfig(output_dir=cli.output_dir, max_steps=cli.max_steps, use_cpu=True, report_to=[],
                      num_generations=4, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                      resolution=32, num_inference_steps=4, guidance_scale=1.0, learning_rate=1e-2,
                      save_strategy="no", log_samples_steps=0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    trainer = GRPOTrainer(policy, red_reward, args=args, train_dataset=[{"prompt": "a red square"}],
                          peft_config=lora)
    trainer.train()
    trainer.save_model(cli.output_dir)
    # [end:train]

    pipe = tiny_sd3_pipeline()
    pipe.load_lora_weights(cli.output_dir)  # SD3's pipeline has a LoRA loader
    ratios = [e["ratio/max"] for e in trainer.state.log_history if "ratio/max" in e]
    print(f"{trainer.state.global_step} GRPO steps; on-policy ratio max per step {ratios}; LoRA in {cli.output_dir}")
    return {"difference": difference, "trainer": trainer, "pipe": pipe}


if __name__ == "__main__":
    main()
