"""Cost of one stochastic step (SDE and CPS, with its log-prob) against the plain, unguarded formula.

The library's steps guard `std == 0` (a deterministic step has log-prob 0). The guard used to run on full-size
tensors (a `where` and a `zeros_like` over every latent element); it now runs on the per-sample result. This
script times, on the same inputs and interleaved: the plain formula without any guard, the previous guarded
formula, and the library's step, in sampling (a new draw) and in training (a given `prev_sample`) mode, and
checks that the library's outputs are bit-identical to the previous formula's.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_sde_step.py                  # CPU, [8, 4096, 64] float32
    .venv/bin/python bench/bench_sde_step.py --device cuda --repeats 200
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlhf_image.sde import cps_step_with_logprob, sde_step_with_logprob  # noqa: E402

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _plain_log_prob(x, mean, std):
    return (-((x - mean) ** 2) / (2 * std**2) - torch.log(std) - HALF_LOG_2PI).mean(dim=tuple(range(1, x.ndim)))


def _guarded_log_prob(x, mean, std):
    """The library's log-prob before the guard moved to the per-sample result."""
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    log_prob = -((x - mean) ** 2) / (2 * safe_std**2) - torch.log(safe_std) - HALF_LOG_2PI
    log_prob = torch.where(std > 0, log_prob, torch.zeros_like(log_prob))
    return log_prob.mean(dim=tuple(range(1, x.ndim)))


def _noise(like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise drawn as the library's step draws it (a seeded generator on the device)."""
    generator = torch.Generator(like.device.type).manual_seed(0)
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=torch.float32)


def _sde(log_prob_fn):
    """The library's SDE step formula (float32 0-dim sigmas, as the library's steps make them)."""
    def step(v, x, sigma, sigma_next, a, prev_sample=None):
        sigma, sigma_next = (torch.tensor(s, dtype=torch.float32, device=x.device) for s in (sigma, sigma_next))
        dt = sigma_next - sigma
        std_t = a * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_next, sigma)))
        mean = x + (v + std_t**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
        std = std_t * torch.sqrt(-dt)
        prev = mean + std * _noise(mean) if prev_sample is None else prev_sample
        return prev, log_prob_fn(prev, mean, std), mean, std
    return step


def _cps(log_prob_fn):
    """The library's CPS step formula."""
    def step(v, x, sigma, sigma_next, a, prev_sample=None):
        sigma, sigma_next = (torch.tensor(s, dtype=torch.float32, device=x.device) for s in (sigma, sigma_next))
        std = sigma_next * math.sin(a * math.pi / 2)
        mean = (1 - sigma_next) * (x - sigma * v) + torch.sqrt(sigma_next**2 - std**2) * (x + (1 - sigma) * v)
        prev = mean + std * _noise(mean) if prev_sample is None else prev_sample
        return prev, log_prob_fn(prev, mean, std), mean, std
    return step


def _library(step_fn):
    def step(v, x, sigma, sigma_next, a, prev_sample=None):
        generator = None if prev_sample is not None else torch.Generator(x.device.type).manual_seed(0)
        return step_fn(v, x, sigma, sigma_next, a, generator=generator, prev_sample=prev_sample)
    return step


def _time(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default="8,4096,64", help="latent shape, comma-separated")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    device = torch.device(args.device)
    shape = tuple(int(s) for s in args.shape.split(","))
    g = torch.Generator().manual_seed(0)
    v, x = (torch.randn(shape, generator=g).to(device) for _ in range(2))
    sigma, sigma_next, a = 0.75, 0.6, 0.7

    variants = {
        "sde": {"plain": _sde(_plain_log_prob), "guarded (before)": _sde(_guarded_log_prob),
                "library": _library(sde_step_with_logprob)},
        "cps": {"plain": _cps(_plain_log_prob), "guarded (before)": _cps(_guarded_log_prob),
                "library": _library(cps_step_with_logprob)},
    }
    threads = torch.get_num_threads()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"{threads} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"latent {list(shape)} float32, best of {args.repeats} interleaved runs (the least disturbed by other load)\n")
    print(f"| step | mode | {' | '.join(f'{name} ms' for name in variants['sde'])} | before / plain "
          f"| library / plain | library / before |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, fns in variants.items():
        # The library's outputs must be bit-identical to the previous formula's.
        prev = fns["guarded (before)"](v, x, sigma, sigma_next, a)[0]
        ref = fns["guarded (before)"](v, x, sigma, sigma_next, a, prev_sample=prev)
        out = fns["library"](v, x, sigma, sigma_next, a, prev_sample=prev)
        assert torch.equal(out[1], ref[1]) and torch.equal(out[2], ref[2]), f"{kind}: not bit-identical"
        for mode in ("sample", "train"):
            kwargs = {} if mode == "sample" else {"prev_sample": prev}
            times = {name: [] for name in fns}
            for _ in range(2):  # warm-up
                for fn in fns.values():
                    fn(v, x, sigma, sigma_next, a, **kwargs)
            for _ in range(args.repeats):
                for name, fn in fns.items():
                    times[name].append(_time(lambda: fn(v, x, sigma, sigma_next, a, **kwargs), device))
            ms = {name: 1e3 * min(t) for name, t in times.items()}
            plain, before, library = ms["plain"], ms["guarded (before)"], ms["library"]
            print(f"| {kind} | {mode} | {plain:.2f} | {before:.2f} | {library:.2f} | {before / plain:.2f} "
                  f"| {library / plain:.2f} | {library / before:.2f} |")
    print("\nsample: draws the noise (seeded generator) and scores the draw; train: scores a given prev_sample. "
          "before = the library's formula with the guard on full-size tensors; plain = no guard at all.")


if __name__ == "__main__":
    main()
