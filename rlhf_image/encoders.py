"""The frozen encoders of a trainer that trains on images (the VAE and the text encoders), with their caches,
and classifier-free-guidance dropout of prompts.

Every encoder call runs on chunks padded to exactly `batch_size` rows (the last row repeated), so an item's
encoding never depends on its batch companions: a cached value equals a recomputed one, bit for bit, and a run's
numbers do not depend on how its batches were cut.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .data import image_key, load_image
from .encode_cache import EncodeCache, fingerprint
from .policy import Conditioning, FlowPolicy, pil_to_tensor


def cfg_dropout(prompts: Sequence[str], probability: float, negative_prompt: str,
                generator: torch.Generator) -> tuple[list[str], list[bool]]:
    """Classifier-free-guidance dropout: each prompt replaced by `negative_prompt` (the unconditional prompt the
    sampler uses for CFG) with `probability`. Returns the prompts to encode and which were dropped.

    Always draws `len(prompts)` uniforms from `generator` (also when `probability` is 0), so the dropout
    probability never shifts the draws that follow.
    """
    dropped = (torch.rand(len(prompts), generator=generator) < probability).tolist()
    return [negative_prompt if drop else prompt for drop, prompt in zip(dropped, prompts)], dropped


class FrozenEncoders:
    """The VAE and text encoders of `policy`, called on padded chunks of `batch_size` rows, optionally cached
    ([`~rlhf_image.encode_cache.EncodeCache`], keyed by prompt / by image).

    Args:
        policy ([`FlowPolicy`]).
        batch_size (`int`): rows per encoder call.
        cache_latents, cache_text (`bool`, defaults to `False`): cache the VAE latents / the text conditioning.
        cache_dir (`str`, *optional*): keep the caches on disk there (else in memory).
    """

    def __init__(self, policy: FlowPolicy, batch_size: int, cache_latents: bool = False, cache_text: bool = False,
                 cache_dir: str | None = None):
        self.policy, self.batch_size = policy, batch_size
        self.latent_cache = self.text_cache = None
        if cache_text:
            probe = policy.encode_prompt(["rlhf-image text cache probe"]).tensors()
            self.text_cache = EncodeCache("text", fingerprint(type(policy).__name__, *probe, *probe.values()),
                                          cache_dir)
        if cache_latents:
            unit = 2 * policy.pixel_unit
            probe = torch.linspace(0, 1, 3 * unit * unit).reshape(1, 3, unit, unit)
            self.latent_cache = EncodeCache("latents", fingerprint(policy.encode_images(probe)), cache_dir)

    def _chunks(self, num_rows: int) -> Iterator[tuple[list[int], list[int]]]:
        """`(rows, padded)`: the rows `0..num_rows-1` in chunks, each padded to `batch_size` with its last row."""
        for start in range(0, num_rows, self.batch_size):
            rows = list(range(start, min(start + self.batch_size, num_rows)))
            yield rows, rows + [rows[-1]] * (self.batch_size - len(rows))

    def conditioning(self, prompts: Sequence[str], also_cache: Sequence[str] = ()) -> Conditioning:
        """The text conditioning of `prompts` (batch `B`; its tensors are the family's, see `Conditioning`).

        Args:
            prompts (`list[str]`): the prompts to encode.
            also_cache (`list[str]`, *optional*): with a text cache, prompts to encode and cache as well (a trainer
                passes the prompts before CFG dropout, so no prompt first needed in a later epoch misses the cache).
        """
        if self.text_cache is None:
            parts = [self.policy.encode_prompt([prompts[i] for i in padded]).select(slice(0, len(rows)))
                     for rows, padded in self._chunks(len(prompts))]
            return Conditioning.cat(parts)
        unique = list(dict.fromkeys([*also_cache, *prompts]))
        entries = {text: self.text_cache.get(text) for text in unique}
        missing = [text for text in unique if entries[text] is None]
        for rows, padded in self._chunks(len(missing)):
            cond = self.policy.encode_prompt([missing[i] for i in padded])
            for j, i in enumerate(rows):
                entry = cond.row(j)
                self.text_cache.put(missing[i], entry)
                entries[missing[i]] = entry
        return Conditioning.stack([entries[p] for p in prompts]).to(self.policy.device)

    def latents(self, num_rows: int, pixels: Callable[[list[int]], torch.Tensor],
                keys: Sequence[str] | None = None) -> torch.Tensor:
        """Clean latents `[num_rows, C, h, w]` (float32, on the policy's device; the VAE's mode, deterministic).

        Args:
            num_rows (`int`): rows `0..num_rows-1`.
            pixels (`Callable`): `pixels(rows)` gives the images of `rows` as `[len(rows), 3, H, W]` in [0, 1]; called
                only for rows the cache does not hold.
            keys (`list[str]`, *optional*): the cache key of each row (required with a latent cache).
        """
        out: list[torch.Tensor | None] = [None] * num_rows
        if self.latent_cache is not None:
            if keys is None:
                raise ValueError("a latent cache needs a key per row")
            for i in range(num_rows):
                entry = self.latent_cache.get(keys[i])
                out[i] = None if entry is None else entry["latents"].to(self.policy.device)
        missing = [i for i, value in enumerate(out) if value is None]
        for rows, padded in self._chunks(len(missing)):
            encoded = self.policy.encode_images(pixels([missing[r] for r in padded]))
            for j, r in enumerate(rows):
                out[missing[r]] = encoded[j]
                if self.latent_cache is not None:
                    self.latent_cache.put(keys[missing[r]], {"latents": encoded[j]})
        return torch.stack(out)

    def source_latents(self, sources: Sequence[Any], size: tuple[int, int]) -> torch.Tensor:
        """Latents `[B, C, h, w]` of image sources: paths, PIL images, arrays, encoded bytes or
        `{"bytes"|"path"}` dicts (resized to cover `size = (height, width)` and center-cropped, see
        [`~rlhf_image.data.load_image`]), or precomputed latents (`torch.Tensor` `[C, h, w]`, used as given). A
        batch is all latents or all images."""
        if all(isinstance(s, torch.Tensor) for s in sources):
            return torch.stack([s.float() for s in sources]).to(self.policy.device)
        if any(isinstance(s, torch.Tensor) for s in sources):
            raise TypeError("a batch mixes precomputed latents and images: give every row the same kind")
        keys = None
        if self.latent_cache is not None:
            keys = [f"{image_key(s)}@{size[0]}x{size[1]}" for s in sources]
        return self.latents(len(sources), lambda rows: pil_to_tensor([load_image(sources[r], size) for r in rows]),
                            keys)
