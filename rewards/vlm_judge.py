"""`VLMJudgeReward`: a vision-language model asked a yes/no question about each image; the reward is P("yes").

The VQAScore / UnifiedReward-style pointwise judge: the question is a template with the prompt in it (by default
VQAScore's `Does this figure show "{prompt}"? Please answer yes or no.`), put in the model's chat template as
one user turn after the image, and the reward is the probability of the "yes" answer token at the first generated
position, normalised over the two answers:

    p_yes = exp(z_yes) / (exp(z_yes) + exp(z_no)),   z = next-token logits

(VQAScore normalises over the whole vocabulary instead; over two answers, a model that spreads mass on other
tokens is not penalised and the score always lies in [0, 1] with 0.5 for "undecided".)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from .clip_utils import resolve_dtype
from .lazy_model import LazyModel
from .qwen_vl import QWEN_VL_MODEL_TYPES, QwenVLProcessor

VQASCORE_TEMPLATE = 'Does this figure show "{prompt}"? Please answer yes or no.'
PROMPT_SLOT = "{prompt}"


def load_processor(source: str | os.PathLike) -> Any:
    """The processor of a VLM checkpoint: `QwenVLProcessor` for the Qwen-VL family (whose transformers processors
    need torchvision), else `transformers.AutoProcessor`."""
    from transformers import AutoConfig, AutoProcessor

    if AutoConfig.from_pretrained(source).model_type in QWEN_VL_MODEL_TYPES:
        return QwenVLProcessor.from_pretrained(source)
    return AutoProcessor.from_pretrained(source)


def load_vlm(source: str | os.PathLike, device: str | torch.device, dtype: torch.dtype | str | None) -> Any:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(source, dtype=resolve_dtype(dtype))
    return model.to(device).eval()


class VLMJudgeReward:
    """P("yes") of a VLM asked whether each image shows its prompt (see the module docstring).

    Tested with Qwen2.5-VL and Qwen3-VL (`AutoModelForImageTextToText`); any model whose processor takes
    `text=`, `images=`, `padding_side=` and has a chat template with `{"type": "image"}` content works the same.

    Args:
        model (defaults to `"Qwen/Qwen2.5-VL-7B-Instruct"`): a folder or Hub id, or a loaded model (then pass
            `processor`). A path loads on the first call (a pickled reward carries no weights: each Ray reward
            worker loads it once).
        processor: the processor or its folder / Hub id; defaults to `model`'s.
        template (`str`, defaults to VQAScore's question): the question, with `{prompt}` where the prompt goes.
        answers (`tuple[str, str]`, defaults to `("Yes", "No")`): the positive and negative answers; each must be
            one token for the tokenizer (the answer the chat model starts its reply with).
        image_size (`int` or `(height, width)`, *optional*): resize every image to this size (bicubic) before the
            processor; by default the processor's own rule (Qwen-VL: up to about 1M pixels, many tokens).
        device (`str`, defaults to `"cpu"`), dtype (defaults to `"bfloat16"`), batch_size (`int`, defaults to 8).
        name (`str`, defaults to `"vlm_judge"`).
    """

    def __init__(self, model: Any = "Qwen/Qwen2.5-VL-7B-Instruct", processor: Any = None, *,
                 template: str = VQASCORE_TEMPLATE, answers: tuple[str, str] = ("Yes", "No"),
                 image_size: int | tuple[int, int] | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype | str | None = "bfloat16", batch_size: int = 8, name: str = "vlm_judge"):
        if PROMPT_SLOT not in template:
            raise ValueError(f"template {template!r} has no {PROMPT_SLOT} slot: the judge would not see the prompt; "
                             f"write the question with {PROMPT_SLOT} where the prompt goes")
        if len(answers) != 2 or answers[0] == answers[1]:
            raise ValueError(f"answers must be two different strings (positive, negative), got {answers!r}")
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        if image_size is not None and min(image_size) < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.name, self.template, self.answers = name, template, tuple(answers)
        self.image_size, self.batch_size = image_size, batch_size
        is_path = isinstance(model, (str, os.PathLike))
        if processor is None and not is_path:
            raise ValueError("pass `processor` (an object or a path) when `model` is a loaded model")
        source = processor if processor is not None else model
        self.processor = load_processor(source) if isinstance(source, (str, os.PathLike)) else source
        self.answer_ids = [self._single_token(answer) for answer in self.answers]
        self.lazy_model = LazyModel(functools.partial(load_vlm, model, device, dtype)) if is_path else \
            LazyModel(model=model)

    def _single_token(self, answer: str) -> int:
        ids = self.processor.tokenizer.encode(answer, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"answer {answer!r} is {len(ids)} tokens for this tokenizer; the judge reads one "
                             "next-token logit per answer: choose single-token answers (e.g. 'Yes' / 'No')")
        return ids[0]

    @property
    def model(self) -> Any:
        return self.lazy_model.get()

    def question(self, prompt: str) -> str:
        """The question asked about an image generated for `prompt`."""
        return self.template.replace(PROMPT_SLOT, prompt)

    def inputs(self, prompts: Sequence[str], images: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Model inputs for one batch, left-padded so that every row's next token is at the last position."""
        conversations = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.question(p)}]}]
                         for p in prompts]
        texts = self.processor.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True)
        rgb = [im.convert("RGB") for im in images]
        if self.image_size is not None:
            height, width = self.image_size
            rgb = [im.resize((width, height), Image.BICUBIC) for im in rgb]
        return self.processor(text=texts, images=rgb, padding=True, padding_side="left", return_tensors="pt")

    @torch.no_grad()
    def answer_logits(self, prompts: Sequence[str], images: Sequence[Any]) -> torch.Tensor:
        """Next-token logits of (positive, negative) answer, `torch.Tensor` of shape `[N, 2]`, float32, on the CPU."""
        if len(prompts) != len(images):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} images")
        model = self.model
        device = next(model.parameters()).device
        out = [torch.zeros(0, 2)]
        for start in range(0, len(prompts), self.batch_size):
            batch = self.inputs(prompts[start:start + self.batch_size], images[start:start + self.batch_size])
            logits = model(**{k: v.to(device) for k, v in batch.items()}, logits_to_keep=1).logits[:, -1]
            out.append(logits[:, self.answer_ids].float().cpu())
        return torch.cat(out)

    def __call__(self, prompts: list[str], images: list[Any], **columns: Any) -> list[float | None]:
        """P(positive answer) of each sample, in [0, 1]: `list[float]` of length N (`columns` are ignored)."""
        return self.answer_logits(prompts, images).softmax(-1)[:, 0].tolist()
