"""Reward models from the literature, loaded from their released checkpoints: HPSv3, a VLM judge (VQAScore-style
yes/no) and ImageReward, scored in one `RewardSet`.

    python examples/model_rewards.py --device cuda   # downloads the checkpoints on first use (about 25 GB)

Each `load_*` function holds the line docs/custom_rewards.md quotes; the defaults are the released checkpoints.
tests/test_docs.py runs them on tiny random checkpoints in the same layouts.
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image


def load_hpsv3(checkpoint: str = "MizzenAI/HPSv3", base_model: str = "Qwen/Qwen2-VL-7B-Instruct",
               device: str = "cpu"):
    # [start:hpsv3]
    from rlhf_image.rewards import HPSv3Reward

    # checkpoint: "MizzenAI/HPSv3" (HPSv3.safetensors); base_model: "Qwen/Qwen2-VL-7B-Instruct" (config, processor)
    hps = HPSv3Reward(checkpoint, base_model, device=device)  # bf16; loads on the first call
    # [end:hpsv3]
    return hps


def load_vlm_judge(model: str = "Qwen/Qwen2.5-VL-7B-Instruct", device: str = "cpu"):
    # [start:vlm_judge]
    from rlhf_image.rewards import VLMJudgeReward

    judge = VLMJudgeReward(
        model,  # a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint, e.g. "Qwen/Qwen2.5-VL-7B-Instruct"
        template='Does this figure show "{prompt}"? Please answer yes or no.',  # VQAScore's question (the default)
        answers=("Yes", "No"),  # one token each: the reward is softmax(z_yes, z_no)[0]
        image_size=448,  # resize to 448 x 448 first: 256 image tokens per image
        device=device,
    )
    # [end:vlm_judge]
    return judge


def load_image_reward(model: str = "THUDM/ImageReward", tokenizer: str = "bert-base-uncased", device: str = "cpu"):
    # [start:imagereward]
    from rlhf_image.rewards import ImageReward

    # model: "THUDM/ImageReward" (ImageReward.pt + med_config.json); tokenizer: "bert-base-uncased"
    image_reward = ImageReward(model, tokenizer, device=device)
    # [end:imagereward]
    return image_reward


def sample_batch() -> tuple[list[str], list[Image.Image]]:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)),
              Image.new("RGB", (80, 80), (220, 40, 40))]
    return ["a noisy texture", "a red square"], images


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hpsv3_checkpoint", default="MizzenAI/HPSv3")
    parser.add_argument("--hpsv3_base_model", default="Qwen/Qwen2-VL-7B-Instruct")
    parser.add_argument("--judge_model", default="Qwen/Qwen2.5-VL-7B-Instruct")
    parser.add_argument("--image_reward_model", default="THUDM/ImageReward")
    parser.add_argument("--image_reward_tokenizer", default="bert-base-uncased")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    from rlhf_image.rewards import RewardSet

    rewards = [load_hpsv3(args.hpsv3_checkpoint, args.hpsv3_base_model, args.device),
               load_vlm_judge(args.judge_model, args.device),
               load_image_reward(args.image_reward_model, args.image_reward_tokenizer, args.device)]
    prompts, images = sample_batch()
    result = RewardSet(rewards, mode="normalize_then_sum")(prompts, images)
    for name, column in zip(result.names, result.per_reward.T):
        print(f"{name:>12}: " + "  ".join(f"{v:.4f}" for v in column))
    return {"rewards": rewards, "result": result, "prompts": prompts, "images": images}


if __name__ == "__main__":
    main()
