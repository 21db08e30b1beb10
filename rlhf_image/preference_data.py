"""Preference-pair data for [`~rlhf_image.DPOTrainer`]: reading a pair folder, image loading, collation, and
the frozen encoders with their caches ([`PairEncoder`]).

A pair row is a mapping with `prompt` (`str`), `chosen` and `rejected`, each an image path, a PIL image, a
`{"bytes": ..., "path": ...}` dict (a `datasets.Image(decode=False)` value) or precomputed latents
(`torch.Tensor` of shape `[C, h, w]`, VAE space as the transformer sees them). Optional `prompt_embeds`
(`[L, D]`) and `pooled_prompt_embeds` (`[P]`) replace text encoding. A pair folder (written by
[`~rlhf_image.pair_builder.build_preference_pairs`]) is `manifest.jsonl` plus the images it names.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from .data import open_image, resize_to_bucket
from .encode_cache import EncodeCache, fingerprint
from .policy import Conditioning, FlowPolicy

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


def load_image(source: Any, size: tuple[int, int] | None = None) -> PIL.Image.Image:
    """An RGB PIL image from a path, PIL image, encoded bytes or `{"bytes"|"path"}` dict, resized to cover
    `size = (height, width)` and center-cropped to it when `size` is given."""
    if isinstance(source, PIL.Image.Image):
        image = source.convert("RGB")
    elif isinstance(source, (str, os.PathLike, bytes)):
        image = open_image(os.fspath(source) if isinstance(source, os.PathLike) else source)
    elif isinstance(source, Mapping) and (source.get("bytes") or source.get("path")):
        image = open_image(source.get("bytes") or os.fspath(source["path"]))
    else:
        raise TypeError(f"cannot read an image from {type(source).__name__}; pass a path, a PIL image, encoded "
                        "bytes, a {'bytes': ...} dict or latents")
    return image if size is None else resize_to_bucket(image, size)


def image_key(source: Any) -> str:
    """A stable cache key of an image source: the path with its size and modification time, or a hash of
    the pixels / bytes."""
    if isinstance(source, Mapping):
        source = source.get("bytes") or source["path"]
    if isinstance(source, (str, os.PathLike)):
        stat = os.stat(source)
        return f"path:{os.path.abspath(source)}:{stat.st_size}:{stat.st_mtime_ns}"
    if isinstance(source, bytes):
        return "bytes:" + hashlib.sha256(source).hexdigest()
    if isinstance(source, PIL.Image.Image):
        return f"pil:{source.mode}:{source.size}:" + hashlib.sha256(source.tobytes()).hexdigest()
    raise TypeError(f"cannot key an image source of type {type(source).__name__}")


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


class PairEncoder:
    """The frozen encoders of a DPO run: image sources to latents and prompts to conditioning, each call on
    chunks padded to exactly `batch_size` rows (an item's encoding never depends on its batch companions),
    optionally through [`~rlhf_image.encode_cache.EncodeCache`]s.

    Args:
        policy ([`FlowPolicy`]).
        size (`tuple[int, int]`): images are resized and center-cropped to `(height, width)` pixels.
        batch_size (`int`): rows per VAE / text-encoder call.
        cache_latents, cache_text (`bool`, defaults to `False`): cache the VAE latents (keyed by
            [`image_key`] and size) / the text conditioning (keyed by prompt).
        cache_dir (`str`, *optional*): keep the caches on disk there.
    """

    def __init__(self, policy: FlowPolicy, size: tuple[int, int], batch_size: int, cache_latents: bool = False,
                 cache_text: bool = False, cache_dir: str | None = None):
        self.policy, self.size, self.batch_size = policy, tuple(size), batch_size
        self.latent_cache = self.text_cache = None
        if cache_text:
            probe = policy.encode_prompt(["rlhf-image text cache probe"])
            probe_tensors = probe.tensors()
            self.text_cache = EncodeCache("text", fingerprint(type(policy).__name__, *probe_tensors,
                                                              *probe_tensors.values()), cache_dir)
        if cache_latents:
            unit = 2 * policy.vae_scale_factor * policy.latent_patch
            probe = torch.linspace(0, 1, 3 * unit * unit).reshape(1, 3, unit, unit)
            self.latent_cache = EncodeCache("latents", fingerprint(policy.encode_images(probe)), cache_dir)

    def _chunks(self, num_rows: int):
        for start in range(0, num_rows, self.batch_size):
            rows = list(range(start, min(start + self.batch_size, num_rows)))
            yield rows, rows + [rows[-1]] * (self.batch_size - len(rows))

    def latents(self, sources: Sequence[Any]) -> torch.Tensor:
        """Latents `[B, C, h, w]` (float32, on the policy's device); tensors in `sources` are taken as latents."""
        device = self.policy.device
        if all(isinstance(s, torch.Tensor) for s in sources):
            return torch.stack([s.float() for s in sources]).to(device)
        if any(isinstance(s, torch.Tensor) for s in sources):
            raise TypeError("a batch mixes precomputed latents and images: give every row the same kind")
        out: list[torch.Tensor | None] = [None] * len(sources)
        keys = [None] * len(sources)
        if self.latent_cache is not None:
            keys = [f"{image_key(s)}@{self.size[0]}x{self.size[1]}" for s in sources]
            for i, key in enumerate(keys):
                entry = self.latent_cache.get(key)
                out[i] = None if entry is None else entry["latents"].to(device)
        missing = [i for i, value in enumerate(out) if value is None]
        for rows, padded in self._chunks(len(missing)):
            images = [load_image(sources[missing[r]], self.size) for r in padded]
            encoded = self.policy.encode_images(images)
            for j, r in enumerate(rows):
                out[missing[r]] = encoded[j]
                if self.latent_cache is not None:
                    self.latent_cache.put(keys[missing[r]], {"latents": encoded[j]})
        return torch.stack(out)

    def conditioning(self, prompts: Sequence[str]) -> Conditioning:
        """The text conditioning of `prompts` (batch `B`)."""
        if self.text_cache is None:
            parts = [self.policy.encode_prompt([prompts[i] for i in padded]).select(slice(0, len(rows)))
                     for rows, padded in self._chunks(len(prompts))]
            return Conditioning.cat(parts)
        unique = list(dict.fromkeys(prompts))
        entries = {text: self.text_cache.get(text) for text in unique}
        missing = [text for text in unique if entries[text] is None]
        for rows, padded in self._chunks(len(missing)):
            cond = self.policy.encode_prompt([missing[i] for i in padded])
            for j, i in enumerate(rows):
                entry = cond.row(j)
                self.text_cache.put(missing[i], entry)
                entries[missing[i]] = entry
        return Conditioning.stack([entries[p] for p in prompts]).to(self.policy.device)

    def batch_conditioning(self, batch: Mapping[str, Any]) -> Conditioning:
        """The conditioning of a collated batch: its precomputed embeddings if present, else encoded."""
        if "prompt_embeds" in batch:
            pooled = batch.get("pooled_prompt_embeds")
            device = self.policy.device
            return Conditioning(batch["prompt_embeds"].to(device), None if pooled is None else pooled.to(device))
        return self.conditioning(list(batch["prompt"]))
