"""Custom rewards under rlhf-image's reward contract: a function reading a dataset column, a class with a name and
state, an async reward, "could not score" (None or NaN), composition with weights, and the same rewards handed to
`GRPOTrainer`.

    python examples/custom_reward.py --output_dir /tmp/custom-reward
"""

from __future__ import annotations

import argparse
import asyncio
import warnings

import numpy as np
from PIL import Image

from rlhf_image.rewards import RewardSet, call_reward


# [start:function]
def colour_match(prompts, images, target_rgb, **columns):
    """1 - mean |pixel - target| / 255 against the row's `target_rgb` column; None where a row has no target."""
    scores = []
    for image, target in zip(images, target_rgb):
        if target is None:
            scores.append(None)  # cannot score: advantage 0 for this sample, counted in rewards/unscored
            continue
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        scores.append(1.0 - float(np.abs(pixels - np.asarray(target, dtype=np.float32)).mean()) / 255)
    return scores
# [end:function]


# [start:class]
class ContrastReward:
    """Standard deviation of the grey levels, in [0, 0.5]: prefers images with structure over flat ones."""

    name = "contrast"  # the name it is logged under (rewards/contrast/mean); a function is named by __name__

    def __init__(self, scale: float = 1.0):
        self.scale = scale  # load a model here once, not on every call

    def __call__(self, prompts, images, **columns):  # **columns: accept and ignore the columns it does not use
        return [self.scale * float(np.asarray(image.convert("L"), dtype=np.float32).std()) / 255 for image in images]
# [end:class]


# [start:async]
async def judge(prompts, images, **columns):
    """An async reward (say, a call to a judge model over the network); async rewards run concurrently."""
    await asyncio.sleep(0.01)  # stands in for awaiting an HTTP response
    values = []
    for image in images:
        grey = np.asarray(image.convert("L"), dtype=np.float32) / 255
        # NaN means "could not score", like None (with a RuntimeWarning naming the reward and the index)
        values.append(float("nan") if grey.max() == grey.min() else float(grey.mean()))
    return values
# [end:async]


def sample_batch() -> tuple[list[str], list[Image.Image], dict]:
    """Five 16x16 images and their `target_rgb` column; row 2 has no target (None) and row 4 is flat (NaN)."""
    red = np.zeros((16, 16, 3), dtype=np.uint8)
    red[..., 0] = 250
    red[6:10, 6:10] = 255
    ramp = np.repeat(np.linspace(64, 192, 16, dtype=np.uint8)[None, :, None], 16, axis=0).repeat(3, axis=2)
    halves = np.zeros((16, 16, 3), dtype=np.uint8)
    halves[:, 8:] = 255
    images = [Image.fromarray(red), Image.fromarray(ramp), Image.fromarray(halves),
              Image.fromarray(halves.transpose(1, 0, 2).copy()), Image.new("RGB", (16, 16), (0, 0, 0))]
    prompts = ["a red card", "a grey ramp", "a split card", "a split card", "a black card"]
    columns = {"target_rgb": [[255, 0, 0], [128, 128, 128], None, [255, 255, 255], [0, 0, 0]]}
    return prompts, images, columns


def score(mode: str = "sum_then_normalize"):
    prompts, images, columns = sample_batch()
    # [start:compose]
    rewards = RewardSet([colour_match, ContrastReward(), judge], weights=[1.0, 0.5, 0.2], mode=mode)
    result = rewards(prompts, images, **columns)  # columns are keyword lists, one value per image
    per_reward = result.per_reward  # [N, 3] raw values, NaN where a reward could not score
    total = result.total            # [N] weighted total, NaN (unscored) where a reward with nonzero weight is NaN
    metrics = result.metrics()      # {"rewards/colour_match/mean": ..., "rewards/judge/num_none": 1.0, ...}
    # [end:compose]
    assert per_reward.shape == (len(prompts), 3) and total.shape == (len(prompts),) and metrics
    return result


def train(output_dir: str):
    """One GRPO step on the tiny Ovis-Image model with the three rewards (each logged on its own)."""
    from rlhf_image.recipes.ovis_image.model import ovis_image_tiny, ovis_prefix_tokenizer
    from rlhf_image import GRPOConfig, GRPOTrainer
    from rlhf_image.policy import FlowPolicy

    policy = FlowPolicy.from_pipeline(ovis_image_tiny(tokenizer=ovis_prefix_tokenizer(), seed=0),
                                      max_sequence_length=24)
    dataset = [{"prompt": "a red card", "target_rgb": [255, 0, 0]}, {"prompt": "a card", "target_rgb": None}]
    # [start:trainer]
    args = GRPOConfig(output_dir=output_dir, reward_aggregation="normalize_then_sum",  # rewards on other scales
                      max_steps=1, use_cpu=True, report_to=[], num_generations=2, per_device_train_batch_size=4,
                      resolution=32, num_inference_steps=2, guidance_scale=1.0, save_strategy="no",
                      log_samples_steps=0)
    trainer = GRPOTrainer(policy, [colour_match, ContrastReward(), judge], reward_weights=[1.0, 0.5, 0.2],
                          args=args, train_dataset=dataset)
    # [end:trainer]
    trainer.train()
    return trainer


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", default="custom-reward")
    cli = parser.parse_args(argv)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summed, standardised = score("sum_then_normalize"), score("normalize_then_sum")
    print(f"per reward {summed.names}:\n{summed.per_reward}\nweighted sum: {summed.total}\n"
          f"standardised then summed: {standardised.total}\nwarnings: {[str(w.message) for w in caught]}")

    # [start:validate]
    prompts, images, columns = sample_batch()
    values = call_reward(colour_match, prompts, images, **columns)  # list[float | None], checked
    try:
        call_reward(lambda prompts, images, **c: [float("inf")] * len(images), prompts, images)
    except ValueError as error:  # inf is a bug in the reward, never "unscored": the message names it and the index
        print(error)
    # [end:validate]

    trainer = train(cli.output_dir)
    logged = {k: v for k, v in trainer.state.log_history[0].items() if k.startswith("rewards/")}
    print(f"logged after one GRPO step: {logged}")
    return {"summed": summed, "standardised": standardised, "warnings": caught, "values": values,
            "logged": logged}


if __name__ == "__main__":
    main()
