"""The CPU demo over several seeds: held-out OCR accuracy per stage (mean, spread) and each stage's time.

    .venv/bin/python bench/bench_demo_seeds.py --seeds 0 1 2 --root outputs/demo_seeds [-- extra demo flags]

Runs `rlhf-image demo --seed S --output_dir ROOT/seed_S` for each seed (a finished seed folder is reused, so
`--seeds` can grow run by run), then reads each run's `eval/<stage>/metrics.json` and `timings.json` and prints:
- per stage and guidance scale, held-out exact match and normalised edit distance: mean, standard deviation over
  seeds, min and max;
- per seed, the gain of each training stage over the one before it (the demo's claim is that every stage adds,
  GRPO over DPO included, on every seed);
- per stage, the wall seconds (mean, min, max) and the whole run's, with the CPU model they were measured on.

Numbers from training change from one CPU to another (float reductions differ), so the table states the machine.
Flags after `--` go to every demo run, e.g. `-- --grpo_overrides max_steps=40`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

STAGES = ("pretrain", "sft", "dpo", "grpo")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]}, {len(names)} logical cores" if names else platform.processor()
    except OSError:
        return platform.processor() or "unknown CPU"


def run_seed(root: str, seed: int, extra: list[str]) -> str:
    folder = os.path.join(root, f"seed_{seed}")
    if not os.path.isfile(os.path.join(folder, "report", "README.md")):
        command = [os.path.join(os.path.dirname(sys.executable), "rlhf-image"), "demo", "--seed", str(seed),
                   "--output_dir", folder, *extra]
        print("+", " ".join(command), flush=True)
        subprocess.run(command, check=True)
    return folder


def read_run(folder: str) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, float]]:
    metrics = {}
    for stage in STAGES:
        with open(os.path.join(folder, "eval", stage, "metrics.json")) as f:
            metrics[stage] = json.load(f)["metrics"]
    with open(os.path.join(folder, "timings.json")) as f:
        timings = json.load(f)
    return metrics, timings


def spread(values: list[float]) -> str:
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--root", default="outputs/demo_seeds")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="flags after -- for every demo run")
    args = parser.parse_args()
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra

    runs = {seed: read_run(run_seed(args.root, seed, extra)) for seed in args.seeds}
    scales = sorted({scale for metrics, _ in runs.values() for scale in metrics["pretrain"]})
    print(f"\nThe CPU demo over seeds {args.seeds} on {cpu_model()}; held-out OCR, mean ± std (min-max)\n")
    print("| stage | guidance | exact match | NED |")
    print("|---|---|---|---|")
    for stage in STAGES:
        for scale in scales:
            exact = [metrics[stage][scale]["word_accuracy"] for metrics, _ in runs.values()]
            ned = [metrics[stage][scale]["ned"] for metrics, _ in runs.values()]
            print(f"| {stage} | {scale} | {spread(exact)} | {spread(ned)} |")

    print("\nGain in exact match over the stage before, per seed\n")
    print("| seed | guidance | " + " | ".join(f"{b} - {a}" for a, b in zip(STAGES, STAGES[1:])) + " |")
    print("|---|---|" + "---|" * (len(STAGES) - 1))
    for seed, (metrics, _) in runs.items():
        for scale in scales:
            gains = [metrics[b][scale]["word_accuracy"] - metrics[a][scale]["word_accuracy"]
                     for a, b in zip(STAGES, STAGES[1:])]
            print(f"| {seed} | {scale} | " + " | ".join(f"{g:+.3f}" for g in gains) + " |")

    print("\nWall seconds per stage (mean, min-max over seeds)\n")
    print("| stage | seconds |")
    print("|---|---|")
    keys = list(next(iter(runs.values()))[1])
    for key in keys + ["all stages"]:
        values = [sum(t.values()) if key == "all stages" else t[key] for _, t in runs.values() if key == "all stages" or key in t]
        print(f"| {key} | {statistics.mean(values):.0f} ({min(values):.0f}-{max(values):.0f}) |")


if __name__ == "__main__":
    main()
