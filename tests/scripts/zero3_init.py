"""Build a scaled-down Ovis-Image MMDiT for ZeRO-3 training on two CPU processes either the usual way (whole in
every process, partitioned when DeepSpeed wraps it) or already sharded (`rlhf_image.sharded_init.zero3_init`, which
`ovis_image_tiny` uses whenever a ZeRO-3 config is active), measure the host memory the build takes, and train
three steps. Launched by tests/test_zero3_init.py through tests/launch.py.

Each rank writes `DIR/rank<r>.json`: the parameter bytes it holds and the whole model's, the peak resident memory
the build added (VmHWM after the build minus VmRSS before it, with the high-water mark reset first), and the
per-step losses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.join(REPO, "tests", "scripts"))

from fm_zero import Squares, deepspeed_config, make_config  # noqa: E402
from launch import init_process_group_from_env  # noqa: E402

from rlhf_image.fm_trainer import FlowMatchingTrainer  # noqa: E402
from rlhf_image.policy import FlowPolicy  # noqa: E402
from rlhf_image.recipes.ovis_image.model import ovis_image_tiny  # noqa: E402
from rlhf_image.sharded_init import local_parameter_bytes  # noqa: E402

# 121M parameters (485 MB in float32): large enough that its memory stands out of the process's noise
MODEL = dict(hidden_size=768, num_heads=12, num_layers=2, num_single_layers=6, axes_dims_rope=(16, 24, 24))


def memory_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def build_policy() -> tuple[FlowPolicy, int]:
    """The policy, and the peak resident memory (bytes) its build added to this process."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS high-water mark (VmHWM) to the current RSS
    before = memory_kib("VmRSS")
    policy = FlowPolicy.from_pipeline(ovis_image_tiny(seed=0, **MODEL), max_sequence_length=16)
    return policy, (memory_kib("VmHWM") - before) * 1024


def main() -> None:
    init_process_group_from_env()
    parser = argparse.ArgumentParser()
    parser.add_argument("--init", choices=["whole", "sharded"], required=True)
    parser.add_argument("--output_dir", required=True)
    cli = parser.parse_args()
    kwargs = dict(max_steps=3, save_strategy="no", use_ema=False, learning_rate=1e-4,
                  deepspeed=deepspeed_config(3))
    if cli.init == "whole":  # the usual path: the model exists before any ZeRO-3 config does
        policy, build_bytes = build_policy()
        config = make_config(cli.output_dir, **kwargs)
    else:
        config = make_config(cli.output_dir, **kwargs)
        policy, build_bytes = build_policy()
    held, full = local_parameter_bytes(policy.transformer)
    trainer = FlowMatchingTrainer(policy, args=config, train_dataset=Squares())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    with open(os.path.join(cli.output_dir, f"rank{trainer.args.process_index}.json"), "w") as f:
        json.dump({"held_bytes": held, "full_bytes": full, "build_peak_bytes": build_bytes, "losses": losses,
                   "world_size": trainer.args.world_size}, f)


if __name__ == "__main__":
    main()
