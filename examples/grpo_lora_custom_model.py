"""GRPO with LoRA on your own diffusers model and your own reward, in one file.

Builds a tiny FLUX.1-architecture pipeline from configs (stands in for `FluxPipeline.from_pretrained(...)`),
defines a reward that reads a dataset column, trains a LoRA with `GRPOTrainer` for a few steps on the CPU,
saves it, and loads it back into a fresh pipeline with plain diffusers (`pipe.load_lora_weights`).

    python examples/grpo_lora_custom_model.py --output_dir /tmp/grpo-lora --max_steps 4
"""

import argparse

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from peft import LoraConfig
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from rlhf_image import GRPOConfig, GRPOTrainer

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


def colour_reward(prompts, images, target_colour, **columns):
    """Closeness of the mean colour to the row's `target_colour` column: 1 - mean |rgb - target| / 255."""
    rewards = []
    for image, name in zip(images, target_colour):
        mean = np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(0)
        rewards.append(float(1 - np.abs(mean - np.array(COLOURS[name])).mean() / 255))
    return rewards


def byte_tokenizer(eos: str, pad: str, bos: str | None = None) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built offline (a real model ships its own)."""
    specials = [pad, eos] + ([bos] if bos else [])
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.add_special_tokens(specials)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}" if bos else f"$A {eos}", special_tokens=[(t, vocab[t]) for t in specials])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token=pad, bos_token=bos,
                                   model_max_length=16)


def tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    torch.manual_seed(seed)
    clip_tok = byte_tokenizer("<|endoftext|>", "<|pad|>", "<|startoftext|>")
    t5_tok = byte_tokenizer("</s>", "<pad>")
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=32, intermediate_size=37,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                                        projection_dim=32, bos_token_id=clip_tok.bos_token_id,
                                        eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(latent_channels=4, block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae.eval(), text_encoder=clip.eval(), tokenizer=clip_tok,
                        text_encoder_2=t5.eval(), tokenizer_2=t5_tok, transformer=transformer.eval())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", default="grpo-lora-custom")
    parser.add_argument("--max_steps", type=int, default=4)
    cli = parser.parse_args()

    dataset = [{"prompt": f"a {name} square", "target_colour": name} for name in COLOURS]
    args = GRPOConfig(output_dir=cli.output_dir, max_steps=cli.max_steps, use_cpu=True, report_to=[],
                      num_generations=4, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                      resolution=32, num_inference_steps=4, guidance_scale=1.0, sde_type="sde",
                      learning_rate=3e-2, lr_scheduler_type="constant", save_strategy="no", log_samples_steps=0)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_out"])
    trainer = GRPOTrainer(tiny_flux_pipeline(), colour_reward, args=args, train_dataset=dataset, peft_config=lora)
    trainer.train()
    trainer.save_model(cli.output_dir)

    # The saved LoRA is a standard diffusers LoRA: load it into a fresh copy of the base pipeline.
    pipe = tiny_flux_pipeline()
    pipe.load_lora_weights(cli.output_dir)
    image = pipe("a red square", height=32, width=32, num_inference_steps=4, guidance_scale=1.0,
                 generator=torch.Generator().manual_seed(0)).images[0]
    rewards = [e["rewards/colour_reward/mean"] for e in trainer.state.log_history if "rewards/colour_reward/mean" in e]
    print(f"mean reward per step: {[round(r, 4) for r in rewards]}")
    print(f"saved LoRA to {cli.output_dir}; reloaded pipeline reward on 'a red square': "
          f"{colour_reward(['a red square'], [image], ['red'])[0]:.4f}")


if __name__ == "__main__":
    main()
