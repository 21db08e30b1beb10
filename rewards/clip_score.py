"""Prompt-image agreement rewards through transformers' CLIP classes: CLIPScore and PickScore.

Both embed the image and the prompt, L2-normalise, and take the cosine `c = <img, txt>`:
- `CLIPScore`: `scale * max(c, 0)` with `scale = 100` (the torchmetrics convention, range [0, 100]).
  The CLIPScore paper's CLIP-S is `2.5 * max(c, 0)`: pass `scale=2.5` for that.
- `PickScore`: `exp(logit_scale) * c`, the logit the PickScore model was trained with (about 100 * c).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from .clip_utils import image_embeddings, load_clip, text_embeddings


class _CLIPPairReward(ABC):
    """Loads a CLIP once and computes the cosine between each image and its prompt."""

    def __init__(self, model: Any, processor: Any, *, device: str | torch.device, dtype: Any, batch_size: int,
                 name: str):
        self.name = name
        self.batch_size = batch_size
        self.model, self.image_processor, self.tokenizer = load_clip(model, processor, need_tokenizer=True,
                                                                     device=device, dtype=dtype)

    @torch.no_grad()
    def cosine(self, prompts: Sequence[str], images: Sequence[Any]) -> torch.Tensor:
        """`cos(img_i, txt_i)`, `torch.Tensor` of shape `[N]`, float32.

        Each distinct prompt is embedded once (a GRPO batch repeats every prompt group-size times).
        """
        if len(prompts) != len(images):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} images")
        position = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        text = text_embeddings(self.model, self.tokenizer, list(position), batch_size=max(self.batch_size, 1))
        index = torch.tensor([position[p] for p in prompts], dtype=torch.long, device=text.device)
        image = image_embeddings(self.model, self.image_processor, images, self.batch_size)
        return (image * text[index]).sum(-1)

    @abstractmethod
    def score(self, prompts: Sequence[str], images: Sequence[Any]) -> torch.Tensor:
        """Per-sample scores, `torch.Tensor` of shape `[N]`."""

    def __call__(self, prompts: list[str], images: list[Any], **columns: Any) -> list[float | None]:
        """Score a batch: `list[float]` of length N (extra `columns` are ignored)."""
        return self.score(prompts, images).cpu().tolist()


class CLIPScore(_CLIPPairReward):
    """`scale * max(cos(img, prompt), 0)` with a CLIP model (see the module docstring).

    Args:
        model (defaults to `"openai/clip-vit-large-patch14"`): a `CLIPModel` or a path / Hub id.
        processor: a `CLIPProcessor` or a path / Hub id; defaults to `model`'s path.
        scale (`float`, defaults to 100.0): 100 as in torchmetrics; 2.5 gives the paper's CLIP-S.
        device (`str`, defaults to `"cpu"`), dtype (defaults to float32), batch_size (`int`, defaults to 16).
        name (`str`, defaults to `"clip_score"`).
    """

    def __init__(self, model: Any = "openai/clip-vit-large-patch14", processor: Any = None, *, scale: float = 100.0,
                 device: str | torch.device = "cpu", dtype: Any = None, batch_size: int = 16,
                 name: str = "clip_score"):
        super().__init__(model, processor, device=device, dtype=dtype, batch_size=batch_size, name=name)
        self.scale = scale

    def score(self, prompts: Sequence[str], images: Sequence[Any]) -> torch.Tensor:
        """`torch.Tensor` of shape `[N]`, float32, in `[0, scale]`."""
        return self.scale * self.cosine(prompts, images).clamp(min=0)


class PickScore(_CLIPPairReward):
    """PickScore: `exp(logit_scale) * cos(img, prompt)` with the PickScore CLIP-H fine-tune.

    Args:
        model (defaults to `"yuvalkirstain/PickScore_v1"`): a `CLIPModel` or a path / Hub id.
        processor (defaults to `"laion/CLIP-ViT-H-14-laion2B-s32B-b79K"`): a `CLIPProcessor` or a path / Hub id.
        device (`str`, defaults to `"cpu"`), dtype (defaults to float32), batch_size (`int`, defaults to 16).
        name (`str`, defaults to `"pickscore"`).
    """

    def __init__(self, model: Any = "yuvalkirstain/PickScore_v1",
                 processor: Any = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", *, device: str | torch.device = "cpu",
                 dtype: Any = None, batch_size: int = 16, name: str = "pickscore"):
        super().__init__(model, processor, device=device, dtype=dtype, batch_size=batch_size, name=name)

    def score(self, prompts: Sequence[str], images: Sequence[Any]) -> torch.Tensor:
        """`torch.Tensor` of shape `[N]`, float32."""
        return self.model.logit_scale.exp().float() * self.cosine(prompts, images)
