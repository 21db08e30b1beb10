"""Preference-pair data for [`~rlhf_image.DPOTrainer`]: reading a pair folder, and collation.

A pair row is a mapping with `prompt` (`str`), `chosen` and `rejected`, each an image source (a path, a PIL image,
an array, encoded bytes or a `{"bytes": ..., "path": ...}` dict, see [`~rlhf_image.data.load_image`]) or
precomputed latents (`torch.Tensor` of shape `[C, h, w]`, VAE space as the transformer sees them). Optional
`prompt_embeds` (`[L, D]`) and `pooled_prompt_embeds` (`[P]`) replace text encoding. A pair folder (written by
[`~rlhf_image.pair_builder.build_preference_pairs`]) is `manifest.jsonl` plus the images it names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

MANIFEST_NAME = "manifest.jsonl"
PAIR_KEYS = ("prompt", "chosen", "rejected")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL file; a last line cut short by an interruption is ignored."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f.read().split("\n") if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # a partial last line from a crash mid-write
            raise
    return rows


class PreferencePairDataset(torch.utils.data.Dataset):
    """The pairs of a folder written by [`~rlhf_image.pair_builder.build_preference_pairs`].

    Each item is `{"id", "prompt", "chosen", "rejected", **columns}` with absolute image paths; `columns` are the
    extra prompt columns the builder recorded (for example `target_text`).

    Args:
        root (`str` or `os.PathLike`): the folder holding `manifest.jsonl`.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        manifest = self.root / MANIFEST_NAME
        if not manifest.is_file():
            raise FileNotFoundError(f"no {MANIFEST_NAME} in {self.root}: pass a folder written by build_preference_pairs")
        self.rows = read_jsonl(manifest)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        return {"id": row["id"], "prompt": row["prompt"], "chosen": str(self.root / row["chosen"]),
                "rejected": str(self.root / row["rejected"]), **row.get("columns", {})}


def collate_pairs(rows: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch pair rows: lists for `prompt`, `chosen` and `rejected` (image sources or latents), and stacked
    tensors for `prompt_embeds` / `pooled_prompt_embeds` when the rows carry them."""
    missing = [key for key in PAIR_KEYS if key not in rows[0]]
    if missing:
        raise KeyError(f"pair rows need the columns {PAIR_KEYS}, missing {missing} (got {sorted(rows[0])}); "
                       "rename your columns, for example with datasets' `rename_column`")
    batch: dict[str, Any] = {key: [row[key] for row in rows] for key in PAIR_KEYS}
    for key in ("prompt_embeds", "pooled_prompt_embeds"):
        if rows[0].get(key) is not None:
            batch[key] = torch.stack([torch.as_tensor(row[key]) for row in rows])
    return batch
