"""ImageReward (Xu et al., NeurIPS 2023): BLIP's ViT and its image-grounded text encoder, then an MLP, through
transformers' BLIP classes.

The official checkpoint (`THUDM/ImageReward`: `ImageReward.pt` + `med_config.json`) is the state dict of the
authors' `ImageReward` module: `blip.visual_encoder.*` (a timm-style ViT-L/16 at 224 px, LayerNorm eps 1e-6),
`blip.text_encoder.*` (BLIP's BERT with cross-attention, configured by `med_config.json`) and `mlp.layers.*`
(the aesthetic-predictor head, 768-1024-128-64-16-1, no activations). Its score, reproduced here:

    image  -> resize the short side to 224 (bicubic), center-crop 224, CLIP mean/std
    prompt -> BERT tokens ([CLS] ... [SEP]), padded / truncated to 35
    score  = (MLP(text_encoder(prompt, cross-attending to ViT(image))[CLS]) - 0.16717362830052426) / 1.0333394966054072

The ViT maps onto `BlipVisionModel` (`qkv`, `proj` -> `projection`, `norm1/2` -> `layer_norm1/2`, `norm` ->
`post_layernorm`), the text encoder onto `BlipTextModel` with the same key names.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from .aesthetic import AestheticMLP
from .clip_utils import resolve_dtype
from .lazy_model import LazyModel

IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
# timm ViT name -> BlipVisionModel name (substring replacements, in order)
_VIT_RENAMES = (("patch_embed.proj.", "embeddings.patch_embedding."), ("blocks.", "encoder.layers."),
                (".attn.qkv.", ".self_attn.qkv."), (".attn.proj.", ".self_attn.projection."),
                (".norm1.", ".layer_norm1."), (".norm2.", ".layer_norm2."))
_VIT_NAMES = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
              "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}


def _vision_key(key: str) -> str:
    if key in _VIT_NAMES:
        return _VIT_NAMES[key]
    for old, new in _VIT_RENAMES:
        key = key.replace(old, new)
    return key


def load_imagereward_files(source: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`(state_dict, med_config)` from a folder or Hub id holding `ImageReward.pt` and `med_config.json`, or the
    `.pt` file itself (with `med_config.json` beside it)."""
    path = Path(source)
    if path.is_file():
        weights, config = path, path.with_name("med_config.json")
    elif path.is_dir():
        weights, config = path / "ImageReward.pt", path / "med_config.json"
    else:
        from huggingface_hub import hf_hub_download

        weights, config = (Path(hf_hub_download(str(source), f)) for f in ("ImageReward.pt", "med_config.json"))
    state = torch.load(weights, map_location="cpu", weights_only=True)
    return state, json.loads(Path(config).read_text())


def preprocess(images: Sequence[Image.Image], size: int = 224) -> torch.Tensor:
    """The authors' transform (torchvision's `Resize(size, BICUBIC)`, `CenterCrop(size)`, RGB, `ToTensor`, CLIP
    `Normalize`) on PIL images, without torchvision (which resizes PIL images with PIL). `size` is the ViT's input
    size (224 for the released model). Returns `torch.Tensor` of shape `[N, 3, size, size]`."""
    out = []
    for image in images:
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_long = int(size * long / short)  # torchvision truncates the long side
        new_w, new_h = (size, new_long) if width <= height else (new_long, size)
        image = image.resize((new_w, new_h), Image.BICUBIC)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        image = image.crop((left, top, left + size, top + size)).convert("RGB")
        pixels = (np.asarray(image, dtype=np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
        out.append(torch.from_numpy(pixels.transpose(2, 0, 1).copy()))
    return torch.stack(out)


class ImageRewardModel(nn.Module):
    """BLIP ViT + image-grounded BLIP text encoder + MLP head; `forward` gives the normalised score `[B]`."""

    def __init__(self, vision: nn.Module, text: nn.Module, mlp: AestheticMLP):
        super().__init__()
        self.vision, self.text, self.mlp = vision, text, mlp

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                           encoder_attention_mask=image_mask, is_decoder=False).last_hidden_state
        return ((self.mlp(hidden[:, 0].float()) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).squeeze(-1)


def build_imagereward_model(source: str | os.PathLike, device: str | torch.device = "cpu",
                            dtype: torch.dtype | str | None = None) -> ImageRewardModel:
    """Map the official state dict onto `BlipVisionModel`, `BlipTextModel` and `AestheticMLP`."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    state, med = load_imagereward_files(source)
    if not med.get("add_cross_attention", False):
        raise ValueError("med_config.json must have add_cross_attention: true (ImageReward's text encoder "
                         "cross-attends to the image)")
    vit = {k[len("blip.visual_encoder."):]: v for k, v in state.items() if k.startswith("blip.visual_encoder.")}
    if "cls_token" not in vit:
        raise ValueError("not an ImageReward checkpoint: no blip.visual_encoder.cls_token")
    hidden, patch = vit["cls_token"].shape[-1], vit["patch_embed.proj.weight"].shape[-1]
    vision_config = BlipVisionConfig(
        hidden_size=hidden, intermediate_size=vit["blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=len({k.split(".")[1] for k in vit if k.startswith("blocks.")}),
        num_attention_heads=hidden // 64,  # BLIP's ViT-B and ViT-L both use 64-dim heads
        image_size=math.isqrt(vit["pos_embed"].shape[1] - 1) * patch, patch_size=patch, hidden_act="gelu",
        layer_norm_eps=1e-6)
    vision_state = {_vision_key(k): v for k, v in vit.items()}
    text_config = BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], encoder_hidden_size=hidden,
        intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"], max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med.get("hidden_act", "gelu"), layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        pad_token_id=med.get("pad_token_id", 0), is_decoder=True)  # is_decoder builds the cross-attention layers
    text_state = {k[len("blip.text_encoder."):]: v for k, v in state.items()
                  if k.startswith("blip.text_encoder.") and not k.endswith("position_ids")}
    vision, text = BlipVisionModel(vision_config), BlipTextModel(text_config, add_pooling_layer=False)
    vision.load_state_dict(vision_state, strict=True)
    text.load_state_dict(text_state, strict=True)
    mlp = AestheticMLP(med["hidden_size"])
    mlp.load_state_dict({k[len("mlp."):]: v for k, v in state.items() if k.startswith("mlp.")})
    model = ImageRewardModel(vision.to(dtype=resolve_dtype(dtype)), text.to(dtype=resolve_dtype(dtype)), mlp)
    return model.to(device).eval()


class ImageReward:
    """ImageReward score of each image for its prompt (standardised: mean 0, std 1 over the authors' data).

    Args:
        model (`str`, defaults to `"THUDM/ImageReward"`): folder or Hub id holding `ImageReward.pt` and
            `med_config.json`, or the `.pt` file.
        tokenizer (`str`, defaults to `"bert-base-uncased"`): the BERT tokenizer (folder or Hub id), to which
            `[DEC]` and `[ENC]` are added as in BLIP.
        device (`str`, defaults to `"cpu"`), dtype (defaults to float32): of BLIP; the head runs in float32.
        batch_size (`int`, defaults to 16), max_length (`int`, defaults to 35, the authors'): prompt tokens.
        name (`str`, defaults to `"image_reward"`).

    The model loads on the first call (a pickled reward carries no weights: each Ray reward worker loads it once).
    """

    def __init__(self, model: str | os.PathLike = "THUDM/ImageReward",
                 tokenizer: str | os.PathLike = "bert-base-uncased", *, device: str | torch.device = "cpu",
                 dtype: torch.dtype | str | None = None, batch_size: int = 16, max_length: int = 35,
                 name: str = "image_reward"):
        from transformers import AutoTokenizer

        self.name, self.batch_size, self.max_length = name, batch_size, max_length
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        self.tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        self.lazy_model = LazyModel(functools.partial(build_imagereward_model, model, device, dtype))

    @property
    def model(self) -> ImageRewardModel:
        return self.lazy_model.get()

    @torch.no_grad()
    def score(self, prompts: Sequence[str], images: Sequence[Any]) -> torch.Tensor:
        """Scores, `torch.Tensor` of shape `[N]`, float32, on the CPU."""
        if len(prompts) != len(images):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} images")
        model = self.model
        param = next(model.vision.parameters())
        out = [torch.zeros(0)]
        for start in range(0, len(prompts), self.batch_size):
            tokens = self.tokenizer(list(prompts[start:start + self.batch_size]), padding="max_length",
                                    truncation=True, max_length=self.max_length, return_tensors="pt")
            pixels = preprocess(images[start:start + self.batch_size], model.vision.config.image_size)
            pixels = pixels.to(param.device, param.dtype)
            out.append(model(pixels, tokens["input_ids"].to(param.device),
                             tokens["attention_mask"].to(param.device)).cpu())
        return torch.cat(out)

    def __call__(self, prompts: list[str], images: list[Any], **columns: Any) -> list[float | None]:
        """Score a batch: `list[float]` of length N (extra `columns` are ignored)."""
        return self.score(prompts, images).tolist()
