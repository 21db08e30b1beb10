"""One DPOTrainer run under DeepSpeed ZeRO-2 on CPU (gloo), launched on two processes by
tests/test_dpo_deepspeed.py through `tests/launch.py` (torchrun's environment, file rendezvous).

Every rank writes `DIR/rank<r>.json` with its per-step DPO losses and a digest of its transformer weights
before and after training; the final model is saved to `DIR/final` (all ranks join the save).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np
import PIL.Image
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

from launch import init_process_group_from_env  # noqa: E402

from rlhf_image.recipes.ovis_image.model import ovis_image_tiny  # noqa: E402
from rlhf_image.dpo_config import DPOConfig  # noqa: E402
from rlhf_image.dpo_trainer import DPOTrainer  # noqa: E402
from rlhf_image.policy import FlowPolicy  # noqa: E402

# ZeRO-2 with the trainer's torch AdamW: no "optimizer" entry (that would compile DeepSpeed's CPU Adam).
DEEPSPEED_CONFIG = {
    "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True},
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 1000000,
}


def weights_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def pair_rows(n: int) -> list[dict]:
    rng = np.random.default_rng(0)

    def image(level: float) -> PIL.Image.Image:
        return PIL.Image.fromarray(np.clip(level + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype("uint8"))

    return [{"prompt": f"a photo, number {i}", "chosen": image(215), "rejected": image(40)} for i in range(n)]


def main() -> None:
    init_process_group_from_env()
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    cli = parser.parse_args()
    policy = FlowPolicy.from_pipeline(ovis_image_tiny(seed=0), max_sequence_length=16)
    before = weights_digest(policy.transformer)
    args = DPOConfig(output_dir=cli.output_dir, use_cpu=True, deepspeed=DEEPSPEED_CONFIG, resolution=16,
                     per_device_train_batch_size=2, max_steps=3, learning_rate=1e-3, seed=0, sdpo=True,
                     report_to="none", disable_tqdm=True, save_strategy="no")
    trainer = DPOTrainer(policy, args=args, train_dataset=pair_rows(8))
    trainer.train()
    trainer.save_model(os.path.join(cli.output_dir, "final"))
    losses = [entry["dpo_loss"] for entry in trainer.state.log_history if "dpo_loss" in entry]
    result = {"rank": trainer.args.process_index, "world_size": trainer.args.world_size,
              "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage, "losses": losses,
              "weights_before": before, "weights_after": weights_digest(trainer.accelerator.unwrap_model(trainer.model))}
    with open(os.path.join(cli.output_dir, f"rank{result['rank']}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
