"""Flow-DPO with the Diffusion-SDPO safeguard: preference pairs built by scoring a pool image against the policy's
own sample (the Ovis-Image way), written to a pair folder, and trained on with `DPOTrainer`; then the same trainer
on pairs held in memory (PIL images).

The tiny Ovis-Image pipeline (random weights, built offline) stands in for a real checkpoint; the pool images are
flat grey squares and the reward prefers the brightness a dataset column asks for.

    python examples/dpo_preference_pairs.py --output_dir /tmp/dpo-pairs --max_steps 2
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from PIL import Image

from rlhf_image.recipes.ovis_image.model import ovis_image_tiny, ovis_prefix_tokenizer
from rlhf_image import DPOConfig, DPOTrainer, build_preference_pairs
from rlhf_image.policy import FlowPolicy


def brightness_reward(prompts, images, target_brightness, **columns):
    """1 - |mean pixel value in [0, 1] - the row's `target_brightness`|."""
    return [1.0 - abs(float(np.asarray(image, dtype=np.float32).mean()) / 255 - target)
            for image, target in zip(images, target_brightness)]


def tiny_policy() -> FlowPolicy:
    pipe = ovis_image_tiny(tokenizer=ovis_prefix_tokenizer(), seed=0)  # or OvisImagePipeline.from_pretrained(...)
    return FlowPolicy.from_pipeline(pipe, max_sequence_length=24)


def pool_rows(num_rows: int = 8) -> list[dict]:
    """Prompts with a pool image each (flat grey at a brightness that alternates near and far from the target)."""
    rows = []
    for i in range(num_rows):
        target = 0.2 + 0.6 * (i % 2)
        level = target if i % 4 < 2 else 1 - target
        rows.append({"prompt": f"a square of brightness {target:.1f}", "target_brightness": target,
                     "image": Image.new("RGB", (32, 32), (int(255 * level),) * 3)})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", default="dpo-preference-pairs")
    parser.add_argument("--max_steps", type=int, default=2)
    cli = parser.parse_args(argv)
    pairs_dir = os.path.join(cli.output_dir, "pairs")
    policy = tiny_policy()

    # [start:pairs]
    summary = build_preference_pairs(
        policy, pool_rows(), [brightness_reward], pairs_dir,  # rows: prompt, image (the pool), extra columns
        height=32, width=32, num_inference_steps=4, guidance_scale=1.0, seed=0, batch_size=4, micro_batch_size=4)
    # pairs_dir: manifest.jsonl (one pair per line), images/, summary.json, skipped.jsonl (prompts with no pair)
    # [end:pairs]
    print(f"pairs: {summary['num_pairs']} ({summary['num_chosen_pool']} pool images chosen), "
          f"skipped: {summary['num_skipped']}")

    # [start:dpo]
    args = DPOConfig(output_dir=os.path.join(cli.output_dir, "dpo"), max_steps=cli.max_steps, use_cpu=True,
                     report_to=[], seed=0, resolution=32, per_device_train_batch_size=2,
                     beta=100.0,                     # ~100 for velocity errors (5000 was epsilon-prediction's)
                     sdpo=True, sdpo_space="output",  # the Diffusion-SDPO safeguard on the loser's gradient
                     learning_rate=1e-4, lr_scheduler_type="constant", save_steps=1, save_total_limit=1,
                     cache_text_embeddings=True, cache_latents=True)
    trainer = DPOTrainer(policy, args=args, train_dataset=pairs_dir)  # ref_model=None: a frozen copy of the policy
    trainer.train()
    trainer.save_model()  # full weights: dpo/transformer/ (diffusers layout) + README.md
    # [end:dpo]

    # [start:memory]
    rows = [{"prompt": "a bright square", "chosen": Image.new("RGB", (32, 32), (230, 230, 230)),
             "rejected": Image.new("RGB", (32, 32), (20, 20, 20))}] * 4  # paths, PIL images or latents [C, h, w]
    in_memory = DPOTrainer(tiny_policy(), args=DPOConfig(output_dir=os.path.join(cli.output_dir, "dpo-rows"),
                                                         max_steps=1, use_cpu=True, report_to=[], resolution=32,
                                                         per_device_train_batch_size=2, save_strategy="no"),
                           train_dataset=rows)
    in_memory.train()
    # [end:memory]

    losses = [e["dpo_loss"] for e in trainer.state.log_history if "dpo_loss" in e]
    print(f"DPO loss per step: {losses}; model in {args.output_dir}: {sorted(os.listdir(args.output_dir))}")
    with open(os.path.join(pairs_dir, "manifest.jsonl")) as f:
        manifest = [json.loads(line) for line in f]
    return {"summary": summary, "manifest": manifest, "pairs_dir": pairs_dir, "trainer": trainer,
            "in_memory": in_memory}


if __name__ == "__main__":
    main()
