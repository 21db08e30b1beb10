"""FlowMatchingTrainer step overhead on CPU: time per optimizer step of the trainer against the bare work
a step must do (frozen encoders when not cached, transformer forward + backward, AdamW step), on the tiny
Ovis-Image model and the simple text-rendering data.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_fm_step.py
"""

from __future__ import annotations

import os
import sys
import time

import torch
from transformers import TrainerCallback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlhf_image.recipes.ovis_image.data import TextRenderingDataset  # noqa: E402
from rlhf_image.recipes.ovis_image.model import ovis_image_tiny  # noqa: E402
from rlhf_image import FlowMatchingConfig, FlowMatchingTrainer  # noqa: E402
from rlhf_image.fm_trainer import BucketCollator  # noqa: E402
from rlhf_image.losses import flow_matching_loss, interpolate  # noqa: E402
from rlhf_image.policy import FlowPolicy  # noqa: E402

BATCH, STEPS, WARMUP, SIZE = 16, 30, 5, (32, 96)


def policy() -> FlowPolicy:
    return FlowPolicy.from_pipeline(ovis_image_tiny(hidden_size=64, num_heads=2, axes_dims_rope=(4, 14, 14)),
                                    max_sequence_length=32)


def bare(dataset, cached: bool) -> float:
    """Seconds per step of the minimum: (encoders) + forward + backward + clipping + AdamW (the Trainer's
    default fused one), on one fixed batch."""
    pol = policy()
    optimizer = torch.optim.AdamW(pol.transformer.parameters(), lr=1e-4, fused=True)
    batch = BucketCollator([SIZE] * len(dataset))([(i, dataset[i]) for i in range(BATCH)])
    cond, x0 = pol.encode_prompt(batch["prompts"]), pol.encode_images(batch["pixel_values"])
    times = []
    for step in range(WARMUP + STEPS):
        start = time.perf_counter()
        if not cached:
            cond, x0 = pol.encode_prompt(batch["prompts"]), pol.encode_images(batch["pixel_values"])
        sigmas = torch.rand(BATCH)
        x_t, target = interpolate(x0, torch.randn_like(x0), sigmas)
        loss = flow_matching_loss(pol.predict_velocity(x_t, sigmas, cond), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(pol.transformer.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return sum(times[WARMUP:]) / STEPS


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self.start = [], 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


def trainer_step(dataset, cached: bool) -> float:
    """Seconds per optimizer step of the trainer, after the first epoch (so a cache is warm)."""
    timer = StepTimer()
    args = FlowMatchingConfig(output_dir="/tmp/bench_fm_step", per_device_train_batch_size=BATCH,
                              resolution=SIZE[0], buckets=[f"{SIZE[0]}x{SIZE[1]}"], max_steps=WARMUP + STEPS,
                              learning_rate=1e-4, logging_steps=10**6, save_strategy="no", report_to="none",
                              use_cpu=True, disable_tqdm=True, cache_text_embeddings=cached, cache_latents=cached)
    FlowMatchingTrainer(policy(), args=args, train_dataset=dataset, callbacks=[timer]).train()
    return sum(timer.times[WARMUP:]) / STEPS


def main() -> None:
    # WARMUP steps cover the first epoch, so the cached rows measure cache hits only
    dataset = TextRenderingDataset(BATCH * WARMUP, mode="simple", vocabulary="digits", image_size=SIZE)
    print(f"tiny Ovis-Image (hidden 64), batch {BATCH}, {SIZE[0]}x{SIZE[1]}, {torch.get_num_threads()} threads, "
          f"mean of {STEPS} steps")
    print(f"{'encoders':<12}{'bare ms/step':>14}{'trainer ms/step':>17}{'ratio':>8}")
    for cached in (False, True):
        reference, ours = bare(dataset, cached), trainer_step(dataset, cached)
        print(f"{'cached' if cached else 'recomputed':<12}{reference * 1e3:>14.1f}{ours * 1e3:>17.1f}"
              f"{ours / reference:>8.2f}")


if __name__ == "__main__":
    main()
