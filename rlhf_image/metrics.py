"""Measuring a trainer: FLOPs of the transformer, peak FLOP/s, model FLOPs utilisation (MFU), phase timers,
metric aggregation and sample tables.

MFU follows nanoGPT's `estimate_mfu`: model FLOPs (not hardware FLOPs: no recomputation counted) divided by
elapsed time and the device's peak. The FLOPs of one transformer call are counted exactly once per shape
with `torch.utils.flop_counter.FlopCounterMode` on a copy of the model built on the meta device (no memory,
no compute), attention included; a training step costs 3x a forward (forward + backward).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import PIL.Image
import torch
from torch.utils.flop_counter import FlopCounterMode

from .model_io import base_transformer
from .policy import Conditioning, FlowPolicy

_FLOPS_CACHE: dict[tuple, int] = {}
_PEAK_CACHE: dict[tuple[str, torch.dtype], float] = {}


def forward_flops(policy: FlowPolicy, cond: Conditioning, height: int, width: int, batch_size: int) -> int:
    """FLOPs of one `policy.predict_velocity` call without CFG on `batch_size` rows at `height x width` pixels.

    Counted on a meta-device copy of the base transformer (LoRA layers are not counted: they add about
    `rank / hidden_size` of the cost); for a transformer that cannot run on the meta device, on one real row times
    `batch_size`. Cached per architecture and shape.

    Args:
        policy ([`FlowPolicy`]).
        cond ([`Conditioning`]): conditioning of the run; only its shapes are used.
        height, width (`int`): image size in pixels.
        batch_size (`int`): rows per transformer call.
    """
    base = base_transformer(policy.transformer)
    shapes = tuple(sorted(cond.layout().items()))
    key = (type(base).__name__, json.dumps(dict(base.config), sort_keys=True, default=str), shapes, height, width,
           batch_size, type(policy).__name__)
    if key not in _FLOPS_CACHE:
        with torch.device("meta"):
            meta_transformer = type(base).from_config(base.config)
        meta_policy = copy.copy(policy)
        meta_policy.transformer = meta_transformer
        latent_h, latent_w = policy.latent_size(height, width)
        latents = torch.empty(batch_size, policy.num_latent_channels, latent_h, latent_w, device="meta")
        # Text states on the meta device; masks and ids keep their values (some adapters slice by them).
        meta_cond = Conditioning.from_tensors({
            name: value.to("meta") if value.is_floating_point() else value.cpu()
            for name, value in cond.select([0] * batch_size).tensors().items()})
        counter = FlopCounterMode(display=False)
        try:
            with counter, torch.no_grad():
                meta_policy.predict_velocity(latents, torch.tensor(0.5), meta_cond)
            _FLOPS_CACHE[key] = int(counter.get_total_flops())
        except (NotImplementedError, RuntimeError):
            # Transformers that read values of their inputs (a mask's lengths) cannot run on the meta device: count
            # one real row instead (the cost is linear in the rows).
            real = torch.zeros(1, policy.num_latent_channels, latent_h, latent_w, device=policy.device)
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                policy.predict_velocity(real, torch.tensor(0.5), cond.select([0]).to(policy.device))
            _FLOPS_CACHE[key] = int(counter.get_total_flops()) * batch_size
    return _FLOPS_CACHE[key]


def measure_peak_flops(device: torch.device | str, dtype: torch.dtype, size: int | None = None) -> float:
    """Achievable matmul FLOP/s of `device` in `dtype`: the best of several timed `size x size` matmuls.
    Measured once per (device, dtype) and cached."""
    device = torch.device(device)
    key = (str(device), dtype)
    if key not in _PEAK_CACHE:
        size = size or (8192 if device.type == "cuda" else 1024)
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        best = math.inf
        for _ in range(6):
            synchronize(device)
            start = time.perf_counter()
            torch.mm(a, b)
            synchronize(device)
            best = min(best, time.perf_counter() - start)
        _PEAK_CACHE[key] = 2 * size**3 / best
    return _PEAK_CACHE[key]


def mfu(flops: float, seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: `flops / (seconds * peak_flops)` (0 when no time elapsed)."""
    return flops / (seconds * peak_flops) if seconds > 0 else 0.0


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so wall-clock timers measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Accumulates wall-clock seconds per named phase (synchronising the device at both ends)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.seconds[name] += time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds

    def pop(self) -> dict[str, float]:
        """The accumulated seconds, then reset."""
        out = dict(self.seconds)
        self.seconds.clear()
        return out


def reduce_metrics(values: dict[str, list[float]]) -> dict[str, float]:
    """Reduce lists of per-micro-step values for logging: keys ending in `/min` take the minimum, `/max` the
    maximum, `_total` the last value (running counters), others the mean. NaN entries are ignored."""
    out = {}
    for key, items in values.items():
        finite = [float(v) for v in items if not math.isnan(float(v))]
        if not finite:
            out[key] = math.nan
        elif key.endswith("/min"):
            out[key] = min(finite)
        elif key.endswith("/max"):
            out[key] = max(finite)
        elif key.endswith("_total"):
            out[key] = finite[-1]
        else:
            out[key] = sum(finite) / len(finite)
    return out


def image_grid(images: list[PIL.Image.Image], columns: int = 4) -> PIL.Image.Image:
    """Tile images of one size into a grid, row by row."""
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = PIL.Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def save_sample_table(directory: str, step: int, images: list[PIL.Image.Image], rows: list[dict]) -> str:
    """Write `step_{step:06d}.png` (a grid of `images`) and `.json` (one dict per image: prompt, rewards, ...)
    under `directory`; returns the JSON path."""
    os.makedirs(directory, exist_ok=True)
    stem = os.path.join(directory, f"step_{step:06d}")
    image_grid(images).save(stem + ".png")
    with open(stem + ".json", "w") as f:
        json.dump({"step": step, "samples": rows}, f, indent=1)
    return stem + ".json"
