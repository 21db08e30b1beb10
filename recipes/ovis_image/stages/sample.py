"""`rlhf-image sample`: prompts -> images from a checkpoint (any stage's output folder), one seed per prompt,
with the library's sampler (`rlhf_image.sampling.generate`). Writes `sample_NNN.png`, `grid.png` and
`samples.jsonl` (prompt and seed of each image).

    rlhf-image sample --model outputs/ovis_tiny/grpo --prompts 'A sign that says "2048"' --height 48 --width 48
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from rlhf_image.metrics import image_grid
from rlhf_image.sampling import generate

from .args import ModelArguments
from .common import StageResult, describe_model, inference_policy, print_banner
from .inputs import read_prompts


@dataclass
class SampleArguments:
    prompts: list[str] = field(default_factory=list, metadata={"help": "Prompts (one image each)."})
    prompts_file: str | None = field(
        default=None, metadata={"help": "More prompts: a text file (one per line) or JSONL with a 'prompt' column."})
    output_dir: str = field(default="outputs/samples", metadata={"help": "Where the images go."})
    height: int = field(default=1024, metadata={"help": "Image height in pixels."})
    width: int = field(default=1024, metadata={"help": "Image width in pixels."})
    num_inference_steps: int = field(default=50, metadata={"help": "Denoising steps."})
    guidance_scale: float = field(default=5.0, metadata={"help": "True CFG scale (1 = no CFG)."})
    sde_type: str = field(default="ode", metadata={"help": "'ode' (Euler), 'sde' or 'cps'."})
    noise_level: float = field(default=0.7, metadata={"help": "Noise scale of 'sde' / 'cps'."})
    seed: int = field(default=0, metadata={"help": "Prompt i is sampled with seed + i."})
    micro_batch_size: int = field(default=4, metadata={"help": "Transformer rows per call."})
    grid_columns: int = field(default=4, metadata={"help": "Columns of grid.png."})


ARGUMENTS = (ModelArguments, SampleArguments)


def run(model_args: ModelArguments, args: SampleArguments) -> StageResult:
    prompts = read_prompts(args.prompts, args.prompts_file)
    policy = inference_policy(model_args)
    print_banner("sample", {"model": describe_model(model_args, policy.transformer),
                            "sampling": {"prompts": len(prompts), "size": f"{args.height}x{args.width}",
                                         "steps": args.num_inference_steps, "sampler": args.sde_type,
                                         "guidance_scale": args.guidance_scale, "seed": args.seed},
                            "output_dir": args.output_dir})
    seeds = [args.seed + i for i in range(len(prompts))]
    images = generate(policy, prompts, seeds, height=args.height, width=args.width, num_steps=args.num_inference_steps,
                      sde_type=args.sde_type, noise_level=args.noise_level, guidance_scale=args.guidance_scale,
                      micro_batch_size=args.micro_batch_size).pil_images()
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "samples.jsonl"), "w", encoding="utf-8") as f:
        for i, (prompt, seed, image) in enumerate(zip(prompts, seeds, images)):
            image.save(os.path.join(args.output_dir, f"sample_{i:03d}.png"))
            row = {"file": f"sample_{i:03d}.png", "prompt": prompt, "seed": seed}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    image_grid(images, columns=min(args.grid_columns, len(images))).save(os.path.join(args.output_dir, "grid.png"))
    print(f"[rlhf-image] sample: {len(images)} images in {args.output_dir}", flush=True)
    return StageResult("sample", args.output_dir, {"stage": "sample", "prompts": prompts, "seeds": seeds})
