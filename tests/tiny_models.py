"""Tiny pipelines of the diffusers flow-matching families, built offline from configs (random weights, byte-level
tokenizers, the families' real text-encoder classes) in milliseconds."""

from __future__ import annotations

import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                       SD3Transformer2DModel, StableDiffusion3Pipeline)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerFast,
                          T5Config, T5EncoderModel)

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


# FLUX.1-schnell's scheduler: a static shift of 1 (no resolution-dependent shift).
SCHNELL_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def tiny_vae(latent_channels: int = 4, scaling_factor: float = 0.3611, shift_factor: float | None = 0.1159,
             block_out_channels: tuple[int, ...] = (8, 16), **kwargs) -> AutoencoderKL:
    """An `AutoencoderKL` with two blocks (2x downsampling) by default."""
    blocks = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=["DownEncoderBlock2D"] * blocks, up_block_types=["UpDecoderBlock2D"] * blocks,
        block_out_channels=list(block_out_channels), layers_per_block=1, norm_num_groups=4,
        scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False,
        **kwargs).eval()


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True, scheduler_config: dict | None = None
                       ) -> FluxPipeline:
    """FLUX.1-architecture pipeline: CLIP (pooled) + T5 text encoders, packed-latent MMDiT, FLUX VAE. The "dev"
    style has a guidance embedding; pass `guidance_embeds=False, scheduler_config=SCHNELL_SCHEDULER_CONFIG` for
    the "schnell" style."""
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
    vae = tiny_vae()
    for module in (text_encoder, text_encoder_2, transformer, vae):
        module.eval()
    scheduler = FlowMatchEulerDiscreteScheduler(**(scheduler_config or SCHEDULER_CONFIG))
    return FluxPipeline(scheduler=scheduler, vae=vae,
                        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                        tokenizer_2=tokenizer_2, transformer=transformer)


def _clip_with_projection(tokenizer, hidden_size: int = 16) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_SEQUENCE_LENGTH, projection_dim=hidden_size,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)).eval()


def _t5(tokenizer, d_model: int = 32) -> T5EncoderModel:
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0)).eval()


def tiny_sd3_pipeline(seed: int = 0, version: str = "3.5") -> StableDiffusion3Pipeline:
    """Stable Diffusion 3 architecture: CLIP-L + CLIP-G (pooled 16 + 16, states padded to the T5 width) and T5,
    `SD3Transformer2DModel` on unpacked latents (`version="3.5"`: a dual-attention layer and RMS qk-norm), SD3 VAE
    scaling, and SD3's scheduler (static shift 3)."""
    torch.manual_seed(seed)
    clip_tokenizers = [_byte_tokenizer(MAX_SEQUENCE_LENGTH, eos="<|endoftext|>", pad="<|pad|>", bos="<|startoftext|>")
                       for _ in range(2)]
    t5_tokenizer = _byte_tokenizer(MAX_SEQUENCE_LENGTH, eos="</s>", pad="<pad>")
    clips = [_clip_with_projection(tok) for tok in clip_tokenizers]
    t5 = _t5(t5_tokenizer)
    extra = dict(dual_attention_layers=(0,), qk_norm="rms_norm") if version == "3.5" else {}
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32,
        pos_embed_max_size=16, **extra).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(scaling_factor=1.5305, shift_factor=0.0609), text_encoder=clips[0], tokenizer=clip_tokenizers[0],
        text_encoder_2=clips[1], tokenizer_2=clip_tokenizers[1], text_encoder_3=t5, tokenizer_3=t5_tokenizer)


# --- FLUX.2 and FLUX.2-Klein ----------------------------------------------------------------------------------

# Mistral's chat format, reduced to what the FLUX.2 pipeline sends (a system and a user turn of text parts).
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}[SYSTEM_PROMPT]"
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}[/SYSTEM_PROMPT]{% else %}[INST]"
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}[/INST]{% endif %}{% endfor %}"
)


def tiny_flux2_vae(latent_channels: int = 4):
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False).eval()


def tiny_flux2_transformer(text_width: int, guidance_embeds: bool, latent_channels: int = 4):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * text_width, timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance_embeds).eval()


def tiny_flux2_pipeline(seed: int = 0):
    """FLUX.2 [dev] architecture: a `Mistral3ForConditionalGeneration` text encoder of 31 thin layers (the pipeline
    reads layers 10, 20 and 30), guidance embedding, batch-normed FLUX.2 VAE. The real model's `PixtralProcessor`
    needs torchvision for its image half; the pipeline's text path only calls its tokenizer's `apply_chat_template`,
    so a byte-level tokenizer with Mistral's chat format takes its place."""
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(seed)
    specials = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    tokenizer = _special_byte_tokenizer(specials, bos="<s>", eos="</s>", pad="<pad>", unk="<unk>",
                                        chat_template=MISTRAL_CHAT_TEMPLATE)
    config = Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                         max_position_embeddings=1024, num_attention_heads=4, num_hidden_layers=31,
                         num_key_value_heads=2, head_dim=4, rms_norm_eps=1e-5, sliding_window=None,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(model_type="pixtral", hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=32, image_size=30, patch_size=6, num_channels=3),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), vision_feature_layer=-1)
    text_encoder = Mistral3ForConditionalGeneration(config).eval()
    return Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=tiny_flux2_vae(),
                         text_encoder=text_encoder, tokenizer=tokenizer,
                         transformer=tiny_flux2_transformer(16, guidance_embeds=True))


def tiny_flux2_klein_pipeline(seed: int = 0):
    """FLUX.2 [klein] architecture: a `Qwen3ForCausalLM` text encoder of 28 thin layers (the pipeline reads layers 9,
    18 and 27) with a byte-level Qwen2 tokenizer and the Qwen3 chat template, no guidance embedding."""
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from rlhf_image.recipes.ovis_image.model import byte_level_tokenizer

    torch.manual_seed(seed)
    tokenizer = byte_level_tokenizer()
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=28, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=1024)).eval()
    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=tiny_flux2_vae(),
                              text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=tiny_flux2_transformer(16, guidance_embeds=False))


def _special_byte_tokenizer(specials: list[str], *, bos: str | None, eos: str, pad: str, unk: str | None = None,
                            chat_template: str | None = None, add_bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with the given special tokens first in its vocabulary (built offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token=unk, chat_template=chat_template, model_max_length=4096)


# --- Qwen-Image --------------------------------------------------------------------------------------------------

# Qwen-Image's prompt template drops its first 34 tokens (`<|im_start|>system\n`, the system prompt, `<|im_end|>\n`,
# `<|im_start|>user\n` with Qwen's tokenizer). These pieces, one token each, make the byte-level tokenizer's prefix
# the same 34 tokens, so a tiny model with a short `max_sequence_length` sees the user prompt, as the real one does.
QWEN_IMAGE_PREFIX_PIECES = (
    "system", "Describe", " the", " image", " by", " detailing", " the", " color", ",", " shape", ",", " size", ",",
    " texture", ",", " quantity", ",", " text", ",", " spatial", " relationships", " of", " the", " objects", " and",
    " background", ":", "user",
)


def tiny_qwen_image_pipeline(seed: int = 0):
    """Qwen-Image architecture: a two-layer `Qwen2_5_VLForConditionalGeneration` text encoder, a two-block
    `QwenImageTransformer2DModel` (no guidance embedding), a one-downsampling `AutoencoderKLQwenImage` with
    non-trivial latent statistics, and Qwen-Image's scheduler (dynamic exponential shift)."""
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from rlhf_image.recipes.ovis_image.model import byte_level_tokenizer

    torch.manual_seed(seed)
    tokenizer = byte_level_tokenizer(QWEN_IMAGE_PREFIX_PIECES)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4)).eval()
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 1.0]).eval()
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default",
                                                              "type": "default"}, rope_theta=1000000.0,
                         vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
        hidden_size=16, vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=tokenizer.eos_token_id)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae,
                             text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)


# --- Z-Image -----------------------------------------------------------------------------------------------------

# Z-Image's scheduler: a static shift of 3.
Z_IMAGE_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


def tiny_z_image_pipeline(seed: int = 0):
    """Z-Image architecture: a two-layer `Qwen3Model` text encoder with a byte-level Qwen2 tokenizer and the Qwen3 chat
    template, a two-layer `ZImageTransformer2DModel` with one refiner layer, FLUX-style `AutoencoderKL`."""
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from rlhf_image.recipes.ovis_image.model import byte_level_tokenizer

    torch.manual_seed(seed)
    tokenizer = byte_level_tokenizer()
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])
    with torch.no_grad():  # created with torch.empty: give them values
        transformer.x_pad_token.normal_(0, 0.02)
        transformer.cap_pad_token.normal_(0, 0.02)
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=1024)).eval()
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**Z_IMAGE_SCHEDULER_CONFIG), vae=tiny_vae(),
                          text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer.eval())


# --- Chroma and Lumina2 ------------------------------------------------------------------------------------------

def tiny_chroma_pipeline(seed: int = 0):
    """Chroma architecture: a two-layer T5 encoder (masked), `ChromaTransformer2DModel` with its timestep
    approximator, FLUX VAE, FLUX.1's dynamic-shift scheduler."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel

    torch.manual_seed(seed)
    tokenizer = _byte_tokenizer(MAX_SEQUENCE_LENGTH, eos="</s>", pad="<pad>")
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 4, 8), approximator_hidden_dim=32, approximator_layers=1,
        approximator_num_channels=16).eval()
    return ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=tiny_vae(),
                          text_encoder=_t5(tokenizer), tokenizer=tokenizer, transformer=transformer)


def tiny_lumina2_pipeline(seed: int = 0):
    """Lumina-Image 2.0 architecture: a two-layer `Gemma2Model` text encoder (byte-level tokenizer that adds `<bos>`),
    a two-layer `Lumina2Transformer2DModel`, a FLUX-style VAE with 8x downsampling (the pipeline assumes 8), Lumina's
    static shift of 6."""
    from diffusers import Lumina2Pipeline, Lumina2Transformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    tokenizer = _special_byte_tokenizer(["<pad>", "<eos>", "<bos>"], bos="<bos>", eos="<eos>", pad="<pad>",
                                        add_bos=True)
    text_encoder = Gemma2Model(Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=1024, pad_token_id=0, eos_token_id=1,
        bos_token_id=2)).eval()
    transformer = Lumina2Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, hidden_size=16, num_layers=2, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5,
        scaling_factor=1.0, axes_dim_rope=(4, 2, 2), axes_lens=(300, 32, 32), cap_feat_dim=16).eval()
    return Lumina2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=6.0),
                           vae=tiny_vae(block_out_channels=(8, 8, 16, 16)), text_encoder=text_encoder,
                           tokenizer=tokenizer)


# --- LongCat-Image -------------------------------------------------------------------------------------------------

def tiny_longcat_image_pipeline(seed: int = 0, text_length: int = MAX_SEQUENCE_LENGTH):
    """LongCat-Image architecture: a two-layer `Qwen2_5_VLForConditionalGeneration` text encoder with a byte-level
    Qwen2 tokenizer, a one-double / one-single block `LongCatImageTransformer2DModel`, a 16-channel FLUX-style VAE
    (the pipeline hard-codes 16 latent channels). The pipeline's text length (`tokenizer_max_length`, 512) is set to
    `text_length`."""
    from diffusers import LongCatImagePipeline, LongCatImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from rlhf_image.recipes.ovis_image.model import byte_level_tokenizer

    torch.manual_seed(seed)
    tokenizer = byte_level_tokenizer()
    transformer = LongCatImageTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=[4, 6, 6]).eval()
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default",
                                                              "type": "default"}, rope_theta=1000000.0,
                         vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
        hidden_size=16, vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=tokenizer.eos_token_id)
    pipe = LongCatImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=tiny_vae(latent_channels=16),
        text_encoder=Qwen2_5_VLForConditionalGeneration(config).eval(), tokenizer=tokenizer, text_processor=None,
        transformer=transformer)
    pipe.tokenizer_max_length = text_length
    return pipe
