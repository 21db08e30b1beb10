"""GRPO step time against the bare cost of the transformer passes that step must do.

A GRPO step (num_iterations=1) samples `batch * accum` images (`num_inference_steps` transformer calls per
micro-batch, twice with CFG), scores them, and trains on every micro-batch (a forward and a backward per
trained step). The bare cost is those same transformer calls, at the same shapes on the same model, timed
alone: rollout forwards under `no_grad` plus training forward+backward. The ratio is what the trainer
adds (text encoding, VAE decoding, rewards, log-probs, optimizer, bookkeeping); the target is <= 1.15.

    python bench/bench_grpo_step.py                                  # CPU, small model, float32
    python bench/bench_grpo_step.py --device cuda --dtype bfloat16 --full-size --resolution 512
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, OvisImagePipeline  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import Qwen3Config, Qwen3Model, TrainerCallback  # noqa: E402

from rlhf_image.recipes.ovis_image.model import (SCHEDULER_CONFIG, byte_level_tokenizer, ovis_image_7b_transformer,  # noqa: E402
                                      ovis_image_tiny)
from rlhf_image import GRPOConfig, GRPOTrainer  # noqa: E402
from rlhf_image.metrics import synchronize  # noqa: E402
from rlhf_image.schedule import inference_sigmas  # noqa: E402

PROMPTS = ["a red cat", "a blue dog", "a poster that says HELLO", "a city at night", "a bowl of fruit",
           "a mountain lake", "an old car", "a paper boat"]


def brightness(prompts, images, **columns):
    return [float(np.asarray(image, dtype=np.float32).mean() / 255) for image in images]


def build_pipeline(size: str) -> OvisImagePipeline:
    if size == "tiny":
        return ovis_image_tiny()
    if size == "small":
        return ovis_image_tiny(hidden_size=128, num_heads=4, num_layers=2, num_single_layers=2,
                               axes_dims_rope=(8, 12, 12), text_hidden_size=64, vae_mid_block_attention=False)
    # The 7.37B MMDiT at random init with a real-size FLUX VAE; the text encoder is a one-layer Qwen3 of the
    # right width (its cost is not the subject here and the 2B encoder's weights are not downloaded).
    transformer = ovis_image_7b_transformer(torch_dtype=torch.bfloat16, device="cuda" if torch.cuda.is_available()
                                            else "cpu")
    tokenizer = byte_level_tokenizer()
    width = transformer.config.joint_attention_dim
    text_encoder = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                                          num_hidden_layers=1, num_attention_heads=16, num_key_value_heads=8,
                                          head_dim=128, max_position_embeddings=1024))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        layers_per_block=2, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
                        use_quant_conv=False, use_post_quant_conv=False)
    return OvisImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae.eval(),
                             text_encoder=text_encoder.eval(), tokenizer=tokenizer, transformer=transformer.eval())


class Interleaved(TrainerCallback):
    """Times every GRPO step, and right after it the bare passes of one step: alternating the two keeps a
    machine's changing load from favouring either side."""

    def __init__(self, device):
        self.device, self.trainer = device, None
        self.steps, self.bare_rollout, self.bare_train = [], [], []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        synchronize(self.device)
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        synchronize(self.device)
        self.steps.append(time.perf_counter() - self._start)
        rollout, train = bare_costs(self.trainer)
        self.bare_rollout.append(rollout)
        self.bare_train.append(train)


def bare_costs(trainer) -> tuple[float, float]:
    """Seconds of the rollout forwards and of the training forwards+backwards of one GRPO step, on the same
    model at the same shapes (the gradients it leaves are cleared)."""
    args, policy = trainer.args, trainer.policy
    device = torch.device(args.device)
    mb, accum, steps = args.per_device_train_batch_size, args.gradient_accumulation_steps, args.num_inference_steps
    cfg = args.guidance_scale > 1
    cond = policy.encode_prompt(PROMPTS[:mb])
    negative = policy.encode_prompt([""] * mb) if cfg else None
    latents = torch.randn(mb, policy.num_latent_channels, *policy.latent_size(args.resolution, args.resolution),
                          device=device)
    sigmas = inference_sigmas(steps, policy.image_seq_len(args.resolution, args.resolution), policy.scheduler_config)
    trained = max(1, int(args.timestep_fraction * steps))
    train_scale = args.guidance_scale if args.train_with_cfg else 1.0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad(), autocast:
        for _ in range(accum):  # rollout micro-batches
            for step in range(steps):
                policy.predict_velocity(latents, sigmas[step], cond, negative, args.guidance_scale)
    synchronize(device)
    rollout = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(accum):
        for step in range(trained):
            with autocast:
                velocity = policy.predict_velocity(latents, sigmas[step], cond, negative if train_scale > 1 else None,
                                                   train_scale)
            velocity.float().square().mean().backward()
    synchronize(device)
    train = time.perf_counter() - start
    trainer.model.zero_grad(set_to_none=True)
    return rollout, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "small", "full"], default="small")
    parser.add_argument("--full-size", action="store_true", help="the 7B Ovis-Image transformer (same as --size full)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="bfloat16 trains with bf16 autocast (the Trainer's bf16=True)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--num-inference-steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4, help="per_device_train_batch_size (= sampling micro-batch)")
    parser.add_argument("--accum", type=int, default=2, help="gradient_accumulation_steps")
    parser.add_argument("--group", type=int, default=4, help="num_generations")
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--full-finetune", action="store_true", help="train all weights instead of a LoRA")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="measured GRPO steps")
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    size = "full" if args.full_size else args.size
    device = torch.device(args.device)

    pipe = build_pipeline(size)
    if size == "full":
        pipe.to(device)
    config = GRPOConfig(
        output_dir="/tmp/bench_grpo_step", use_cpu=device.type == "cpu", report_to=[], disable_tqdm=True,
        bf16=args.dtype == "bfloat16", num_generations=args.group, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.accum, num_inference_steps=args.num_inference_steps,
        resolution=args.resolution, guidance_scale=args.guidance_scale, max_steps=args.warmup + args.steps,
        learning_rate=1e-4, save_strategy="no", log_samples_steps=0, logging_steps=1, seed=0)
    peft_config = None if args.full_finetune else LoraConfig(
        r=args.lora_rank, lora_alpha=args.lora_rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    timer = Interleaved(device)
    dataset = [{"prompt": p} for p in PROMPTS * 8]
    trainer = GRPOTrainer(pipe, brightness, args=config, train_dataset=dataset, peft_config=peft_config,
                          callbacks=[timer])
    timer.trainer = trainer
    trainer.train()
    measured = [e for e in trainer.state.log_history if "time/train" in e][args.warmup:]
    phase = {key: statistics.median(e[key] for e in measured)
             for key in ("time/rollout", "time/reward", "time/rollout_overhead", "time/train", "mfu/rollout",
                         "mfu/train", "mfu/total")}
    step = statistics.median(timer.steps[args.warmup:])
    bare_rollout = statistics.median(timer.bare_rollout[args.warmup:])
    bare_train = statistics.median(timer.bare_train[args.warmup:])
    bare = statistics.median(r + t for r, t in zip(timer.bare_rollout[args.warmup:], timer.bare_train[args.warmup:]))
    # Per-step ratios (each GRPO step against the bare passes timed right after it).
    ratios = [s / (r + t) for s, r, t in zip(timer.steps, timer.bare_rollout, timer.bare_train)][args.warmup:]

    params = sum(p.numel() for p in trainer.policy.transformer.parameters())
    print(f"model: Ovis-Image transformer '{size}' ({params / 1e6:.1f}M params, "
          f"{'full fine-tune' if args.full_finetune else f'LoRA r={args.lora_rank}'}), {args.device} {args.dtype}, "
          f"{args.resolution}px, {args.num_inference_steps} steps, {args.batch}x{args.accum} images/step, "
          f"CFG {args.guidance_scale}, median of {args.steps} steps after {args.warmup} warm-up")
    rows = [
        ("rollout: sampling + decode", phase["time/rollout"], bare_rollout),
        ("reward", phase["time/reward"], None),
        ("trainer bookkeeping around the rollout", phase["time/rollout_overhead"], None),
        ("train: fwd + bwd + optimizer", phase["time/train"], bare_train),
        ("whole GRPO step", step, bare),
    ]
    print(f"| {'phase':40s} | {'GRPO step (ms)':>14s} | {'bare fwd/bwd (ms)':>17s} | {'ratio':>6s} |")
    print(f"|{'-' * 42}|{'-' * 16}|{'-' * 19}|{'-' * 8}|")
    for name, measured_s, bare_s in rows:
        ratio = f"{measured_s / bare_s:6.3f}" if bare_s else f"{'':6s}"
        bare_text = f"{bare_s * 1e3:17.1f}" if bare_s else f"{'':17s}"
        print(f"| {name:40s} | {measured_s * 1e3:14.1f} | {bare_text} | {ratio} |")
    print(f"per-step ratios: {' '.join(f'{r:.3f}' for r in ratios)}")
    print(f"overhead of the whole step over its bare passes (median per-step ratio): "
          f"{100 * (statistics.median(ratios) - 1):.1f}% (target <= 15%); "
          f"MFU rollout {phase['mfu/rollout']:.3f}, train {phase['mfu/train']:.3f}, "
          f"whole step {phase['mfu/total']:.3f} "
          f"of the measured matmul peak")


if __name__ == "__main__":
    main()
