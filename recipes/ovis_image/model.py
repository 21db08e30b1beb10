"""Ovis-Image model builders: the full 7B architecture and a tiny one on the same code path."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, OvisImagePipeline, OvisImageTransformer2DModel
from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3Model

from rlhf_image.families.ovis_image import OVIS_SYSTEM_PROMPT
from rlhf_image.sharded_init import without_zero3_init, zero3_enabled, zero3_init

# The Qwen3 chat template, reduced to what the Ovis-Image pipeline uses (one user turn, no thinking).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# The Ovis-Image MMDiT (7.37B parameters): 6 double-stream + 27 single-stream blocks, 24 heads of 128,
# RoPE axes (16, 56, 56), 2x2-packed 16-channel FLUX latents (64 input channels), Qwen3 states of width 2048.
OVIS_IMAGE_7B_TRANSFORMER = dict(patch_size=1, in_channels=64, out_channels=64, num_layers=6, num_single_layers=27,
                                 attention_head_dim=128, num_attention_heads=24, joint_attention_dim=2048,
                                 axes_dims_rope=(16, 56, 56))
OVIS_IMAGE_7B_HUB_ID = "AIDC-AI/Ovis-Image-7B"

# FLUX.1 / Ovis-Image scheduler settings (resolution-dependent exponential shift).
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def byte_level_tokenizer(words: tuple[str, ...] = ()) -> Qwen2TokenizerFast:
    """A Qwen2 tokenizer over the 256 byte symbols with no merges: every byte is a token, so any text
    (English or Chinese) encodes, and the tiny model sees text character by character. Built offline.

    Args:
        words (`tuple[str, ...]`, defaults to `()`): whole strings that get a token of their own (added
            tokens, matched before the byte split, wherever they occur); see [`ovis_prefix_tokenizer`].
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    backend.add_tokens([AddedToken(word, normalized=False) for word in dict.fromkeys(words)])
    return Qwen2TokenizerFast(tokenizer_object=backend, unk_token=None, pad_token="<|endoftext|>",
                              eos_token="<|im_end|>", bos_token=None, chat_template=CHAT_TEMPLATE,
                              model_max_length=1024)


# The Ovis-Image pipeline drops the first 28 tokens of the templated prompt: with Qwen's tokenizer they are
# `<|im_start|>`, `user`, `\n` and the system prompt. With bytes the system prompt alone is ~140 tokens, so a
# short `max_sequence_length` would keep only the system prompt. Splitting it into these 25 pieces (each one
# token) makes the prefix 28 tokens and the user prompt start right after it, as with Qwen.
OVIS_SYSTEM_PROMPT_PIECES = (
    "Describe", " the", " image", " by", " detailing", " the", " color", ",", " quantity", ",", " text", ",",
    " shape", ",", " size", ",", " texture", ",", " spatial", " relationships", " of", " the", " objects", " and",
    " background: ",
)


def ovis_prefix_tokenizer() -> Qwen2TokenizerFast:
    """[`byte_level_tokenizer`] plus one token each for `user` and the pieces of the Ovis system prompt,
    so that `<|im_start|>user\n` + system prompt is exactly the 28 tokens the pipeline drops and a tiny
    model sees the user prompt with a short `max_sequence_length` (e.g. 24-32). The pieces are ordinary
    added tokens: a user prompt containing one (`" the"`, `","`) gets that token, as a subword
    vocabulary would; everything else, digits and quotes included, stays one token per byte."""
    if "".join(OVIS_SYSTEM_PROMPT_PIECES) != OVIS_SYSTEM_PROMPT:
        raise ValueError("OVIS_SYSTEM_PROMPT_PIECES no longer spell OVIS_SYSTEM_PROMPT: update the pieces")
    return byte_level_tokenizer(("user", *OVIS_SYSTEM_PROMPT_PIECES))


def ovis_image_tiny(
    *,
    hidden_size: int = 32,
    num_heads: int = 2,
    num_layers: int = 1,
    num_single_layers: int = 1,
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6),
    latent_channels: int = 4,
    vae_block_out_channels: tuple[int, ...] = (8, 16),
    text_hidden_size: int = 32,
    text_layers: int = 2,
    vae_mid_block_attention: bool = True,
    tokenizer: Qwen2TokenizerFast | None = None,
    seed: int = 0,
) -> OvisImagePipeline:
    """A randomly initialised Ovis-Image pipeline at CPU size, built offline from configs with the same
    classes as the 7B model (`OvisImageTransformer2DModel`, `Qwen3Model`, `AutoencoderKL`).

    `vae_mid_block_attention=False` drops the VAE's mid-block self-attention (the costliest part of a
    tiny VAE fitted on the CPU); `tokenizer` defaults to [`byte_level_tokenizer`] (pass
    [`ovis_prefix_tokenizer`] for a short `max_sequence_length`). See [`ovis_image_tiny_text`] for the
    CPU demo's sizes."""
    torch.manual_seed(seed)
    head_dim = hidden_size // num_heads
    if sum(axes_dims_rope) != head_dim:
        raise ValueError(f"axes_dims_rope {axes_dims_rope} must sum to the head dim {head_dim}")
    with zero3_init():  # built already sharded when a ZeRO-3 config is active (see rlhf_image.sharded_init)
        transformer = OvisImageTransformer2DModel(
            patch_size=1, in_channels=4 * latent_channels, out_channels=4 * latent_channels, num_layers=num_layers,
            num_single_layers=num_single_layers, attention_head_dim=head_dim, num_attention_heads=num_heads,
            joint_attention_dim=text_hidden_size, axes_dims_rope=axes_dims_rope)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=["DownEncoderBlock2D"] * len(vae_block_out_channels),
        up_block_types=["UpDecoderBlock2D"] * len(vae_block_out_channels),
        block_out_channels=list(vae_block_out_channels), layers_per_block=1, norm_num_groups=4,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=vae_mid_block_attention)
    tokenizer = tokenizer if tokenizer is not None else byte_level_tokenizer()
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=text_hidden_size, intermediate_size=2 * text_hidden_size,
        num_hidden_layers=text_layers, num_attention_heads=2, num_key_value_heads=1,
        head_dim=text_hidden_size // 2, max_position_embeddings=1024))
    for module in (transformer, vae, text_encoder):
        module.eval()
    return OvisImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae,
                             text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)


# Text tokens of the demo model: its captions are 'A sign that says "<target>"' (19 + len(target) tokens with
# `ovis_prefix_tokenizer`), so 24 holds a 4-digit target and `<|im_end|>`; raise it for longer targets.
TINY_TEXT_MAX_SEQUENCE_LENGTH = 24


def ovis_image_tiny_text(seed: int = 0) -> OvisImagePipeline:
    """The CPU demo's text-rendering model (1.44M-parameter MMDiT), sized by measurement: on 32x96 renders
    of 4-digit numbers, trained at batch 8 and learning rate 1e-3, it renders held-out numbers legibly but
    imperfectly after about 1000 steps (OCR exact match 0.20 without CFG, 0.69 at CFG 3; about 3 minutes
    on one core), and 0.55 / 0.89 after 1200 (`bench/bench_tiny_text_learning.py`). Same classes as the
    7B model:

    - `OvisImageTransformer2DModel`: 1 double-stream + 2 single-stream blocks, 4 heads of 32 (hidden 128),
      RoPE axes (4, 14, 14); 2x2-packed 4-channel latents (16 input channels).
    - `AutoencoderKL`: 2 blocks of 8 and 16 channels (2x downsampling: 32x96 pixels -> 16x48 latents ->
      192 tokens), 4 latent channels, no mid-block attention. Random: fit it with
      `rlhf_image.recipes.ovis_image.tiny_vae.fit_tiny_vae` on the training renders before use.
    - `Qwen3Model` text encoder: 2 layers of width 32, frozen at its random initialisation (as the real
      encoder is frozen); [`ovis_prefix_tokenizer`]. Use `max_sequence_length=TINY_TEXT_MAX_SEQUENCE_LENGTH`.
    """
    return ovis_image_tiny(hidden_size=128, num_heads=4, num_layers=1, num_single_layers=2, axes_dims_rope=(4, 14, 14),
                           latent_channels=4, vae_block_out_channels=(8, 16), text_hidden_size=32, text_layers=2,
                           vae_mid_block_attention=False, tokenizer=ovis_prefix_tokenizer(), seed=seed)


def ovis_image_7b_transformer(path: str | None = None, torch_dtype: torch.dtype = torch.bfloat16,
                              device: str | torch.device | None = None) -> OvisImageTransformer2DModel:
    """The 7.37B Ovis-Image MMDiT: randomly initialised with the report's architecture (pretraining, or
    `device="meta"` to inspect it without memory), or loaded from a diffusers folder / Hub id `path`
    (its `transformer` subfolder when there is one)."""
    if path is None:
        if zero3_enabled():  # built already sharded across the ZeRO-3 processes (rlhf_image.sharded_init)
            with zero3_init():
                return OvisImageTransformer2DModel(**OVIS_IMAGE_7B_TRANSFORMER).to(torch_dtype)
        with torch.device(device or "cpu"):
            return OvisImageTransformer2DModel(**OVIS_IMAGE_7B_TRANSFORMER).to(torch_dtype)
    subfolder = "transformer" if _has_subfolder(path, "transformer") else None
    with without_zero3_init():
        return OvisImageTransformer2DModel.from_pretrained(path, subfolder=subfolder, torch_dtype=torch_dtype)


def ovis_image_7b(
    path: str = OVIS_IMAGE_7B_HUB_ID,
    *,
    transformer: str | OvisImageTransformer2DModel | None = None,
    text_encoder: str | None = None,
    vae: str | None = None,
    torch_dtype: torch.dtype = torch.bfloat16,
) -> OvisImagePipeline:
    """The full Ovis-Image pipeline: each part from a local diffusers folder or Hub id.

    Args:
        path (`str`, defaults to `"AIDC-AI/Ovis-Image-7B"`): a folder or Hub id in the diffusers layout
            (`transformer/`, `text_encoder/`, `tokenizer/`, `vae/`, `scheduler/`).
        transformer (`str` or module, *optional*): another checkpoint of the MMDiT (e.g. an SFT result),
            or `"random"` for the randomly initialised architecture (pretraining from scratch).
        text_encoder (`str`, *optional*): another source of the Qwen3 text encoder (Ovis2.5's LLM).
        vae (`str`, *optional*): another source of the FLUX.1-schnell VAE (e.g.
            `"black-forest-labs/FLUX.1-schnell"`; its `vae` subfolder is used).
        torch_dtype (`torch.dtype`, defaults to bfloat16).
    """
    if transformer == "random":
        transformer = ovis_image_7b_transformer(None, torch_dtype)
    elif transformer is None or isinstance(transformer, str):
        transformer = ovis_image_7b_transformer(transformer or path, torch_dtype)
    te_path = text_encoder or path
    te_sub = "text_encoder" if _has_subfolder(te_path, "text_encoder") else None
    vae_path = vae or path
    vae_sub = "vae" if _has_subfolder(vae_path, "vae") else None
    with without_zero3_init():  # frozen parts load whole, also under ZeRO-3
        return OvisImagePipeline(
            transformer=transformer,
            text_encoder=Qwen3Model.from_pretrained(te_path, subfolder=te_sub, torch_dtype=torch_dtype),
            tokenizer=Qwen2TokenizerFast.from_pretrained(path, subfolder="tokenizer"),
            vae=AutoencoderKL.from_pretrained(vae_path, subfolder=vae_sub, torch_dtype=torch_dtype),
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler"),
        )


def _has_subfolder(path: str, name: str) -> bool:
    """True for a local folder with `name/` inside, and for Hub ids (the diffusers repo layout)."""
    local = Path(path)
    return (local / name).is_dir() if local.exists() else True
