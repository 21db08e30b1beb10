"""GRPO with rollouts on Ray workers: the in-process run with `rollout_engine=RayRolloutEngine(...)` as the only
change. Without `--address` a private Ray instance starts on 127.0.0.1 (no dashboard, no usage stats); with
`--address auto` the script joins the cluster started with `ray start` on this node.

    python examples/grpo_ray_rollouts.py --output_dir /tmp/grpo-ray --num_workers 1 --max_steps 2
    python examples/grpo_ray_rollouts.py --address auto --num_workers 7 --num_gpus_per_worker 1 --weight_transport collective
"""

from __future__ import annotations

import argparse
import functools

import numpy as np
from peft import LoraConfig

from recipes.ovis_image.model import ovis_image_tiny, ovis_prefix_tokenizer
from rlhf_image import GRPOConfig, GRPOTrainer
from rlhf_image.policy import FlowPolicy
from rollout import RayRolloutEngine


def brightness(prompts, images, **columns):
    """Mean pixel value in [0, 1]."""
    return [float(np.asarray(image, dtype=np.float32).mean() / 255) for image in images]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", default="grpo-ray")
    parser.add_argument("--max_steps", type=int, default=2)
    parser.add_argument("--address", default=None, help="'auto' to join the cluster of `ray start`")
    parser.add_argument("--num_workers", type=int, default=1)
    parser.add_argument("--num_gpus_per_worker", type=float, default=None)
    parser.add_argument("--weight_transport", default="object_store", choices=["object_store", "collective"])
    cli = parser.parse_args(argv)

    # [start:engine]
    recipe = functools.partial(ovis_image_tiny, tokenizer=ovis_prefix_tokenizer(), seed=0)  # picklable
    engine = RayRolloutEngine(
        recipe, policy_kwargs={"max_sequence_length": 24},  # each worker builds its replica: recipe() -> policy
        num_workers=cli.num_workers, num_gpus_per_worker=cli.num_gpus_per_worker,
        num_cpus_per_worker=1, worker_threads=1,
        weight_transport=cli.weight_transport,               # LoRA: only the adapter is sent at each sync
        address=cli.address)                                 # None: private Ray on 127.0.0.1; "auto": the cluster
    policy = FlowPolicy.from_pipeline(recipe(), max_sequence_length=24)  # the trainer's copy, same base weights
    args = GRPOConfig(output_dir=cli.output_dir, max_steps=cli.max_steps, use_cpu=True, report_to=[], seed=0,
                      num_generations=4, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                      resolution=32, num_inference_steps=4, guidance_scale=1.0, learning_rate=1e-2,
                      save_strategy="no", log_samples_steps=0, debug_ratio_check=True)
    trainer = GRPOTrainer(policy, brightness, args=args, train_dataset=[{"prompt": p} for p in ("a cat", "the sea")],
                          peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v"]),
                          rollout_engine=engine)
    try:
        trainer.train()
    finally:
        engine.close()  # kills the workers; stops Ray if the engine started it
    # [end:engine]
    ratios = [(e["ratio/min"], e["ratio/max"]) for e in trainer.state.log_history if "ratio/max" in e]
    print(f"{trainer.state.global_step} steps on {cli.num_workers} Ray worker(s); on-policy ratio (min, max) per "
          f"step {ratios}; weight syncs took {engine.last_sync_seconds:.3f} s (last)")
    return {"trainer": trainer, "engine": engine, "ratios": ratios}


if __name__ == "__main__":
    main()
