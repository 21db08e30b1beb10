"""Measure what the margins of tests/test_grpo_learning.py rest on: for each case, the gain `mean(last 2) - first` of
the mean reward over seeds 0-4, and for the no-learning baseline (learning rate 0) the largest |gain| over seeds 0-7
of three setups. Prints one line per run and a summary; takes a few minutes on two CPU cores.

    python tests/scripts/grpo_learning_margins.py [--cases ovis-lora-sde,flux-lora-sde] [--no-baseline]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tests"))

from grpo_helpers import LORA_TARGETS, brightness, dataset, flux_policy, logged, ovis_policy, tiny_config  # noqa: E402
from peft import LoraConfig  # noqa: E402
from test_grpo_learning import CASES, OPTIONS  # noqa: E402

from rlhf_image import GRPOTrainer  # noqa: E402

BASELINES = {"ovis-sde": ("ovis", "sde"), "ovis-cps": ("ovis", "cps"), "flux-sde": ("flux", "sde")}


def gain(family: str, lora: bool, sde_type: str, lr: float, accumulation: int, steps: int, seed: int,
         options: dict | None = None) -> list[float]:
    with tempfile.TemporaryDirectory() as out:
        args = tiny_config(out, max_steps=steps, learning_rate=lr, sde_type=sde_type,
                           gradient_accumulation_steps=accumulation, seed=seed, **(options or {}))
        policy = ovis_policy() if family == "ovis" else flux_policy()
        peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS) if lora else None
        trainer = GRPOTrainer(policy, brightness, args=args, train_dataset=dataset(), peft_config=peft_config)
        trainer.train()
        return logged(trainer, "rewards/brightness/mean")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--no-baseline", action="store_true")
    cli = parser.parse_args()
    summary = {}
    for name in cli.cases.split(","):
        family, lora, sde_type, lr, accumulation, steps, margin, _ = CASES[name]
        gains = []
        for seed in range(5):
            rewards = gain(family, lora, sde_type, lr, accumulation, steps, seed, OPTIONS.get(name))
            gains.append(float(np.mean(rewards[-2:]) - rewards[0]))
            print(f"{name} seed {seed}: gain {gains[-1]:.6f}", flush=True)
        summary[name] = (min(gains), margin)
    if not cli.no_baseline:
        spread = 0.0
        for name, (family, sde_type) in BASELINES.items():
            for seed in range(8):
                rewards = gain(family, False, sde_type, 0.0, 2, 16, seed)
                spread = max(spread, abs(float(np.mean(rewards[-2:]) - rewards[0])))
                print(f"baseline {name} seed {seed}: |gain| {abs(np.mean(rewards[-2:]) - rewards[0]):.4f}", flush=True)
        print(f"NULL_SPREAD (largest |gain| at learning rate 0): {spread:.4f}")
    for name, (smallest, margin) in summary.items():
        print(f"{name}: smallest gain over 5 seeds {smallest:.4f}, margin {margin} (needs <= {smallest / 2:.4f})")


if __name__ == "__main__":
    main()
