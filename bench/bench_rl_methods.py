"""GRPO, DiffusionNFT and AWM side by side on the CPU demo's task: held-out OCR exact match and NED against the
CPU-seconds of training, from the same DPO model, 3 seeds each.

    .venv/bin/python bench/bench_rl_methods.py --demo_dir outputs/bench_rl/demo --root outputs/bench_rl

The DPO model is the demo's (`rlhf-image demo` stages up to dpo; run here into `--demo_dir` if it has no `dpo/`).
Each method trains with its stage's tiny config (`tiny_grpo.yaml`, `tiny_nft.yaml`; AWM is `tiny_nft.yaml` with
`--loss_type awm` and its own learning rate, see METHODS), the same 128 sampled images per step, in segments: the
stage command runs to the next evaluation point (`--resume latest` continues the same run exactly), the held-out
evaluation (`tiny_eval.yaml`: 256 prompts, 20 ODE steps, no CFG) scores the model it saved, and the CPU-seconds of
the training commands (user + system of the child processes, their start-up included; evaluation excluded) are
summed. Prints a table (mean ± std over seeds, and the ratio of each method's CPU-seconds to GRPO's), writes
`results.json` and the plot `exact_vs_cpu_seconds.png` (exact match against CPU-seconds, one line per run) under
`--root`. CPU-seconds are those of this machine (its CPU model is printed), not comparable across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_demo_seeds import cpu_model  # noqa: E402

# method -> (stage command, its config, extra flags, evaluation points in optimizer steps)
METHODS = {
    "nft": ("nft", "tiny_nft.yaml", [], (10, 20)),
    "awm": ("nft", "tiny_nft.yaml", ["--loss_type", "awm", "--timestep_fraction", "0.9", "--awm_num_timesteps", "2",
                                     "--learning_rate", "1.0e-4"], (10, 20)),
    "grpo": ("grpo", "tiny_grpo.yaml", [], (30, 60)),
}


def cli() -> list[str]:
    return [sys.executable, "-m", "rlhf_image.recipes.cli"]


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(command: list[str]) -> float:
    """Run `command` (checked); returns the CPU-seconds it used."""
    print("+", " ".join(command), flush=True)
    before = children_cpu_seconds()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return children_cpu_seconds() - before


def evaluate(model: str, output_dir: str) -> dict[str, float]:
    metrics_path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(metrics_path):
        run([*cli(), "eval", "--config", "tiny_eval.yaml", "--model", model, "--output_dir", output_dir])
    with open(metrics_path) as f:
        metrics = json.load(f)["metrics"]["cfg1"]
    return {"exact": metrics["word_accuracy"], "ned": metrics["ned"]}


def ensure_dpo(demo_dir: str) -> str:
    dpo = os.path.join(demo_dir, "dpo")
    if not os.path.isfile(os.path.join(dpo, "rlhf_stage.json")):
        script = ("import sys, rlhf_image.recipes.ovis_image.demo as demo; "
                  "demo.PIPELINE = demo.PIPELINE[:[c for c, _, _ in demo.PIPELINE].index('dpo') + 1]; "
                  "demo.write_report = lambda root, timings, title=None: {'table': '', 'html': '', 'markdown': ''}; "
                  "demo.run(demo.DemoArguments(output_dir=sys.argv[1]))")
        run([sys.executable, "-c", script, demo_dir])
    return dpo


def train_method(name: str, seed: int, dpo: str, root: str) -> list[dict[str, float]]:
    """Train `name` with `seed` in segments; returns one point per evaluation: steps, CPU-seconds, exact, NED."""
    command, config, extra, points = METHODS[name]
    out = os.path.join(root, name, f"seed_{seed}")
    progress_path = os.path.join(out, "bench_points.json")
    done = json.load(open(progress_path)) if os.path.isfile(progress_path) else []
    cpu = done[-1]["cpu_seconds"] if done else 0.0
    for steps in points[len(done):]:
        cpu += run([*cli(), command, "--config", config, *extra, "--model", dpo, "--output_dir", out,
                    "--seed", str(seed), "--max_steps", str(steps), "--save_steps", str(points[0]),
                    "--log_samples_steps", "0", "--resume", "latest"])
        point = {"steps": steps, "cpu_seconds": cpu, **evaluate(out, os.path.join(out, f"eval_{steps}"))}
        done.append(point)
        with open(progress_path, "w") as f:
            json.dump(done, f, indent=1)
    return done


def phase_seconds(name: str, seed: int, root: str) -> dict[str, float]:
    """Median wall seconds per optimizer step of each logged phase (`time/rollout`, `time/reward`, `time/train`) over
    the run's steps after the first."""
    with open(os.path.join(root, name, f"seed_{seed}", "rlhf_stage.json")) as f:
        history = json.load(f)["log_history"]
    phases = {}
    for key in ("time/rollout", "time/reward", "time/train"):
        values = [entry[key] for entry in history[1:] if key in entry]
        if values:
            phases[key.split("/")[1]] = statistics.median(values)
    return phases


def spread(values: list[float], digits: int = 3) -> str:
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def plot(results: dict, start: dict[str, float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"grpo": "tab:blue", "nft": "tab:orange", "awm": "tab:green"}
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, runs in results.items():
        for k, (seed, points) in enumerate(runs.items()):
            ax.plot([0] + [p["cpu_seconds"] for p in points], [start["exact"]] + [p["exact"] for p in points],
                    marker="o", color=colours.get(name), alpha=0.8, label=name.upper() if k == 0 else None)
    ax.set_xlabel("training CPU-seconds")
    ax.set_ylabel("held-out exact match (no CFG)")
    ax.set_title("From the demo's DPO model, 3 seeds each")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo_dir", default="outputs/bench_rl/demo")
    parser.add_argument("--root", default="outputs/bench_rl")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    args = parser.parse_args()

    dpo = ensure_dpo(args.demo_dir)
    start = evaluate(dpo, os.path.join(args.root, "eval_dpo"))
    results = {name: {seed: train_method(name, seed, dpo, args.root) for seed in args.seeds} for name in args.methods}

    grpo_cpu = statistics.mean(r[-1]["cpu_seconds"] for r in results["grpo"].values()) if "grpo" in results else None
    print(f"\nFrom the demo's DPO model (held-out exact match {start['exact']:.3f}, NED {start['ned']:.3f}), seeds "
          f"{args.seeds}, on {cpu_model()}; mean ± std over seeds\n")
    print("| method | steps | training CPU-s | CPU-s / GRPO's 60 steps | exact match | gain over DPO | NED |")
    print("|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        for i, steps in enumerate(METHODS[name][3]):
            points = [r[i] for r in runs.values()]
            cpu = [p["cpu_seconds"] for p in points]
            ratio = f"{statistics.mean(cpu) / grpo_cpu:.2f}" if grpo_cpu else "-"
            print(f"| {name} | {steps} | {spread(cpu, 0)} | {ratio} | {spread([p['exact'] for p in points])} | "
                  f"{spread([p['exact'] - start['exact'] for p in points])} | {spread([p['ned'] for p in points])} |")
    print("\nWall seconds per step, median over each run's steps after the first, mean over seeds\n")
    print("| method | rollout (sampling) | reward (OCR) | train | step |")
    print("|---|---|---|---|---|")
    for name in results:
        phases = [phase_seconds(name, seed, args.root) for seed in args.seeds]
        means = {key: statistics.mean(p[key] for p in phases) for key in ("rollout", "reward", "train")}
        print(f"| {name} | {means['rollout']:.2f} | {means['reward']:.2f} | {means['train']:.2f} | "
              f"{sum(means.values()):.2f} |")
    with open(os.path.join(args.root, "results.json"), "w") as f:
        json.dump({"dpo": start, "cpu": cpu_model(), "results": results}, f, indent=1)
    plot(results, start, os.path.join(args.root, "exact_vs_cpu_seconds.png"))
    print(f"\nplot: {os.path.join(args.root, 'exact_vs_cpu_seconds.png')}")


if __name__ == "__main__":
    main()
