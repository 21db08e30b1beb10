"""One check of the GPU paths on one H100/H200, with the full-size Ovis-Image transformer at random init.

Prints one table: the measured bf16 matmul peak; pretraining step time and MFU at 512 px with gradient
checkpointing off and on; GRPO rollout and train phase times with their MFU at 512 px (LoRA and full weights); the
library's sampler against diffusers' `OvisImagePipeline` in seconds per image at 1024 px, 50 steps, true CFG 5.0
(the Ovis-Image technical report: 13.74 s on one H100); and the peak GPU memory of each phase.

Goals: training (pretraining and GRPO's train phase) at >= 40% MFU of the measured matmul peak; the sampler no
slower than the diffusers pipeline (ratio <= 1.00).

What runs, on one GPU:
- The model is the 7.37B MMDiT of `ovis_image_7b_transformer` (the report's architecture, random weights) with a
  real-size FLUX VAE (random) and a one-layer Qwen3 text encoder of the right width (the 2B encoder's weights are
  not needed to time the transformer; both samplers use the same encoder).
- Pretraining on one GPU is plain bf16: bf16 weights, gradients and AdamW states (fused), no fp32 master copy and
  no ZeRO (7.37B parameters x 16 bytes of fp32 master weights and AdamW states do not fit 80 GB; ZeRO-2 with one
  process shards nothing). A step is the flow-matching loss on a batch of noised latents, backward and AdamW.
- GRPO runs [`~rlhf_image.GRPOTrainer`] itself (`bf16=True`, `beta=0`) and reads its logged `time/rollout`,
  `time/train`, `mfu/rollout`, `mfu/train`; full weights train the bf16 transformer as above.
- MFU counts the model's FLOPs (forward from `rlhf_image.metrics.forward_flops`, backward twice that), not the
  recomputation of gradient checkpointing.

The check is sized to finish within 8 minutes on one H100 (model build, 3 timed steps per pretraining row, one
warm-up and one timed GRPO step per row, one warm-up and one timed image per sampler); it has not yet been run on a
GPU, so that budget is an estimate.

    .venv/bin/python bench/gpu_check.py              # on a GPU machine
    .venv/bin/python bench/gpu_check.py --dry-run    # the same code on the CPU with a tiny model, in seconds
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_grpo_step import PROMPTS, brightness, build_pipeline  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from rlhf_image import GRPOConfig, GRPOTrainer  # noqa: E402
from rlhf_image.losses import interpolate  # noqa: E402
from rlhf_image.metrics import forward_flops, measure_peak_flops, mfu, synchronize  # noqa: E402
from rlhf_image.policy import FlowPolicy  # noqa: E402
from rlhf_image.sampling import generate  # noqa: E402

REPORT_SECONDS_PER_IMAGE = 13.74  # Ovis-Image technical report, one H100, 1024 px, 50 steps, CFG 5.0


def sizes(dry_run: bool) -> dict:
    """Image sizes and step counts: the check's, or the dry run's tiny ones."""
    if dry_run:
        return dict(train_px=32, sample_px=32, sample_steps=2, rollout_steps=2, pretrain_batch=2, pretrain_steps=2,
                    grpo_batch=2, group=2)
    return dict(train_px=512, sample_px=1024, sample_steps=50, rollout_steps=10, pretrain_batch=2, pretrain_steps=3,
                grpo_batch=4, group=4)


class PeakMemory:
    """Peak GPU memory allocated inside a `with` block, in GiB (`None` on the CPU)."""

    def __init__(self, device: torch.device):
        self.device, self.gib = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.gib = torch.cuda.max_memory_allocated(self.device) / 2**30


def pretrain_row(policy: FlowPolicy, size: dict, checkpointing: bool, peak: float) -> dict:
    """Median step time and MFU of flow-matching pretraining steps (plain bf16, fused AdamW on the GPU)."""
    device, transformer = policy.device, policy.transformer
    transformer.train()
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=1e-5, fused=device.type == "cuda")
    batch, px = size["pretrain_batch"], size["train_px"]
    cond = policy.encode_prompt((PROMPTS * batch)[:batch])
    generator = torch.Generator(device).manual_seed(0)
    shape = (batch, policy.num_latent_channels, *policy.latent_size(px, px))
    flops = 3 * forward_flops(policy, cond, px, px, batch)  # forward + backward (twice the forward)
    seconds = []
    with PeakMemory(device) as memory:
        for _ in range(1 + size["pretrain_steps"]):  # the first step warms up
            synchronize(device)
            start = time.perf_counter()
            x0 = torch.randn(shape, generator=generator, device=device)
            noise = torch.randn(shape, generator=generator, device=device)
            sigma = torch.rand(batch, generator=generator, device=device)
            x_t, target = interpolate(x0, noise, sigma)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                velocity = policy.predict_velocity(x_t, sigma, cond)
            (velocity.float() - target).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            seconds.append(time.perf_counter() - start)
    if checkpointing:
        transformer.disable_gradient_checkpointing()
    del optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    step = statistics.median(seconds[1:])
    return dict(phase=f"pretrain {px}px, checkpointing {'on' if checkpointing else 'off'}", seconds=step,
                mfu=mfu(flops, step, peak), memory=memory.gib,
                note=f"batch {batch}, plain bf16 + AdamW, one process on {device.type}")


class StepPeak(TrainerCallback):
    """Peak GPU memory of the last GRPO step (its rollout and train phases)."""

    def __init__(self, device: torch.device):
        self.memory = PeakMemory(device)

    def on_step_begin(self, args, state, control, **kwargs):
        self.memory.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        self.memory.__exit__()


def grpo_rows(pipe, size: dict, lora: bool, device: torch.device, output_dir: str) -> list[dict]:
    """GRPO's rollout and train phases (one warm-up step, one timed), from the trainer's own logs."""
    config = GRPOConfig(
        output_dir=output_dir, use_cpu=device.type == "cpu", report_to=[], disable_tqdm=True, bf16=True,
        num_generations=size["group"], per_device_train_batch_size=size["grpo_batch"], gradient_accumulation_steps=1,
        num_inference_steps=size["rollout_steps"], resolution=size["train_px"], guidance_scale=1.0, beta=0.0,
        max_steps=2, learning_rate=1e-5, save_strategy="no", log_samples_steps=0, logging_steps=1, seed=0,
        optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch")
    peft_config = LoraConfig(r=64, lora_alpha=64, target_modules=["to_q", "to_k", "to_v", "to_out.0"]) if lora \
        else None
    peak = StepPeak(device)
    trainer = GRPOTrainer(pipe, brightness, args=config, train_dataset=[{"prompt": p} for p in PROMPTS],
                          peft_config=peft_config, callbacks=[peak])
    trainer.train()
    last = [entry for entry in trainer.state.log_history if "time/train" in entry][-1]
    if lora:
        pipe.transformer = trainer.policy.transformer.unload()  # the base model again, without the adapter
    del trainer
    name = "LoRA r=64" if lora else "full"
    note = f"{size['grpo_batch']} images, {size['rollout_steps']} steps; memory: peak of the step"
    return [dict(phase=f"GRPO {name} {phase} {size['train_px']}px", seconds=last[f"time/{phase}"],
                 mfu=last[f"mfu/{phase}"], memory=peak.memory.gib, note=note) for phase in ("rollout", "train")]


def sampler_rows(pipe, policy: FlowPolicy, size: dict, device: torch.device) -> list[dict]:
    """Seconds per image of `rlhf_image.sampling.generate` and of `OvisImagePipeline.__call__` (ODE, true CFG 5.0),
    each after one warm-up image."""
    px, steps = size["sample_px"], size["sample_steps"]
    pipe.transformer.eval()
    results = {}
    for name in ("sampler", "pipeline"):
        seconds = []
        with PeakMemory(device) as memory, torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            for seed in range(2):
                synchronize(device)
                start = time.perf_counter()
                if name == "sampler":
                    generate(policy, [PROMPTS[0]], [seed], height=px, width=px, num_steps=steps, guidance_scale=5.0,
                             micro_batch_size=1)
                else:
                    pipe(PROMPTS[0], guidance_scale=5.0, height=px, width=px, num_inference_steps=steps,
                         generator=torch.Generator(device).manual_seed(seed), output_type="pil")
                synchronize(device)
                seconds.append(time.perf_counter() - start)
        results[name] = (seconds[-1], memory.gib)
    ratio = results["sampler"][0] / results["pipeline"][0]
    return [dict(phase=f"sampler {px}px, {steps} steps, CFG 5", seconds=results["sampler"][0], mfu=None,
                 memory=results["sampler"][1], note=f"{ratio:.2f}x the pipeline's time (goal <= 1.00)"),
            dict(phase=f"OvisImagePipeline {px}px, {steps} steps, CFG 5", seconds=results["pipeline"][0], mfu=None,
                 memory=results["pipeline"][1], note=f"report: {REPORT_SECONDS_PER_IMAGE} s on one H100")]


def format_table(rows: list[dict]) -> str:
    """The rows as one Markdown table (`-` where a value does not apply or was not measured)."""
    def cell(value, fmt):
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)

    lines = ["| phase | seconds | MFU | peak memory GiB | note |", "|---|---|---|---|---|"]
    for row in rows:
        mfu_cell = "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        lines.append(f"| {row['phase']} | {cell(row['seconds'], '.3f')} | {mfu_cell} | "
                     f"{cell(row['memory'], '.1f')} | {row['note']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU, tiny model and sizes")
    parser.add_argument("--output-dir", default="/tmp/gpu_check")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA GPU: run with --dry-run on the CPU")
    device = torch.device("cpu" if args.dry_run else "cuda")
    size = sizes(args.dry_run)
    start = time.perf_counter()

    pipe = build_pipeline("tiny" if args.dry_run else "full")
    pipe.to(device, torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    policy = FlowPolicy.from_pipeline(pipe)
    peak = measure_peak_flops(device, torch.bfloat16)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    params = sum(p.numel() for p in pipe.transformer.parameters())
    rows = [dict(phase="bf16 matmul peak", seconds=None, mfu=None, memory=None,
                 note=f"{peak / 1e12:.1f} TFLOP/s measured")]
    rows += [pretrain_row(policy, size, checkpointing, peak) for checkpointing in (False, True)]
    for lora in (True, False):
        rows += grpo_rows(pipe, size, lora, device, os.path.join(args.output_dir, "lora" if lora else "full"))
    rows += sampler_rows(pipe, policy, size, device)
    print(f"{name}; Ovis-Image transformer {params / 1e9:.3g}B parameters (random init), bf16; "
          f"goals: training MFU >= 40%, sampler <= 1.00x the pipeline")
    print(format_table(rows))
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
