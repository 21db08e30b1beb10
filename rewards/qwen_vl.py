"""Model inputs for the Qwen-VL family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) without their transformers processors.

transformers' Qwen-VL processor classes validate a video processor whose classes need torchvision, which this
project never installs, so they cannot be built here. What they do for images is small and is done here the same
way: the chat template of the checkpoint, the PIL image processor (`Qwen2VLImageProcessorPil`: resize to the
patch grid, normalise, cut into patches) and the image placeholder token repeated once per merged patch, as in
`Qwen2VLProcessor.__call__`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

QWEN_VL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
IMAGE_TOKEN = "<|image_pad|>"


def _folder_chat_template(source: str | os.PathLike) -> str | None:
    """The processor-level chat template saved beside a checkpoint (`chat_template.jinja` or `.json`), if any."""
    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json"):
        path = cached_file(str(source), name, _raise_exceptions_for_missing_entries=False)
        if path is None:
            continue
        with open(path, encoding="utf-8") as f:
            return f.read() if name.endswith(".jinja") else json.load(f)["chat_template"]
    return None


class QwenVLProcessor:
    """Tokenizer + PIL image processor of a Qwen-VL checkpoint, called like a transformers processor.

    Args:
        tokenizer: the checkpoint's tokenizer (its chat template is used when it has one).
        image_processor: a `Qwen2VLImageProcessorPil` (Qwen3-VL uses the same class with 16-pixel patches).
        chat_template (`str`, *optional*): overrides the tokenizer's.
    """

    def __init__(self, tokenizer: Any, image_processor: Any, chat_template: str | None = None):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.chat_template = chat_template or tokenizer.chat_template
        if not self.chat_template:
            raise ValueError("the checkpoint has no chat template (tokenizer_config.json, chat_template.jinja or "
                             "chat_template.json); pass `chat_template`")
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token: not a Qwen-VL tokenizer")

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike) -> QwenVLProcessor:
        """Load from a checkpoint folder or Hub id (tokenizer files, `preprocessor_config.json`)."""
        from transformers import AutoImageProcessor, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
        image_processor = AutoImageProcessor.from_pretrained(source, backend="pil")  # no torchvision
        return cls(tokenizer, image_processor, tokenizer.chat_template or _folder_chat_template(source))

    def apply_chat_template(self, conversations: list[list[dict]], tokenize: bool = False,
                            add_generation_prompt: bool = True, **kwargs: Any) -> list[str]:
        """The templated text of each conversation (`tokenize=False` only: tokens come from `__call__`)."""
        if tokenize:
            raise ValueError("QwenVLProcessor templates text only; call it on the text to get tokens")
        return self.tokenizer.apply_chat_template(conversations, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **kwargs)

    def __call__(self, text: Sequence[str], images: Sequence[Image.Image], padding: bool = True,
                 padding_side: str = "right", return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        """Tokens and pixels of N texts holding one image placeholder each, with N images.

        Returns:
            `dict` with `input_ids`, `attention_mask`, `mm_token_type_ids` (1 at image tokens) `[N, L]`,
            `pixel_values` `[P, C * T * p * p]` and `image_grid_thw` `[N, 3]`.
        """
        if return_tensors != "pt":
            raise ValueError("only return_tensors='pt' is supported")
        if len(text) != len(images):
            raise ValueError(f"got {len(text)} texts but {len(images)} images (one image per text)")
        vision = self.image_processor(images=list(images), return_tensors="pt")
        grid = vision["image_grid_thw"]
        merge = self.image_processor.merge_size ** 2
        expanded = []
        for i, t in enumerate(text):
            if t.count(IMAGE_TOKEN) != 1:
                raise ValueError(f"text {i} has {t.count(IMAGE_TOKEN)} {IMAGE_TOKEN} placeholders; expected 1")
            expanded.append(t.replace(IMAGE_TOKEN, IMAGE_TOKEN * (int(grid[i].prod()) // merge)))
        tokens = self.tokenizer(expanded, padding=padding, padding_side=padding_side, return_tensors="pt")
        input_ids = tokens["input_ids"]
        return {"input_ids": input_ids, "attention_mask": tokens["attention_mask"],
                "mm_token_type_ids": (input_ids == self.image_token_id).int(),
                "pixel_values": vision["pixel_values"], "image_grid_thw": grid}


def qwen_vl_utils_resize(image: Image.Image, min_pixels: int, max_pixels: int, factor: int = 28) -> Image.Image:
    """RGB image resized as `qwen_vl_utils.fetch_image` does: each side a multiple of `factor`, the area in
    `[min_pixels, max_pixels]`, the aspect ratio kept as closely as possible, PIL bicubic."""
    image = image.convert("RGB")
    width, height = image.size
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} is over 200")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return image.resize((w_bar, h_bar), Image.BICUBIC)
