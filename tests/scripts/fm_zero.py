"""One FlowMatchingTrainer run under DeepSpeed ZeRO on CPU (gloo), launched on two processes by
tests/test_zero.py through `tests/launch.py` (torchrun's environment, file rendezvous: torchrun's TCP store
sends a DNS query off the machine). By hand, `torchrun --nproc_per_node 2 tests/scripts/fm_zero.py
--stage 3 --output_dir DIR` runs it too.

Rank 0 writes `DIR/result.json` with the per-step losses; every rank joins the final save (ZeRO-3
gathers the weights), written to `DIR/final` in diffusers layout. The test imports `make_dataset`
and `make_config` to build the single-process reference run with the same data, model and seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import PIL.Image
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

from launch import init_process_group_from_env  # noqa: E402

from rlhf_image.recipes.ovis_image.model import ovis_image_tiny  # noqa: E402
from rlhf_image.fm_config import FlowMatchingConfig  # noqa: E402
from rlhf_image.fm_trainer import FlowMatchingTrainer  # noqa: E402
from rlhf_image.policy import FlowPolicy  # noqa: E402

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]


class Squares(torch.utils.data.Dataset):
    """12 images: a coloured square on black at one of 4 positions; the prompt names both."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        image = PIL.Image.new("RGB", (16, 16))
        x, y = (i // 4) % 2 * 8, (i // 8) % 2 * 8
        image.paste(PIL.Image.new("RGB", (8, 8), COLOURS[i % 4]), (x, y))
        return {"image": image, "prompt": f"square {i % 4} at {x},{y}", "key": str(i)}


def make_policy() -> FlowPolicy:
    return FlowPolicy.from_pipeline(ovis_image_tiny(seed=0), max_sequence_length=16)


def make_config(output_dir: str, **overrides) -> FlowMatchingConfig:
    """fp32, 5 steps of 2 samples per process, EMA on, checkpoint at step 4 (mid-epoch of epoch 1:
    12 samples = 6 global batches = 3 steps per epoch with 2 processes)."""
    kw = dict(output_dir=output_dir, use_cpu=True, per_device_train_batch_size=2, max_steps=5, resolution=16,
              learning_rate=1e-3, logging_steps=1, save_strategy="steps", save_steps=4, use_ema=True, ema_decay=0.5,
              cfg_dropout_prob=0.25, seed=0, report_to="none", disable_tqdm=True)
    kw.update(overrides)
    return FlowMatchingConfig(**kw)


def deepspeed_config(stage: int) -> dict:
    with open(os.path.join(REPO, "recipes", "ovis_image", f"ds_zero{stage}.json")) as f:
        config = json.load(f)
    if stage == 3:
        # The shipped threshold keeps parameters under 30720 elements whole on every rank (sized for the 7B
        # model); every tensor of the tiny model is smaller, so partition all of them to exercise ZeRO-3.
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return config


def main() -> None:
    init_process_group_from_env()
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, choices=[2, 3], required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in output_dir")
    cli = parser.parse_args()
    trainer = FlowMatchingTrainer(make_policy(), args=make_config(cli.output_dir, deepspeed=deepspeed_config(cli.stage)),
                                  train_dataset=Squares(), eval_dataset=Squares())
    trainer.train(resume_from_checkpoint=True if cli.resume else None)
    eval_loss = trainer.evaluate()["eval_loss"]  # with the EMA weights swapped into each rank's partitions
    trainer.save_model(os.path.join(cli.output_dir, "final"))
    if trainer.is_world_process_zero():
        losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
        with open(os.path.join(cli.output_dir, "result.json"), "w") as f:
            json.dump({"losses": losses, "eval_loss": eval_loss, "world_size": trainer.args.world_size,
                       "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage}, f)


if __name__ == "__main__":
    main()
