"""Loading transformers' CLIP (model, image processor, tokenizer) and computing normalised embeddings.

Shared by `rlhf_image.rewards.aesthetic` and `rlhf_image.rewards.clip_score`. Only transformers' CLIP classes are used
(never torchvision, timm or open_clip); the image processor uses the PIL backend, which needs no
torchvision.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """`torch.float32` for `None`, a `torch.dtype` as is, or a name such as `"bfloat16"`."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        value = getattr(torch, dtype.replace("torch.", ""), None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        return value
    return dtype


def load_clip(model: Any, processor: Any = None, *, need_tokenizer: bool, device: str | torch.device = "cpu",
              dtype: torch.dtype | str | None = None) -> tuple[Any, Any, Any]:
    """Load a CLIP model with its image processor and (optionally) its tokenizer.

    Args:
        model: a `transformers.CLIPModel`, or a local path / Hub id to load one from.
        processor: `None` (load from `model`'s path), a path / Hub id, a `CLIPProcessor`-like object
            (with `.image_processor` and `.tokenizer`), or an image processor alone.
        need_tokenizer (`bool`): whether text is embedded too (CLIPScore, PickScore).
        device, dtype: where and in which dtype the model runs.

    Returns:
        `(model, image_processor, tokenizer)`; the model is in eval mode on `device`; the tokenizer
        is `None` when not needed.
    """
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    dtype = resolve_dtype(dtype)
    source = model if isinstance(model, (str, os.PathLike)) else None
    if source is not None:
        model = CLIPModel.from_pretrained(source, dtype=dtype)
    if not isinstance(model, CLIPModel):
        raise TypeError(f"expected a CLIPModel or a path to one, got {type(model).__name__}")
    model = model.to(device=device, dtype=dtype).eval()

    if processor is None:
        if source is None:
            raise ValueError("pass `processor` (a path, Hub id or CLIPProcessor) when `model` is an object")
        processor = source
    tokenizer = None
    if isinstance(processor, (str, os.PathLike)):
        # The PIL backend gives the original CLIP preprocessing and needs no torchvision.
        image_processor = AutoImageProcessor.from_pretrained(processor, backend="pil")
        if need_tokenizer:
            tokenizer = AutoTokenizer.from_pretrained(processor)
    elif hasattr(processor, "image_processor"):
        image_processor, tokenizer = processor.image_processor, getattr(processor, "tokenizer", None)
    else:
        image_processor = processor
    if need_tokenizer and tokenizer is None:
        raise ValueError("this reward embeds text: `processor` must provide a tokenizer (a CLIPProcessor or a path)")
    return model, image_processor, tokenizer


def _features(output: Any) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _to_pil_rgb(image: Any) -> Image.Image:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return image if image.mode == "RGB" else image.convert("RGB")


@torch.no_grad()
def image_embeddings(model: Any, image_processor: Any, images: Sequence[Any], batch_size: int = 16) -> torch.Tensor:
    """L2-normalised CLIP image embeddings.

    Args:
        images (`list[PIL.Image.Image]` of length N).

    Returns:
        `torch.Tensor` of shape `[N, projection_dim]`, float32, on the model's device.
    """
    param = next(model.parameters())
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = [_to_pil_rgb(im) for im in images[start:start + batch_size]]
        pixels = image_processor(images=batch, return_tensors="pt")["pixel_values"]
        feats = _features(model.get_image_features(pixel_values=pixels.to(param.device, param.dtype)))
        chunks.append(torch.nn.functional.normalize(feats.float(), dim=-1))
    if not chunks:
        return torch.zeros(0, model.config.projection_dim, device=param.device)
    return torch.cat(chunks)


@torch.no_grad()
def text_embeddings(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """L2-normalised CLIP text embeddings (texts truncated to the model's context length).

    Args:
        texts (`list[str]` of length M).

    Returns:
        `torch.Tensor` of shape `[M, projection_dim]`, float32, on the model's device.
    """
    param = next(model.parameters())
    max_length = model.config.text_config.max_position_embeddings
    chunks = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                           max_length=max_length, return_tensors="pt")
        feats = _features(model.get_text_features(input_ids=tokens["input_ids"].to(param.device),
                                                  attention_mask=tokens["attention_mask"].to(param.device)))
        chunks.append(torch.nn.functional.normalize(feats.float(), dim=-1))
    if not chunks:
        return torch.zeros(0, model.config.projection_dim, device=param.device)
    return torch.cat(chunks)
