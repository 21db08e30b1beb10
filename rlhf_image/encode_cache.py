"""A cache for the outputs of frozen encoders (text embeddings, VAE latents), in memory or on disk.

Entries live under a fingerprint of the encoder (a hash of its output on a fixed probe input), so a
changed text encoder, tokenizer, prompt template or VAE starts a fresh cache instead of reusing stale
entries. Tensors are stored bit-exactly (safetensors on disk), so a cached value equals a recomputed one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import safetensors.torch
import torch


def fingerprint(*parts: torch.Tensor | str | int | float | None) -> str:
    """A short hex digest of tensors (shape, dtype and exact bits) and plain values."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            tensor = part.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{tuple(part.shape)}{part.dtype}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(part).encode())
    return digest.hexdigest()[:16]


class EncodeCache:
    """Tensors by string key. In memory by default; under `cache_dir/<name>-<fingerprint>/` as one
    safetensors file per key when `cache_dir` is given (shared by processes: writes are atomic renames).

    Args:
        name (`str`): what is cached (`"text"`, `"latents"`), part of the folder name.
        fingerprint (`str`): digest of the encoder that produced the entries.
        cache_dir (`str`, *optional*): on-disk location; memory only when `None`.
    """

    def __init__(self, name: str, fingerprint: str, cache_dir: str | None = None):
        self.name, self.fingerprint = name, fingerprint
        self.folder = None if cache_dir is None else os.path.join(cache_dir, f"{name}-{fingerprint}")
        if self.folder is not None:
            os.makedirs(self.folder, exist_ok=True)
        self.memory: dict[str, dict[str, torch.Tensor]] = {}
        self.num_hits = self.num_misses = 0

    def _path(self, key: str) -> str:
        digest = hashlib.sha1(key.encode("utf-8")).hexdigest()
        return os.path.join(self.folder, digest[:2], digest + ".safetensors")

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        if self.folder is None:
            value = self.memory.get(key)
        else:
            path = self._path(key)
            value = safetensors.torch.load_file(path) if os.path.isfile(path) else None
        if value is None:
            self.num_misses += 1
        else:
            self.num_hits += 1
        return value

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        if self.folder is None:
            self.memory[key] = tensors
            return
        path = self._path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        os.close(handle)
        safetensors.torch.save_file(tensors, tmp, metadata={"key": key})
        os.replace(tmp, path)
