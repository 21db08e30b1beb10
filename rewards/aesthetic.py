"""LAION aesthetic predictor v2: an MLP over the L2-normalised CLIP ViT-L/14 image embedding."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .clip_utils import image_embeddings, load_clip


class AestheticMLP(nn.Module):
    """The `improved-aesthetic-predictor` head: `input_dim`-1024-128-64-16-1.

    The layer indices match the original (`layers.0`, `layers.2`, `layers.4`, `layers.6`,
    `layers.7`), so its `.pth` state dict loads as is. Dropout is inactive in eval mode.

    Args:
        input_dim (`int`, defaults to 768): the CLIP projection dim (768 for ViT-L/14).
    """

    def __init__(self, input_dim: int = 768):
        super().__init__()
        self.input_dim = input_dim
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """`embeds` `[N, input_dim]` (normalised) -> scores `[N, 1]`."""
        return self.layers(embeds)


def load_mlp_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read MLP weights from `.safetensors` or a torch `.pth`/`.pt`/`.bin` (loaded with `weights_only=True`).

    A `{"state_dict": ...}` wrapper and a prefix before `layers.` (e.g. `model.`) are removed.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return {key[key.index("layers."):] if "layers." in key else key: value for key, value in state.items()}


class AestheticReward:
    """LAION aesthetic score (about 1-10 for the original weights) of each image; prompts are ignored.

    `score = MLP(e / ||e||)`, `e = CLIPModel.get_image_features(pixels)`. The MLP input dim is taken
    from the CLIP projection dim, so any CLIP (a tiny test one included) works with a matching MLP.

    Args:
        mlp: MLP weights: a path (`.safetensors` or the original `.pth`), a state dict, or an `AestheticMLP`.
        clip_model (defaults to `"openai/clip-vit-large-patch14"`): a `CLIPModel` or a path / Hub id.
        processor: the image processor (a path / Hub id / object); defaults to `clip_model`'s path.
        device (`str`, defaults to `"cpu"`), dtype (defaults to float32): for CLIP; the MLP runs in float32.
        batch_size (`int`, defaults to 16): images per CLIP forward.
        name (`str`, defaults to `"aesthetic"`).

    Example:
        >>> reward = AestheticReward("sac+logos+ava1-l14-linearMSE.pth")
        >>> reward(prompts, images)  # list of floats
    """

    def __init__(self, mlp: Any, clip_model: Any = "openai/clip-vit-large-patch14", processor: Any = None, *,
                 device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None, batch_size: int = 16,
                 name: str = "aesthetic"):
        self.name = name
        self.batch_size = batch_size
        self.model, self.image_processor, _ = load_clip(clip_model, processor, need_tokenizer=False,
                                                        device=device, dtype=dtype)
        dim = self.model.config.projection_dim
        if isinstance(mlp, AestheticMLP):
            head = mlp
        else:
            state = load_mlp_state_dict(mlp) if isinstance(mlp, (str, os.PathLike)) else mlp
            head = AestheticMLP(state["layers.0.weight"].shape[1])
            head.load_state_dict(state)
        if head.input_dim != dim:
            raise ValueError(f"the MLP takes {head.input_dim}-dim embeddings but the CLIP projection dim is {dim}")
        self.mlp = head.to(device=next(self.model.parameters()).device, dtype=torch.float32).eval()

    @torch.no_grad()
    def score_images(self, images: Sequence[Any]) -> torch.Tensor:
        """Aesthetic scores, `torch.Tensor` of shape `[N]`, float32."""
        embeds = image_embeddings(self.model, self.image_processor, images, self.batch_size)
        return self.mlp(embeds).squeeze(-1)

    def __call__(self, prompts: list[str], images: list[Any], **columns: Any) -> list[float | None]:
        """Score a batch: `list[float]` of length N (`prompts` and `columns` are unused)."""
        return self.score_images(images).cpu().tolist()
