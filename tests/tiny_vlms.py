"""Tiny random Qwen-VL checkpoints built offline, in the layouts the real ones have on the Hub.

- `qwen_vl_tokenizer`: a byte-level Qwen2 tokenizer (every byte a token) with Qwen's special tokens and the
  Qwen2-VL chat template; long fixed strings (a judge's question, HPSv3's instruction) can be given one token each
  so that test sequences stay short.
- `save_qwen2_vl_base`: a Qwen2-VL-7B-Instruct-shaped folder (its flat `config.json`, `preprocessor_config.json`
  with `min_pixels`/`max_pixels`, tokenizer files and `chat_template.json`), but tiny; no weights.
- `save_hpsv3_checkpoint`: `HPSv3.safetensors` in the authors' key layout for that base.
- `save_judge_model`: a tiny Qwen2.5-VL or Qwen3-VL saved with `save_pretrained`, with its tokenizer and image
  processor.
- `save_image_reward`: `ImageReward.pt` (the authors' key names: a timm ViT, BLIP's BERT, the MLP) +
  `med_config.json` + a BERT tokenizer folder, all tiny.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL-7B-Instruct's chat template (default system turn, an image as vision_start + image_pad + vision_end).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(count=0) %}{% set video_count = namespace(count=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.count = image_count.count + 1 %}{% if add_vision_id %}Picture {{ image_count.count }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.count = video_count.count + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.count }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def qwen_vl_tokenizer(words: tuple[str, ...] = ()):
    """Byte-level Qwen2 tokenizer with Qwen-VL's special tokens; each of `words` is one (added) token."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(SPECIAL_TOKENS + alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    backend.add_tokens([AddedToken(w, normalized=False) for w in dict.fromkeys(words)])
    return Qwen2TokenizerFast(tokenizer_object=backend, unk_token=None, pad_token="<|endoftext|>",
                              eos_token="<|im_end|>", bos_token=None, chat_template=QWEN2_VL_CHAT_TEMPLATE,
                              model_max_length=32768)


def _token_ids(tokenizer) -> dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
                bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"))


def save_qwen2_vl_base(path: Path, words: tuple[str, ...] = (), vocab_slack: int = 7) -> Path:
    """A tiny Qwen2-VL-7B-Instruct-like folder in the Hub's file formats (no weights). Its vocabulary has
    `vocab_slack` unused rows, as the real one has (152064 rows for 151657 tokens)."""
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = qwen_vl_tokenizer(words)
    tokenizer.save_pretrained(path)
    config = {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]},
        "vocab_size": len(tokenizer) + vocab_slack, "tie_word_embeddings": False, "torch_dtype": "float32",
        "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 2, "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "vision_config": {"depth": 2, "embed_dim": 16, "mlp_ratio": 2, "num_heads": 2, "in_chans": 3,
                          "hidden_size": 32, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        **_token_ids(tokenizer),
    }
    (path / "config.json").write_text(json.dumps(config, indent=1))
    preprocessor = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                    "merge_size": 2, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
                    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=1))
    (path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_VL_CHAT_TEMPLATE}))
    return path


def random_qwen2_vl(base: Path, vocab_size: int, seed: int):
    """A seeded random `Qwen2VLForConditionalGeneration` with `base`'s config and `vocab_size` embedding rows."""
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    config = AutoConfig.from_pretrained(base, attn_implementation="sdpa")
    config.text_config.vocab_size = vocab_size
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config).eval()


def save_hpsv3_checkpoint(base: Path, path: Path, seed: int = 0):
    """`HPSv3.safetensors` for `base` (vocabulary = tokenizer + `<|Reward|>`, as the authors resize it), keys as
    the authors' transformers 4.45 `Qwen2VLRewardModelBT` names them. Returns `(model, head, state)`: the
    random Qwen2-VL (current transformers layout), the head, and the saved state dict."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    num_tokens = len(AutoTokenizer.from_pretrained(base)) + 1  # + <|Reward|>
    model = random_qwen2_vl(base, num_tokens, seed)
    hidden = model.config.text_config.hidden_size
    head = torch.nn.Sequential(torch.nn.Linear(hidden, 1024), torch.nn.ReLU(), torch.nn.Dropout(0.05),
                               torch.nn.Linear(1024, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)).eval()
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("model.visual."):
            state["visual." + key[len("model.visual."):]] = value
        elif key.startswith("model.language_model."):
            state["model." + key[len("model.language_model."):]] = value
        else:
            state[key] = value  # lm_head.weight
    state.update({f"rm_head.{k}": v for k, v in head.state_dict().items()})
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "HPSv3.safetensors"))
    return model, head, state


def save_judge_model(path: Path, model_type: str, words: tuple[str, ...] = (), seed: int = 0,
                     lm_head_scale: float = 1.0):
    """A tiny random Qwen2.5-VL (`"qwen2_5_vl"`) or Qwen3-VL (`"qwen3_vl"`) with tokenizer and PIL image
    processor, saved with `save_pretrained`; the LM head is multiplied by `lm_head_scale` (larger logits).
    Returns the model."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen3VLConfig,
                              Qwen3VLForConditionalGeneration)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = qwen_vl_tokenizer(words)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    if model_type == "qwen2_5_vl":
        patch = 14
        config = Qwen2_5_VLConfig(
            text_config=dict(**text, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                          mrope_section=[2, 1, 1])),
            vision_config=dict(depth=2, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32,
                               patch_size=patch, spatial_merge_size=2, temporal_patch_size=2,
                               fullatt_block_indexes=[1], window_size=56),
            **_token_ids(tokenizer))
        cls = Qwen2_5_VLForConditionalGeneration
    elif model_type == "qwen3_vl":
        patch = 16
        config = Qwen3VLConfig(
            text_config=dict(**text, head_dim=8, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                      mrope_section=[2, 1, 1], mrope_interleaved=True)),
            vision_config=dict(depth=2, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32,
                               patch_size=patch, spatial_merge_size=2, temporal_patch_size=2,
                               num_position_embeddings=64, deepstack_visual_indexes=[0]),
            **_token_ids(tokenizer))
        cls = Qwen3VLForConditionalGeneration
    else:
        raise ValueError(model_type)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(lm_head_scale)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2, image_mean=CLIP_MEAN,
                             image_std=CLIP_STD).save_pretrained(path)
    return model


# --- ImageReward ------------------------------------------------------------------------------------------------
IMAGEREWARD_VIT = dict(width=64, depth=2, heads=1, patch=8, image=32)  # BLIP's ViTs use 64-dim heads
IMAGEREWARD_MED = {  # med_config.json as the authors ship it, at a tiny size
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 48,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 2,
    "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "encoder_width": 768, "add_cross_attention": True}


def bert_tokenizer(path):
    """A lower-case WordPiece tokenizer over characters (plus a few words), saved like bert-base-uncased."""
    from transformers import BertTokenizer

    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "dog", "##s", *chars,
             *(f"##{c}" for c in chars), ".", ",", '"']
    path.mkdir()
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab_file=str(path / "vocab.txt"), do_lower_case=True).save_pretrained(path)
    return path


def official_state(vocab_size, seed=0):
    """Random weights under the names of the authors' `ImageReward` module (`blip.visual_encoder` a timm ViT,
    `blip.text_encoder` BLIP's BERT, `mlp.layers`), including keys the score does not use."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def ln(prefix, n):
        return {f"{prefix}.weight": 1 + rand(n, scale=0.1), f"{prefix}.bias": rand(n, scale=0.1)}

    def linear(prefix, n_out, n_in):
        return {f"{prefix}.weight": rand(n_out, n_in, scale=n_in ** -0.5), f"{prefix}.bias": rand(n_out, scale=0.1)}

    vit_size, med = IMAGEREWARD_VIT, IMAGEREWARD_MED
    w, h, grid, patch = vit_size["width"], med["hidden_size"], vit_size["image"] // vit_size["patch"], vit_size["patch"]
    vit = {"cls_token": rand(1, 1, w), "pos_embed": rand(1, grid * grid + 1, w),
           "patch_embed.proj.weight": rand(w, 3, patch, patch, scale=0.05),
           "patch_embed.proj.bias": rand(w, scale=0.1), **ln("norm", w)}
    for i in range(vit_size["depth"]):
        b = f"blocks.{i}"
        vit.update({**ln(f"{b}.norm1", w), **linear(f"{b}.attn.qkv", 3 * w, w), **linear(f"{b}.attn.proj", w, w),
                    **ln(f"{b}.norm2", w), **linear(f"{b}.mlp.fc1", 4 * w, w), **linear(f"{b}.mlp.fc2", w, 4 * w)})
    text = {"embeddings.word_embeddings.weight": rand(vocab_size, h),
            "embeddings.position_embeddings.weight": rand(med["max_position_embeddings"], h),
            "embeddings.position_ids": torch.arange(med["max_position_embeddings"]).unsqueeze(0),
            **ln("embeddings.LayerNorm", h)}
    for i in range(med["num_hidden_layers"]):
        b = f"encoder.layer.{i}"
        for attention, width in (("attention", h), ("crossattention", w)):
            text.update({**linear(f"{b}.{attention}.self.query", h, h),
                         **linear(f"{b}.{attention}.self.key", h, width),
                         **linear(f"{b}.{attention}.self.value", h, width),
                         **linear(f"{b}.{attention}.output.dense", h, h), **ln(f"{b}.{attention}.output.LayerNorm", h)})
        text.update({**linear(f"{b}.intermediate.dense", med["intermediate_size"], h),
                     **linear(f"{b}.output.dense", h, med["intermediate_size"]), **ln(f"{b}.output.LayerNorm", h)})
    mlp = {}
    for index, (n_out, n_in) in zip((0, 2, 4, 6, 7), ((1024, h), (128, 1024), (64, 128), (16, 64), (1, 16))):
        mlp.update(linear(f"layers.{index}", n_out, n_in))
    unused = {**linear("blip.vision_proj", 256, w), **linear("blip.text_proj", 256, h)}
    return {**{f"blip.visual_encoder.{k}": v for k, v in vit.items()},
            **{f"blip.text_encoder.{k}": v for k, v in text.items()}, **{f"mlp.{k}": v for k, v in mlp.items()},
            **unused}


def save_image_reward(root: Path, seed: int = 0) -> dict:
    """A tiny ImageReward in the official layout: `root/ImageReward/{ImageReward.pt, med_config.json}` and a BERT
    tokenizer in `root/tokenizer`. Returns `folder`, `tokenizer` (path), `state` and `bert` (the tokenizer with
    BLIP's `[DEC]` / `[ENC]` added)."""
    from transformers import AutoTokenizer

    root.mkdir(parents=True, exist_ok=True)
    tokenizer_path = bert_tokenizer(root / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    state = official_state(len(tokenizer), seed)
    folder = root / "ImageReward"
    folder.mkdir()
    torch.save(state, folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps({**IMAGEREWARD_MED, "vocab_size": len(tokenizer)}))
    return dict(folder=folder, tokenizer=tokenizer_path, state=state, bert=tokenizer)
