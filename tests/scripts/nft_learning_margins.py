"""Measure what the margins of tests/test_nft_learning.py rest on: for each case, the gain `mean(last 2) - first` of
the mean reward over seeds 0-4, and for the no-learning baseline (learning rate 1e-12) the largest |gain| over seeds
0-7. Prints one line per run and a summary; takes a few minutes on two CPU cores.

    python tests/scripts/nft_learning_margins.py [--cases nft-lora,awm-full] [--no-baseline]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tests"))

from test_nft_learning import CASES, run  # noqa: E402

# Learning rates must be positive; 1e-12 moves no float32 weight of the tiny model (a no-learning baseline).
NO_UPDATE_LR = 1e-12


def gain(rewards: list[float]) -> float:
    return float(np.mean(rewards[-2:]) - rewards[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--no-baseline", action="store_true")
    cli = parser.parse_args()
    summary = {}
    for name in filter(None, cli.cases.split(",")):
        lora, loss_type, lr, steps, margin, _ = CASES[name]
        gains = []
        for seed in range(5):
            with tempfile.TemporaryDirectory() as out:
                gains.append(gain(run(lora, loss_type, lr, steps, seed, out)))
            print(f"{name} seed {seed}: gain {gains[-1]:.6f}", flush=True)
        summary[name] = (gains, margin)
    if not cli.no_baseline:
        spread = 0.0
        for seed in range(8):
            with tempfile.TemporaryDirectory() as out:
                value = abs(gain(run(False, "nft", NO_UPDATE_LR, 16, seed, out)))
            spread = max(spread, value)
            print(f"baseline seed {seed}: |gain| {value:.4f}", flush=True)
        print(f"NULL_SPREAD (largest |gain| without updates): {spread:.4f}")
    for name, (gains, margin) in summary.items():
        print(f"{name}: gains {', '.join(f'{g:.4f}' for g in gains)}; smallest {min(gains):.4f}, margin {margin} "
              f"(needs <= {min(gains) / 2:.4f})")


if __name__ == "__main__":
    main()
