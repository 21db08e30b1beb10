"""DiffusionNFT and AWM learn: with a verifiable reward (mean brightness of the image) the tiny Ovis-Image model's
mean reward rises clearly within seconds on the CPU, from deterministic (ODE) rollouts without CFG, with LoRA and
full fine-tuning.

Criterion: mean reward of the last two steps > first step + margin. Margins come from measured runs (5 seeds each,
`args.seed` 0-4, this machine, tests/scripts/nft_learning_margins.py): without updates (learning rate 1e-12) the
same statistic stays within +-NULL_SPREAD; each margin is at least 3x that and at most half the smallest gain
measured over the seeds. Gains per seed 0-4:
nft-lora 0.0397, 0.0684, 0.0849, 0.0603, 0.0882; nft-full 0.0496, 0.0601, 0.0447, 0.0367, 0.0414;
awm-lora 0.0657, 0.0333, 0.0709, 0.0367, 0.0835; awm-full 0.0596, 0.0838, 0.0878, 0.0540, 0.0883.
"""

import numpy as np
import pytest
from grpo_helpers import LORA_TARGETS, brightness, dataset, logged, ovis_policy, tiny_nft_config
from peft import LoraConfig

from rlhf_image import NFTTrainer

# Largest |mean(last 2) - first| over 8 seeds without updates, 16 steps (DiffusionNFT, ODE rollouts): 0.0003-0.0010.
NULL_SPREAD = 0.0010

# (LoRA, loss_type, learning rate, steps, margin, smallest gain seen over 5 seeds)
CASES = {
    "nft-lora": (True, "nft", 1e-1, 16, 0.015, 0.0397),
    "nft-full": (False, "nft", 3e-2, 16, 0.015, 0.0367),
    "awm-lora": (True, "awm", 3e-2, 16, 0.015, 0.0333),
    "awm-full": (False, "awm", 1e-2, 16, 0.02, 0.0540),
}


def run(lora: bool, loss_type: str, lr: float, steps: int, seed: int, output_dir) -> list[float]:
    """The mean reward per step of one run."""
    args = tiny_nft_config(output_dir, loss_type=loss_type, max_steps=steps, learning_rate=lr, seed=seed)
    peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS) if lora else None
    trainer = NFTTrainer(ovis_policy(), brightness, args=args, train_dataset=dataset(), peft_config=peft_config)
    trainer.train()
    return logged(trainer, "rewards/brightness/mean")


@pytest.mark.parametrize("case", list(CASES))
def test_mean_reward_rises(tmp_path, case):
    lora, loss_type, lr, steps, margin, smallest_gain = CASES[case]
    assert 3 * NULL_SPREAD <= margin <= smallest_gain / 2  # the margins' own rule
    rewards = run(lora, loss_type, lr, steps, 0, tmp_path)
    assert len(rewards) == steps
    gain = np.mean(rewards[-2:]) - rewards[0]
    assert gain > margin, f"mean reward per step: {np.round(rewards, 4).tolist()}"
