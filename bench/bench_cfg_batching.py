"""Classifier-free guidance in one batched transformer call against two calls (conditional, unconditional): time
per denoising step when sampling and per trained step (forward + backward of one recorded transition) in GRPO
training, side by side, for one or more built-in families at a small size.

Both paths are exact for GRPO (a sampler and a trainer that use the same path compute bit-identical velocities, so
the on-policy ratio is 1); they differ from each other by float rounding only. Batching pays off when one call of
`B` rows does not saturate the device (small micro-batches, GPUs); on a CPU that is already saturated it can be
a wash.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_cfg_batching.py [--families ovis-image sd3.5] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlhf_image.policy import FlowPolicy  # noqa: E402
from rlhf_image.sampling import generate, transition_log_prob  # noqa: E402


def build(family: str, device: str) -> FlowPolicy:
    """A family at a benchmark size: wider than the test configurations, still small enough for a CPU."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from rlhf_image.recipes.ovis_image.model import ovis_image_tiny

    if family == "ovis-image":
        pipe = ovis_image_tiny(hidden_size=256, num_heads=4, num_layers=2, num_single_layers=4,
                               axes_dims_rope=(8, 28, 28))
        return FlowPolicy.from_pipeline(pipe, max_sequence_length=32).to(device)
    if family == "sd3.5":
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
        from tiny_models import tiny_sd3_pipeline

        small = tiny_sd3_pipeline(version="3.5")
        transformer = SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=6, attention_head_dim=64,
            num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=256, pooled_projection_dim=32,
            pos_embed_max_size=32, dual_attention_layers=(0, 1), qk_norm="rms_norm")
        pipe = StableDiffusion3Pipeline(**{**small.components, "transformer": transformer})
        return FlowPolicy.from_pipeline(pipe, max_sequence_length=16).to(device)
    raise ValueError(f"unknown family {family!r}")


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def sampling_seconds(policy: FlowPolicy, args) -> float:
    """Seconds per denoising step of one `generate` call with CFG, micro-batch `args.batch`."""
    prompts = [f"a sign that says {i}" for i in range(args.batch)]
    synchronize(args.device)
    start = time.perf_counter()
    generate(policy, prompts, list(range(args.batch)), height=args.size, width=args.size, num_steps=args.steps,
             guidance_scale=4.5, micro_batch_size=args.batch, decode=False)
    synchronize(args.device)
    return (time.perf_counter() - start) / args.steps


def training_seconds(policy: FlowPolicy, args, trajectory, j: int) -> float:
    """Seconds of one trained transition: CFG forward of the recorded step's log-prob and its backward."""
    synchronize(args.device)
    start = time.perf_counter()
    log_prob, _, _ = transition_log_prob(policy, trajectory, j % args.steps)
    log_prob.mean().backward()
    synchronize(args.device)
    seconds = time.perf_counter() - start
    policy.transformer.zero_grad(set_to_none=True)
    return seconds


def rollout(policy: FlowPolicy, args):
    prompts = [f"a sign that says {i}" for i in range(args.batch)]
    trajectory = generate(policy, prompts, list(range(args.batch)), height=args.size, width=args.size,
                          num_steps=args.steps, sde_type="sde", guidance_scale=4.5, micro_batch_size=args.batch,
                          decode=False)
    with torch.no_grad():  # sampled and trained through the same path: exactly on-policy
        log_prob, _, _ = transition_log_prob(policy, trajectory, 0)
    assert torch.equal(log_prob, trajectory.log_probs[:, 0]), "the CFG path must be bit-identical on-policy"
    return trajectory


def measure(policy: FlowPolicy, args) -> dict[str, dict[bool, float]]:
    """Median seconds per phase and mode. The two modes alternate within each repeat, so that a machine shared
    with other work slows both alike."""
    trajectories = {}
    for batched in (False, True):
        policy.batched_cfg = batched
        trajectories[batched] = rollout(policy, args)
    times = {"sampling / step": {False: [], True: []}, "training / step": {False: [], True: []}}
    for repeat in range(args.warmup + args.repeats):
        for batched in ((False, True) if repeat % 2 else (True, False)):
            policy.batched_cfg = batched
            sample = sampling_seconds(policy, args)
            train = training_seconds(policy, args, trajectories[batched], repeat)
            if repeat >= args.warmup:
                times["sampling / step"][batched].append(sample)
                times["training / step"][batched].append(train)
    return {phase: {mode: statistics.median(values) for mode, values in by_mode.items()}
            for phase, by_mode in times.items()}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--families", nargs="+", default=["ovis-image", "sd3.5"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=2, help="micro-batch (rows per call without CFG)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for family in args.families:
        for phase, seconds in measure(build(family, args.device), args).items():
            rows.append({"family": family, "phase": phase, "two_calls": seconds[False], "batched": seconds[True]})
    print(f"\nCFG batching on {args.device}, micro-batch {args.batch}, {args.size}x{args.size} px, "
          f"{args.steps} steps, median of {args.repeats}")
    print("| family | phase | two calls (ms) | one batched call (ms) | speed-up (two / batched) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['family']} | {row['phase']} | {row['two_calls'] * 1e3:.1f} | {row['batched'] * 1e3:.1f} | "
              f"{row['two_calls'] / row['batched']:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
