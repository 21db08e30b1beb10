"""Tiny pipelines of two diffusers flow-matching families, built from configs in milliseconds."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from rlhf_image.recipes.ovis_image.model import SCHEDULER_CONFIG, ovis_image_tiny

# Text sequence length of the tiny pipelines: short, so tests stay fast.
MAX_SEQUENCE_LENGTH = 16


def tiny_ovis_pipeline(seed: int = 0):
    return ovis_image_tiny(seed=seed)


def _byte_tokenizer(model_max_length: int, eos: str, pad: str, bos: str | None = None) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    specials = [pad, eos] + ([bos] if bos else [])
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(specials + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    backend.post_processor = processors.TemplateProcessing(
        single=(f"{bos} $A {eos}" if bos else f"$A {eos}"),
        special_tokens=[(t, vocab[t]) for t in specials])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token=pad, bos_token=bos,
                                   model_max_length=model_max_length)


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True) -> FluxPipeline:
    """FLUX.1-architecture pipeline: CLIP (pooled) + T5 text encoders, packed-latent MMDiT, FLUX VAE."""
    torch.manual_seed(seed)
    tokenizer = _byte_tokenizer(MAX_SEQUENCE_LENGTH, eos="<|endoftext|>", pad="<|pad|>", bos="<|startoftext|>")
    tokenizer_2 = _byte_tokenizer(MAX_SEQUENCE_LENGTH, eos="</s>", pad="<pad>")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_SEQUENCE_LENGTH, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id, decoder_start_token_id=0))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    for module in (text_encoder, text_encoder_2, transformer, vae):
        module.eval()
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae,
                        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                        tokenizer_2=tokenizer_2, transformer=transformer)
