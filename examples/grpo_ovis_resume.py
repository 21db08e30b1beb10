"""GRPO with LoRA on an Ovis-Image model: the policy built from components, a reward that reads a dataset column,
checkpoints, an interrupted run resumed, and the result loaded back with stock diffusers.

The tiny Ovis-Image pipeline (`rlhf_image.recipes.ovis_image.model.ovis_image_tiny`, random weights, built offline) stands in
for `OvisImagePipeline.from_pretrained("AIDC-AI/Ovis-Image-7B")`; on the CPU this takes a few seconds.

    python examples/grpo_ovis_resume.py --output_dir /tmp/grpo-ovis --max_steps 3
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from peft import LoraConfig
from transformers import TrainerCallback

from rlhf_image.recipes.ovis_image.model import ovis_image_tiny, ovis_prefix_tokenizer
from rlhf_image import GRPOConfig, GRPOTrainer


# [start:reward]
def brightness_reward(prompts, images, target_brightness, **columns):
    """1 - |mean pixel value in [0, 1] - the row's `target_brightness`|; other columns are ignored."""
    return [1.0 - abs(float(np.asarray(image, dtype=np.float32).mean()) / 255 - target)
            for image, target in zip(images, target_brightness)]


dataset = [{"prompt": "a white page", "target_brightness": 0.9}, {"prompt": "a night sky", "target_brightness": 0.1},
           {"prompt": "a grey wall", "target_brightness": 0.5}, {"prompt": "a snowfield", "target_brightness": 0.95}]
# [end:reward]


def build_policy():
    # [start:policy]
    from rlhf_image import FlowPolicy

    pipe = ovis_image_tiny(tokenizer=ovis_prefix_tokenizer(), seed=0)  # or OvisImagePipeline.from_pretrained(...)
    policy = FlowPolicy.from_pipeline(pipe, max_sequence_length=24)  # 256 for the real model
    # [end:policy]
    return policy


class StopAfter(TrainerCallback):
    """Stops training after `step` optimizer steps: stands in for a job that was killed."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def make_trainer(output_dir: str, max_steps: int, callbacks=None) -> GRPOTrainer:
    # [start:trainer]
    args = GRPOConfig(
        output_dir=output_dir, max_steps=max_steps, use_cpu=True, report_to=[], seed=0,
        num_generations=4,                  # images per prompt (a group)
        per_device_train_batch_size=4,      # images per micro-batch, also the sampler's micro-batch
        gradient_accumulation_steps=2,      # 2 micro-batches: a rollout of 2 prompts x 4 images per step
        resolution=32, num_inference_steps=4, guidance_scale=1.0, sde_type="sde", noise_level=0.7,
        learning_rate=1e-2, lr_scheduler_type="constant",
        save_strategy="steps", save_steps=1, save_total_limit=2,  # checkpoint-<step>/ folders to resume from
        log_samples_steps=1, num_log_samples=4,                    # PNG grid + JSON under output_dir/samples/
    )
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    trainer = GRPOTrainer(build_policy(), brightness_reward, args=args, train_dataset=dataset, peft_config=lora,
                          callbacks=callbacks)
    # [end:trainer]
    return trainer


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", default="grpo-ovis-resume")
    parser.add_argument("--max_steps", type=int, default=3)
    cli = parser.parse_args(argv)
    output_dir = cli.output_dir

    # The first job stops after 2 of its max_steps (a preemption, say); checkpoint-1 and checkpoint-2 exist.
    make_trainer(output_dir, cli.max_steps, callbacks=[StopAfter(2)]).train()

    # [start:resume]
    trainer = make_trainer(output_dir, cli.max_steps)       # a new process: same arguments, base model again
    trainer.train(resume_from_checkpoint=True)              # True: the newest checkpoint-* in output_dir
    trainer.save_model(output_dir)                          # pytorch_lora_weights.safetensors + README.md
    # [end:resume]

    # [start:load]
    pipe = ovis_image_tiny(tokenizer=ovis_prefix_tokenizer(), seed=0)    # the base pipeline
    pipe.transformer.load_lora_adapter(output_dir, prefix="transformer",  # stock diffusers
                                       weight_name="pytorch_lora_weights.safetensors")
    # [end:load]
    rewards = [e["rewards/brightness_reward/mean"] for e in trainer.state.log_history
               if "rewards/brightness_reward/mean" in e]
    files = sorted(os.listdir(output_dir))
    print(f"steps: {trainer.state.global_step}; mean reward per step: {rewards}")
    print(f"{output_dir}: {files}")
    return {"trainer": trainer, "pipe": pipe, "files": files, "rewards": rewards}


if __name__ == "__main__":
    main()
