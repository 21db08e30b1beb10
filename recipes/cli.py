"""The `rlhf-image` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Paste equally sized images into a grid, row by row."""
    width, height = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def demo(args: argparse.Namespace) -> Path:
    """Sample a grid of images from a randomly initialised tiny Ovis-Image model on the CPU."""
    import torch

    from recipes.ovis_image.model import ovis_image_tiny
    from rlhf_image.policy import FlowPolicy
    from rlhf_image.sampling import generate

    torch.set_num_threads(max(1, torch.get_num_threads()))
    policy = FlowPolicy.from_pipeline(ovis_image_tiny(seed=args.seed), max_sequence_length=32)
    prompts = [f'a poster that says "{word}"' for word in ("OVIS", "IMAGE", "RLHF", "2026")] * 2
    trajectory = generate(policy, prompts, list(range(len(prompts))), height=args.size, width=args.size,
                          num_steps=args.steps, sde_type="sde", guidance_scale=args.guidance_scale)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    path = output / "samples.png"
    image_grid(trajectory.pil_images(), columns=4).save(path)
    print(f"wrote {path} ({len(prompts)} samples, {args.steps} SDE steps, mean log-prob per step "
          f"{trajectory.log_probs.mean().item():.3f})")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf-image", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="sample a grid from a tiny Ovis-Image model on the CPU")
    demo_parser.add_argument("--output-dir", default="outputs/demo")
    demo_parser.add_argument("--size", type=int, default=64)
    demo_parser.add_argument("--steps", type=int, default=10)
    demo_parser.add_argument("--guidance-scale", type=float, default=3.0)
    demo_parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
