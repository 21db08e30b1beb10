"""OCR reward throughput: images/s for det+rec and rec-only on rendered text at a few sizes.

    ORT_DISABLE_TELEMETRY=1 .venv/bin/python bench/bench_ocr.py [--n 32] [--threads 2]

Each image holds one line of random upper-case words (DejaVu Sans Bold) centred on white. The
table gives images/s per mode, the ratio rec-only / det+rec, and the fraction of images whose text
was read exactly (rec-only is meant for tight single-line images; on a large canvas the line ends
up tiny after the recogniser's resize to 48 pixels high).
"""

from __future__ import annotations

import argparse
import os
import random
import string
import sys
import time
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from rlhf_image.rewards.ocr import OCRReward  # noqa: E402
from rlhf_image.rewards.text_match import normalize_text  # noqa: E402

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
SIZES = [(64, 256), (256, 256), (512, 512)]  # (height, width)


def render(text: str, height: int, width: int) -> Image.Image:
    font_size = max(8, height // 2) if height < width else width // 8
    face = ImageFont.truetype(FONT, font_size)
    while face.getlength(text) > 0.9 * width and font_size > 6:
        font_size -= 1
        face = ImageFont.truetype(FONT, font_size)
    image = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(image).text((width / 2, height / 2), text, fill="black", font=face, anchor="mm")
    return image


def measure(reward: OCRReward, images: list[Image.Image], texts: list[str]) -> tuple[float, float]:
    reward.ocr_text(images[:2])  # warm-up: first calls load the ONNX sessions
    start = time.perf_counter()
    reads = reward.ocr_text(images)
    elapsed = time.perf_counter() - start
    exact = sum(normalize_text(r) == normalize_text(t) for r, t in zip(reads, texts)) / len(texts)
    return len(images) / elapsed, exact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="images per size")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    args = parser.parse_args()
    rng = random.Random(0)
    words = ["".join(rng.choice(string.ascii_uppercase) for _ in range(rng.randint(3, 7))) for _ in range(4 * args.n)]
    det = OCRReward(use_det=True, num_threads=args.threads)
    rec = OCRReward(use_det=False, num_threads=args.threads)
    threads = args.threads or "all"
    print(f"OCR throughput, {args.n} images per size, onnxruntime threads: {threads} (cpus: {os.cpu_count()})")
    header = ["size (HxW)", "det+rec img/s", "rec-only img/s", "ratio", "exact det", "exact rec"]
    print(" | ".join(f"{h:>11}" if i == 0 else h for i, h in enumerate(header)))
    print("-" * 78)
    for height, width in SIZES:
        texts = [" ".join(words[2 * i: 2 * i + 2]) for i in range(args.n)]
        images = [render(t, height, width) for t in texts]
        det_speed, det_exact = measure(det, images, texts)
        rec_speed, rec_exact = measure(rec, images, texts)
        print(f"{height:>5}x{width:<5} | {det_speed:>13.1f} | {rec_speed:>14.1f} | {rec_speed / det_speed:>5.2f} | "
              f"{det_exact:>9.2f} | {rec_exact:>9.2f}")


if __name__ == "__main__":
    main()
