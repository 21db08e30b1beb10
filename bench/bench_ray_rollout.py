"""Ray rollouts: sampling throughput with 1 and 2 workers against in-process sampling, scoring overlap, and
weight-sync time against model size for both transports (Ray object store, torch.distributed broadcast).

Throughput: the same batch (prompts in groups, per-sample seeds) is sampled and scored in-process
(`InProcessRolloutEngine`, as the trainer does by default) and by `RayRolloutEngine` with 1 and 2 workers;
every Ray batch is checked bit-identical to the in-process one. A second table repeats it with a slow,
I/O-bound reward (a sleep per image, as a remote reward server costs) to show scoring hidden behind sampling.

Weight sync: full fine-tuning payloads (every transformer weight, float32) of growing Ovis-Image transformers,
sent to 2 workers until both hold them (max_staleness=0), median of `--repeats` syncs after a warm-up one;
plus a LoRA adapter on the largest model. On a GPU cluster use `--device cuda` for NCCL.

    python bench/bench_ray_rollout.py                 # CPU, local Ray with 2 CPUs
    python bench/bench_ray_rollout.py --sizes 64 256  # fewer sizes
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

for key, value in {"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(key, value)

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peft import LoraConfig, get_peft_model  # noqa: E402

from rlhf_image.recipes.ovis_image.model import ovis_image_tiny  # noqa: E402
from rlhf_image.policy import FlowPolicy  # noqa: E402
from rlhf_image.rollout_engine import InProcessRolloutEngine, RolloutSpec  # noqa: E402
from rlhf_image.rollout import RayRolloutEngine  # noqa: E402
from rlhf_image.rollout.cluster import init_ray  # noqa: E402

PROMPTS = ["a red cat", "a blue dog", "a poster that says HELLO", "a city at night"]
# Transformer sizes for the sync table: hidden size -> (heads, rope axes, double = single blocks).
SIZES = {64: (2, (8, 12, 12), 1), 256: (4, (16, 24, 24), 2), 512: (8, (16, 24, 24), 2), 768: (12, (16, 24, 24), 4)}


def brightness(prompts, images, **columns):
    return [float(np.asarray(image, dtype=np.float32).mean() / 255) for image in images]


class SlowReward:
    """An I/O-bound reward: `seconds` of waiting per image (like a call to a reward server), then brightness."""

    name = "slow_brightness"

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __call__(self, prompts, images, **columns):
        time.sleep(self.seconds * len(images))
        return brightness(prompts, images)


def small_policy() -> FlowPolicy:
    """The 'small' model of bench_grpo_step.py: hidden 128, 2 + 2 blocks."""
    pipe = ovis_image_tiny(hidden_size=128, num_heads=4, num_layers=2, num_single_layers=2,
                           axes_dims_rope=(8, 12, 12), text_hidden_size=64, vae_mid_block_attention=False)
    return FlowPolicy.from_pipeline(pipe, max_sequence_length=32)


def sized_policy(hidden: int) -> FlowPolicy:
    heads, axes, blocks = SIZES[hidden]
    pipe = ovis_image_tiny(hidden_size=hidden, num_heads=heads, axes_dims_rope=axes, num_layers=blocks,
                           num_single_layers=blocks)
    return FlowPolicy.from_pipeline(pipe, max_sequence_length=32)


def timed_rollouts(engine, batch, spec, repeats):
    prompts, seeds = batch
    first = engine.rollout(prompts, seeds, {}, spec, (0, spec.num_steps))  # warm-up (and the first sync)
    times, reward_tail = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        out = engine.rollout(prompts, seeds, {}, spec, (0, spec.num_steps))
        times.append(time.perf_counter() - start)
        reward_tail.append(out.timings["reward"])
    return first, statistics.median(times), statistics.median(reward_tail)


def throughput(args, reward, label):
    spec = RolloutSpec(height=args.resolution, width=args.resolution, num_steps=args.steps, sde_type="sde",
                       noise_level=0.7, guidance_scale=1.0, micro_batch_size=args.micro_batch)
    prompts = [p for p in PROMPTS for _ in range(args.group)] * (args.batch // (len(PROMPTS) * args.group) or 1)
    batch = (prompts, list(range(len(prompts))))
    policy = small_policy()
    name = reward.name if isinstance(reward, SlowReward) else "brightness"
    rows, reference = [], None

    def same_as_reference(out) -> str:
        if reference is None:
            return "reference"
        same = all(torch.equal(getattr(out.trajectory, n), getattr(reference.trajectory, n))
                   for n in ("latents", "log_probs", "images"))
        return str(same and torch.equal(out.per_reward, reference.per_reward))

    for threads in (1, 2):
        torch.set_num_threads(threads)
        engine = InProcessRolloutEngine()
        engine.bind(policy, [reward], [name])
        out, seconds, tail = timed_rollouts(engine, batch, spec, args.repeats)
        rows.append((f"in-process, {threads} thread{'s' * (threads > 1)}", seconds, tail, same_as_reference(out)))
        reference = out if reference is None else reference  # the workers run 1 thread, as this first row
    torch.set_num_threads(1)
    for workers, reward_workers in ((1, 0), (2, 0), (2, 1)):
        engine = RayRolloutEngine(small_policy, num_workers=workers, num_cpus_per_worker=1, worker_threads=1,
                                  num_reward_workers=reward_workers, num_cpus_per_reward_worker=0)
        try:
            engine.bind(policy, [reward], [name])
            out, seconds, tail = timed_rollouts(engine, batch, spec, args.repeats)
        finally:
            engine.close()
        row = f"Ray, {workers} worker{'s' * (workers > 1)}" + (" + reward worker" if reward_workers else "")
        rows.append((row, seconds, tail, same_as_reference(out)))
    n = len(prompts)
    print(f"\n{label}: {n} images of {args.resolution}x{args.resolution}, {args.steps} SDE steps, micro-batch "
          f"{args.micro_batch}, groups of {args.group}; median of {args.repeats}")
    print("(Ray workers run 1 torch thread each; 'reward not hidden' is the scoring left after the last image)")
    print(f"{'engine':<32} {'s/batch':>8} {'images/s':>9} {'vs in-proc 1t':>14} {'reward not hidden s':>20} "
          f"{'bit-identical':>14}")
    base = rows[0][1]
    for row, seconds, tail, same in rows:
        print(f"{row:<32} {seconds:>8.3f} {n / seconds:>9.2f} {base / seconds:>13.2f}x {tail:>20.3f} {same:>14}")


def sync_times(hidden_sizes, args):
    print(f"\nweight sync to 2 workers (full fine-tuning payload, float32), median of {args.repeats} after 1 warm-up;"
          f" chunks of {args.chunk_mib} MiB")
    print(f"{'payload':<22} {'MiB':>8} {'object store s':>15} {'GB/s':>6} {'collective s':>13} {'GB/s':>6} "
          f"{'collective/store':>17}")
    cases = [(h, False) for h in hidden_sizes] + [(hidden_sizes[-1], True)]
    for hidden, lora in cases:
        policy = sized_policy(hidden)
        if lora:
            policy.transformer = get_peft_model(policy.transformer, LoraConfig(
                r=16, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        else:
            policy.transformer.requires_grad_(True)
        nbytes = sum(p.numel() * p.element_size() for p in policy.trainable_parameters())
        results = {}
        for transport in ("object_store", "collective"):
            engine = RayRolloutEngine(functools.partial(sized_policy, hidden), num_workers=2, num_cpus_per_worker=1,
                                      worker_threads=1, weight_transport=transport,
                                      max_chunk_bytes=args.chunk_mib * 2**20)
            try:
                engine.bind(policy, [brightness], ["brightness"])
                engine.sync_weights(policy, 0)  # warm-up: waits for the workers to start, builds the group
                seconds = []
                for version in range(1, args.repeats + 1):
                    with torch.no_grad():  # a changed payload each time, as after an optimizer step
                        for p in policy.trainable_parameters():
                            p.add_(1e-3)
                    engine.sync_weights(policy, version)
                    seconds.append(engine.last_sync_seconds)
            finally:
                engine.close()
            results[transport] = statistics.median(seconds)
        store, coll = results["object_store"], results["collective"]
        name = f"LoRA r=16, h={hidden}" if lora else f"full, h={hidden}"
        mib = nbytes / 2**20
        print(f"{name:<22} {mib:>8.1f} {store:>15.4f} {nbytes / store / 1e9:>6.2f} {coll:>13.4f} "
              f"{nbytes / coll / 1e9:>6.2f} {coll / store:>16.2f}x")
        del policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6, help="denoising steps")
    parser.add_argument("--batch", type=int, default=16, help="images per rollout")
    parser.add_argument("--group", type=int, default=4, help="images per prompt")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slow-reward-ms", type=float, default=40.0, help="per image, for the overlap table")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), choices=list(SIZES),
                        help="transformer hidden sizes for the sync table")
    parser.add_argument("--chunk-mib", type=int, default=64)
    parser.add_argument("--num-cpus", type=float, default=2)
    parser.add_argument("--only", choices=["throughput", "sync"], help="run one part")
    args = parser.parse_args()

    session = init_ray(num_cpus=args.num_cpus)
    try:
        load = os.getloadavg()[0]
        print(f"host: {os.cpu_count()} CPUs (load average {load:.1f} at start), torch {torch.__version__}; "
              f"Ray local instance with {args.num_cpus} CPUs")
        if args.only in (None, "throughput"):
            throughput(args, brightness, "rollout throughput (cheap reward)")
            throughput(args, SlowReward(args.slow_reward_ms / 1000), f"with a slow I/O-bound reward "
                       f"({args.slow_reward_ms:.0f} ms per image, scored per micro-batch as it arrives)")
        if args.only in (None, "sync"):
            sync_times(args.sizes, args)
    finally:
        session.shutdown()


if __name__ == "__main__":
    main()
