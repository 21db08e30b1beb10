"""Your own `FlowPolicy` adapter for a diffusers family rlhf-image does not ship (AuraFlow), registered in one call,
checked against the stock pipeline, then trained with GRPO + LoRA from the pipeline itself and loaded back with plain
diffusers.

An adapter implements two methods: `encode_prompt` (here: the pipeline's own) and `forward` (one transformer call on
latents `[B, C, h, w]`, returning the velocity `eps - x0`), and says which sigmas the pipeline denoises through.
Everything else (sampling with log-probs, GRPO, DPO, SFT, LoRA, saving) comes from the library. A tiny AuraFlow
pipeline built from configs stands in for `AuraFlowPipeline.from_pretrained(...)`.

    python examples/flow_policy_adapter.py --output_dir /tmp/auraflow-grpo --max_steps 2
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, AutoencoderKL, FlowMatchEulerDiscreteScheduler
from peft import LoraConfig
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from rlhf_image import Conditioning, FlowPolicy, GRPOConfig, GRPOTrainer, register_family
from rlhf_image.sampling import generate
from rlhf_image.schedule import scheduler_sigmas


# [start:adapter]
class AuraFlowPolicy(FlowPolicy):
    """AuraFlow: `AuraFlowTransformer2DModel` on unpacked latents, a UMT5 text encoder, CFG in one batched call."""

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler, max_sequence_length: int = 256):
        self.text_pipe = AuraFlowPipeline(tokenizer, text_encoder, vae, transformer, scheduler)  # encodes text
        self.max_sequence_length = max_sequence_length
        super().__init__(transformer, vae, scheduler)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.vae, self.text_pipe.text_encoder]

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        embeds, *_ = self.text_pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=self.device,
                                                  max_sequence_length=self.max_sequence_length)
        return Conditioning(embeds)  # padded to max_sequence_length, as the pipeline pads

    def forward(self, transformer, latents, sigma, cond):
        return transformer(latents, encoder_hidden_states=cond.prompt_embeds.to(self.dtype),
                           timestep=sigma.to(self.dtype), return_dict=False)[0]  # AuraFlow takes t = sigma

    def inference_sigmas(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        return scheduler_sigmas(self.scheduler_config, num_steps)  # the pipeline passes no sigmas and no mu


register_family(AuraFlowPipeline, AuraFlowPolicy)  # from_pipeline and every trainer now take AuraFlowPipeline
# [end:adapter]


def byte_tokenizer(max_length: int = 16) -> PreTrainedTokenizerFast:
    """A T5-style byte-level tokenizer built offline (a real model ships its own)."""
    specials = ["<pad>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.add_special_tokens(specials)
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>",
                                   model_max_length=max_length)


def tiny_auraflow_pipeline(seed: int = 0) -> AuraFlowPipeline:
    """AuraFlow architecture at CPU size: one MMDiT and one single DiT layer, a two-layer UMT5 encoder."""
    torch.manual_seed(seed)
    tokenizer = byte_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                               num_heads=4, pad_token_id=0, eos_token_id=1)).eval()
    transformer = AuraFlowTransformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4,
                                             num_mmdit_layers=1, num_single_dit_layers=1, attention_head_dim=8,
                                             num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                             pos_embed_max_size=64).eval()
    vae = AutoencoderKL(latent_channels=4, block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        use_quant_conv=False, use_post_quant_conv=False).eval()
    return AuraFlowPipeline(tokenizer, text_encoder, vae, transformer, FlowMatchEulerDiscreteScheduler(shift=1.73))


def check_against_pipeline(pipe: AuraFlowPipeline, num_steps: int = 4, size: int = 32) -> float:
    """Largest pixel difference between the library's deterministic sampler and the stock pipeline from the same
    seeds, with CFG: about 1e-7 when the adapter is right (a wrong timestep scale or sign gives differences of
    order 0.1)."""
    # [start:check]
    policy = FlowPolicy.from_pipeline(pipe, max_sequence_length=16)  # the registered AuraFlowPolicy
    prompts = ["a red square", "a blue circle"]
    ours = generate(policy, prompts, seeds=[0, 1], height=size, width=size, num_steps=num_steps, guidance_scale=3.0)
    stock = pipe(prompts, height=size, width=size, num_inference_steps=num_steps, guidance_scale=3.0,
                 max_sequence_length=16, generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
                 output_type="np").images
    difference = float(np.abs(ours.images.permute(0, 2, 3, 1).numpy() - stock).max())
    # [end:check]
    return difference


def red_reward(prompts, images, **columns):
    """Mean red minus mean green-and-blue, in [-1, 1]."""
    pixels = [np.asarray(image, dtype=np.float32) / 255 for image in images]
    return [float(p[..., 0].mean() - p[..., 1:].mean()) for p in pixels]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", default="auraflow-grpo-lora")
    parser.add_argument("--max_steps", type=int, default=2)
    cli = parser.parse_args(argv)

    difference = check_against_pipeline(tiny_auraflow_pipeline())
    print(f"max |library ODE sample - AuraFlowPipeline| = {difference:.3g}")

    # [start:train]
    pipe = tiny_auraflow_pipeline()  # or AuraFlowPipeline.from_pretrained("fal/AuraFlow-v0.3")
    args = GRPOConfig(output_dir=cli.output_dir, max_steps=cli.max_steps, use_cpu=True, report_to=[],
                      num_generations=4, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                      resolution=32, num_inference_steps=4, guidance_scale=1.0, learning_rate=1e-2,
                      save_strategy="no", log_samples_steps=0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    trainer = GRPOTrainer(pipe, red_reward, args=args, train_dataset=[{"prompt": "a red square"}],
                          peft_config=lora)
    trainer.train()
    trainer.save_model(cli.output_dir)
    # [end:train]

    reloaded = tiny_auraflow_pipeline()
    reloaded.load_lora_weights(cli.output_dir)  # AuraFlow's pipeline has a LoRA loader
    ratios = [e["ratio/max"] for e in trainer.state.log_history if "ratio/max" in e]
    print(f"{trainer.state.global_step} GRPO steps; on-policy ratio max per step {ratios}; LoRA in {cli.output_dir}")
    return {"difference": difference, "trainer": trainer, "pipe": reloaded}


if __name__ == "__main__":
    main()
