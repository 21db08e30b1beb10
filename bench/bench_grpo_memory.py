"""Peak tensor memory of one GRPO micro-step (the loss over its trained timesteps and the backward pass) against
the number of trained timesteps: 1, 2, 4 and 8 of 8 recorded steps.

A micro-step that keeps the autograd graphs of all its trained timesteps alive until one backward grows
linearly with their number; one backward per trained timestep keeps it flat. The rollout before the micro-step
and the optimizer step after it are not counted: tracking starts once the micro-batch is handed out and stops
when the backward has run.

On CPU the tensor memory is tracked op by op (a dispatch mode records the storage of every tensor an op creates
and drops it when the storage is freed: the peak of the live bytes); on a GPU it is
`torch.cuda.max_memory_allocated` above the memory held when the micro-step starts.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_grpo_memory.py                 # CPU, tiny Ovis-Image, 64x64 px
    .venv/bin/python bench/bench_grpo_memory.py --device cuda --resolution 256 --hidden 256
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile

import diffusers
import numpy as np
import torch
import transformers
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers.trainer_callback import PrinterCallback, ProgressCallback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlhf_image import GRPOConfig, GRPOTrainer  # noqa: E402
from rlhf_image.policy import FlowPolicy  # noqa: E402
from rlhf_image.recipes.ovis_image.model import ovis_image_tiny, ovis_prefix_tokenizer  # noqa: E402

PROMPTS = ["a cat", "a dog", "a red house", "the sea", "a tree", "the sun", "a car", "a boat"]
RECORDED_STEPS = 8


def brightness(prompts, images, **columns):
    return [float(np.asarray(image, dtype=np.float32).mean() / 255) for image in images]


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the storages created by the ops run under this mode that are still alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [key for key, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key not in self.live:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


class MeasuredGRPOTrainer(GRPOTrainer):
    """Measures every micro-step from the hand-out of its micro-batch to the end of its backward."""

    peaks: list[int]

    def _prepare_inputs(self, rows):
        inputs = super()._prepare_inputs(rows)  # the rollout, when one is due, runs here: not counted
        if self.args.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start_bytes = torch.cuda.memory_allocated()
        else:
            self._tracker = LiveTensorBytes()
            self._tracker.__enter__()
        return inputs

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.args.device.type == "cuda":
            torch.cuda.synchronize()
            self.peaks.append(torch.cuda.max_memory_allocated() - self._start_bytes)
        else:
            self._tracker.__exit__(None, None, None)
            self.peaks.append(self._tracker.peak)
        return loss


def measure(num_trained: int, args) -> int:
    torch.manual_seed(0)
    pipe = ovis_image_tiny(tokenizer=ovis_prefix_tokenizer(), hidden_size=args.hidden, num_heads=args.hidden // 16,
                           axes_dims_rope=(4, 6, 6), num_layers=args.layers, num_single_layers=args.layers)
    policy = FlowPolicy.from_pipeline(pipe, max_sequence_length=24)
    with tempfile.TemporaryDirectory() as output_dir:
        config = GRPOConfig(
            output_dir=output_dir, use_cpu=args.device == "cpu", report_to=[], disable_tqdm=True, seed=0,
            num_generations=4, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
            num_inference_steps=RECORDED_STEPS, timestep_fraction=num_trained / RECORDED_STEPS,
            resolution=args.resolution, guidance_scale=1.0, max_steps=args.steps, learning_rate=1e-3,
            save_strategy="no", log_samples_steps=0, logging_steps=1, peak_flops=1e12)
        trainer = MeasuredGRPOTrainer(policy, brightness, args=config,
                                      train_dataset=[{"prompt": p} for p in PROMPTS])
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.peaks = []
        trainer.train()
    return max(trainer.peaks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps measured (the max is reported)")
    args = parser.parse_args()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    device = torch.device(args.device)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"tiny Ovis-Image (hidden {args.hidden}, {args.layers}+{args.layers} blocks), {args.resolution} px, "
          f"micro-batch {args.batch}, {RECORDED_STEPS} recorded steps; peak over {args.steps} micro-steps\n")
    print("| trained timesteps | peak tensor memory (MiB) | vs 1 timestep |")
    print("|---|---|---|")
    first = None
    for num_trained in (1, 2, 4, 8):
        peak = measure(num_trained, args)
        first = first or peak
        print(f"| {num_trained} | {peak / 2**20:.2f} | {peak / first:.2f} |")


if __name__ == "__main__":
    main()
