"""Shared fixtures for the reward tests: text renders with real fonts, OCR engines, a tiny CLIP."""

from __future__ import annotations

import string
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image, ImageDraw, ImageFont

LATIN_FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")
CJK_FONT = Path("/usr/share/fonts/opentype/noto/NotoSansCJK-Bold.ttc")


def render_text(text: str, size: tuple[int, int] = (256, 64), font: str = "latin") -> Image.Image:
    """Black text centred on white, `size` = (width, height); the font shrinks until the text fits.

    `font` is `"latin"` (DejaVu Sans Bold) or `"cjk"` (Noto Sans CJK Bold).
    """
    font_path = {"latin": LATIN_FONT, "cjk": CJK_FONT}[font]
    if not font_path.exists():
        pytest.skip(f"font {font_path} is not installed (make fonts)")
    width, height = size
    font_size = int(height * 0.6)
    face = ImageFont.truetype(str(font_path), font_size)
    while face.getlength(text) > 0.92 * width and font_size > 6:
        font_size -= 1
        face = ImageFont.truetype(str(font_path), font_size)
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text((width / 2, height / 2), text, fill="black", font=face, anchor="mm")
    return image


@pytest.fixture(scope="session")
def render():
    return render_text


@pytest.fixture(scope="session")
def ocr_det():
    """Detection + recognition (the default mode); built once per test session."""
    pytest.importorskip("rapidocr")
    from rlhf_image.rewards import OCRReward

    return OCRReward(num_threads=2)


@pytest.fixture(scope="session")
def ocr_rec():
    """Recognition only, for single-line images."""
    pytest.importorskip("rapidocr")
    from rlhf_image.rewards import OCRReward

    return OCRReward(use_det=False, num_threads=2)


def _tiny_tokenizer():
    from transformers import CLIPTokenizer

    # Character-level BPE vocabulary (no merges): enough to embed test prompts offline.
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits + ".,!?'\"-":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A seeded random CLIP (projection dim 16) with a processor, in memory and saved to a folder.

    Returns a namespace with `model`, `processor` (a `CLIPProcessor`), `image_processor`,
    `tokenizer` and `path` (the folder holding model and processor).
    """
    torch = pytest.importorskip("torch")
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = _tiny_tokenizer()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=16)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, **layers),
        vision_config=dict(image_size=32, patch_size=8, **layers),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    path = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return SimpleNamespace(model=model, processor=processor, image_processor=image_processor,
                           tokenizer=tokenizer, path=path)


@pytest.fixture(scope="session")
def color_images():
    """Five small RGB images with distinct content (sizes differ to exercise resize and crop)."""
    import numpy as np

    rng = np.random.default_rng(0)
    sizes = [(40, 30), (32, 32), (64, 48), (50, 70), (33, 33)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


# --- tiny vision-language checkpoints (tests/tiny_vlms.py) ----------------------------------------------------------
JUDGE_WORDS = ("Yes", "No", "You are a helpful assistant.", 'Does this figure show "', '"? Please answer yes or no.')


@pytest.fixture(scope="session")
def tiny_judges(tmp_path_factory):
    """Tiny random Qwen2.5-VL and Qwen3-VL judges saved to folders: `{model_type: (path, model)}`. The LM head is
    scaled up so that the yes/no probabilities spread over (0, 1) instead of sitting near 0.5."""
    torch = pytest.importorskip("torch")
    from tiny_vlms import save_judge_model

    root = tmp_path_factory.mktemp("judges")
    judges = {}
    for seed, model_type in enumerate(("qwen2_5_vl", "qwen3_vl")):
        model = save_judge_model(root / model_type, model_type, JUDGE_WORDS, seed=seed, lm_head_scale=5.0)
        judges[model_type] = (root / model_type, model)
    return judges


@pytest.fixture(scope="session")
def varied_images():
    """Four RGB images of different sizes and aspect ratios."""
    import numpy as np

    rng = np.random.default_rng(1)
    sizes = [(60, 40), (64, 64), (30, 50), (97, 41)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
