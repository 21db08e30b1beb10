"""Learning curve of the CPU demo's tiny Ovis-Image model on 4-digit renders (issue 7's measurement).

    OMP_NUM_THREADS=1 ORT_DISABLE_TELEMETRY=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_tiny_text_learning.py \
        [--batch-size 8] [--steps 1200] [--eval-at 600,800,900,1000,1100,1200] [--seed 0] [--threads 1]

`ovis_image_tiny_text()` (frozen random Qwen3 text encoder, `ovis_prefix_tokenizer`), its VAE fitted by
`fit_tiny_vae` on 512 training renders, then a plain rectified-flow loop over the library's core
(`FlowPolicy.predict_velocity`, `interpolate`, `flow_matching_loss`, `sample_training_sigmas` with the
resolution shift), AdamW with linear warm-up, gradient clipping at 1, EMA with warm-up
(`min(decay, (1 + t) / (10 + t))`) and 10% empty prompts for CFG, on a pool of `--pool` training renders
(latents and text states precomputed). At each `--eval-at` step the EMA weights render the held-out
prompts (`held_out_prompts`, strings never in training) with the ODE sampler (20 steps, CFG 1 and 3)
and OCR scores them. The table gives training wall and CPU seconds (process time, all threads; on a
shared machine the CPU seconds are the reliable figure), exact match and NED per CFG scale.
This is a measurement, not the recipe: the demo trains with `rlhf_image.FlowMatchingTrainer`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rlhf_image.recipes.ovis_image.data import TextRenderingDataset  # noqa: E402
from rlhf_image.recipes.ovis_image.evaluate import evaluate_text_rendering, held_out_prompts  # noqa: E402
from rlhf_image.recipes.ovis_image.model import TINY_TEXT_MAX_SEQUENCE_LENGTH, ovis_image_tiny_text  # noqa: E402
from rlhf_image.recipes.ovis_image.tiny_vae import fit_tiny_vae  # noqa: E402
from rlhf_image.rewards import OCRReward  # noqa: E402
from rlhf_image.losses import flow_matching_loss, interpolate  # noqa: E402
from rlhf_image.policy import Conditioning, FlowPolicy  # noqa: E402
from rlhf_image.schedule import sample_training_sigmas, shift_training_sigmas  # noqa: E402

HEIGHT, WIDTH = 32, 96


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--pool", type=int, default=4096, help="training renders")
    parser.add_argument("--eval-at", default="600,800,900,1000,1100,1200")
    parser.add_argument("--num-eval", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    eval_at = {int(s) for s in args.eval_at.split(",")}

    pipe = ovis_image_tiny_text(seed=args.seed)
    data = TextRenderingDataset(args.pool, vocabulary="digits", min_length=4, max_length=4, image_size=(HEIGHT, WIDTH))
    items = [data[i] for i in range(args.pool)]
    vae_fit = fit_tiny_vae(pipe.vae, [item["image"] for item in items[:512]], num_steps=300, seed=args.seed)
    print(f"VAE fit: {vae_fit.num_steps} steps, {vae_fit.seconds:.1f} s wall, {vae_fit.cpu_seconds:.1f} CPU s, "
          f"reconstruction L1 {vae_fit.recon_l1:.4f}")
    policy = FlowPolicy.from_pipeline(pipe, max_sequence_length=TINY_TEXT_MAX_SEQUENCE_LENGTH)
    chunks = range(0, args.pool, 256)
    latents = torch.cat([policy.encode_images([it["image"] for it in items[i:i + 256]]) for i in chunks])
    states = torch.cat([policy.encode_prompt([it["prompt"] for it in items[i:i + 256]]).prompt_embeds for i in chunks])
    empty = policy.encode_prompt([""]).prompt_embeds.expand(args.batch_size, -1, -1)
    prompts, targets = held_out_prompts(args.num_eval)
    seeds = list(range(1000, 1000 + len(prompts)))
    ocr = OCRReward(use_det=False, num_threads=args.threads)

    transformer = policy.transformer.train().requires_grad_(True)
    params = list(transformer.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(0.9, 0.99), weight_decay=0.0)
    ema = [p.detach().clone() for p in params]
    image_seq_len = policy.image_seq_len(HEIGHT, WIDTH)
    generator = torch.Generator().manual_seed(args.seed)
    wall = cpu = 0.0
    rows = []
    for step in range(1, args.steps + 1):
        start, cpu_start = time.perf_counter(), time.process_time()
        index = torch.randint(args.pool, (args.batch_size,), generator=generator)
        drop = torch.rand(args.batch_size, generator=generator) < 0.1
        cond = Conditioning(torch.where(drop[:, None, None], empty, states[index]))
        sigma = shift_training_sigmas(sample_training_sigmas(args.batch_size, generator=generator), image_seq_len,
                                      policy.scheduler_config)
        x_t, target = interpolate(latents[index], torch.randn(latents[index].shape, generator=generator), sigma)
        for group in optimizer.param_groups:
            group["lr"] = args.learning_rate * min(1.0, step / args.warmup)
        loss = flow_matching_loss(policy.predict_velocity(x_t, sigma, cond), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for shadow, p in zip(ema, params):
                shadow.lerp_(p, 1 - decay)
        wall += time.perf_counter() - start
        cpu += time.process_time() - cpu_start
        if step not in eval_at:
            continue
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, shadow in zip(params, ema):
                p.copy_(shadow)
        transformer.eval()
        row = [step, wall, cpu, loss.item()]
        for scale in (1.0, 3.0):
            result = evaluate_text_rendering(policy, prompts, targets, seeds, ocr=ocr, guidance_scale=scale,
                                             micro_batch_size=32)
            row += [result.word_accuracy, result.mean_ned]
        rows.append(row)
        print(f"step {step}: exact {row[4]:.3f} / {row[6]:.3f} (cfg 1 / 3)", flush=True)
        with torch.no_grad():
            for p, saved in zip(params, backup):
                p.copy_(saved)
        transformer.train()

    print(f"\nbatch {args.batch_size}, lr {args.learning_rate}, {args.threads} thread(s), "
          f"{len(prompts)} held-out prompts")
    print("| steps | train wall s | train CPU s | CPU s/step | loss | exact cfg1 | NED cfg1 | exact cfg3 | NED cfg3 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for step, w, c, lv, e1, n1, e3, n3 in rows:
        print(f"| {step} | {w:.0f} | {c:.0f} | {c / step:.2f} | {lv:.3f} | {e1:.2f} | {n1:.3f} | {e3:.2f} | {n3:.3f} |")


if __name__ == "__main__":
    main()
