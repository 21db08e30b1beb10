"""Tiny random Qwen-VL checkpoints built offline, in the layouts the real ones have on the Hub.

- `qwen_vl_tokenizer`: a byte-level Qwen2 tokenizer (every byte a token) with Qwen's special tokens and the
  Qwen2-VL chat template; long fixed strings (a judge's question, HPSv3's instruction) can be given one token each
  so that test sequences stay short.
- `save_qwen2_vl_base`: a Qwen2-VL-7B-Instruct-shaped folder (its flat `config.json`, `preprocessor_config.json`
  with `min_pixels`/`max_pixels`, tokenizer files and `chat_template.json`), but tiny; no weights.
- `save_hpsv3_checkpoint`: `HPSv3.safetensors` in the authors' key layout for that base.
- `save_judge_model`: a tiny Qwen2.5-VL or Qwen3-VL saved with `save_pretrained`, with its tokenizer and image
  processor.
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
