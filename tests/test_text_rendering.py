"""The synthetic text-rendering generator: determinism, bilingual captions that quote the target,
disjoint held-out split, simple-mode properties, font discovery errors and the on-disk export."""

import re

import numpy as np
import pytest

from rlhf_image.recipes.ovis_image.data import (CAPTION_TEMPLATES, SIMPLE_TEMPLATE, TextRenderingDataset, discover_fonts,
                                     split_of)
from rlhf_image.data import ManifestDataset

fonts = discover_fonts()
needs_fonts = pytest.mark.skipif(not (fonts["latin"] and fonts["chinese"]),
                                 reason="needs DejaVu and Noto CJK fonts (make fonts)")
QUOTED = re.compile('"([^"]+)"|\u201c([^\u201d]+)\u201d')


def _quoted(caption):
    return ["".join(m) for m in QUOTED.findall(caption)]


@needs_fonts
def test_deterministic_per_seed():
    a = TextRenderingDataset(12, mode="varied", vocabulary="mixed", image_size=(48, 128), seed=3)
    b = TextRenderingDataset(12, mode="varied", vocabulary="mixed", image_size=(48, 128), seed=3)
    for i in (0, 5, 11):
        x, y = a[i], b[i]
        assert x["prompt"] == y["prompt"] and x["target_text"] == y["target_text"]
        assert np.array_equal(np.asarray(x["image"]), np.asarray(y["image"]))
    other = TextRenderingDataset(12, mode="varied", vocabulary="mixed", image_size=(48, 128), seed=4)
    assert [other[i]["target_text"] for i in range(12)] != [a[i]["target_text"] for i in range(12)]
    assert a[7]["target_text"] == a._text(7)["target_text"]  # columns come without rendering
    assert a.image_size(7) == (48, 128) and a[7]["image"].size == (128, 48)


@needs_fonts
def test_bilingual_captions_quote_the_target():
    dataset = TextRenderingDataset(200, mode="varied", vocabulary="mixed", seed=0)
    records = dataset.prompt_records()
    languages = set()
    for record in records:
        assert _quoted(record["prompt"]) == [record["target_text"]]
        languages.add("zh" if re.search("[\u4e00-\u9fff]", QUOTED.sub("", record["prompt"])) else "en")
    targets = [r["target_text"] for r in records]
    assert languages == {"en", "zh"}
    assert any(re.fullmatch(r"\d+", t) for t in targets)
    assert any(re.search("[A-Za-z]", t) for t in targets)
    assert any(re.search("[\u4e00-\u9fff]", t) for t in targets)
    templates = {t.format("{}") for t in CAPTION_TEMPLATES["en"] + CAPTION_TEMPLATES["zh"]}
    assert all(r["prompt"].replace(r["target_text"], "{}", 1) in templates for r in records)


@needs_fonts
@pytest.mark.parametrize("vocabulary", ["digits", "words", "chinese"])
def test_held_out_split_is_disjoint(vocabulary):
    kw = dict(mode="simple", vocabulary=vocabulary, min_length=1, max_length=2, eval_fraction=0.2)
    train = {r["target_text"] for r in TextRenderingDataset(400, split="train", **kw).prompt_records()}
    held_out = {r["target_text"] for r in TextRenderingDataset(100, split="eval", **kw).prompt_records()}
    assert train and held_out and not train & held_out
    assert all(split_of(t, 0.2) == "eval" for t in held_out)
    listed = TextRenderingDataset(50, split="eval", vocabulary=[f"{i:03d}" for i in range(100)], eval_fraction=0.3)
    assert {r["target_text"] for r in listed.prompt_records()} <= {f"{i:03d}" for i in range(100)
                                                                    if split_of(f"{i:03d}", 0.3) == "eval"}


@needs_fonts
def test_simple_mode():
    dataset = TextRenderingDataset(20, mode="simple", vocabulary="digits", min_length=4, max_length=4)
    for i in range(20):
        item = dataset[i]
        assert re.fullmatch(r"\d{4}", item["target_text"])
        assert item["prompt"] == SIMPLE_TEMPLATE.format(item["target_text"])
        pixels = np.asarray(item["image"].convert("L"))
        assert pixels.shape == (32, 96)
        ink = pixels < 128
        # black on white, centred, large: ink spans most of the width
        assert pixels[0].min() == 255 and pixels[:, 0].min() == 255
        cols = np.flatnonzero(ink.any(axis=0))
        rows = np.flatnonzero(ink.any(axis=1))
        assert cols[-1] - cols[0] > 0.6 * 96 and rows[-1] - rows[0] > 0.5 * 32
        assert abs((cols[0] + cols[-1]) / 2 - 47.5) <= 2 and abs((rows[0] + rows[-1]) / 2 - 15.5) <= 2
    assert (dataset.simple_fonts["latin"].family, dataset.simple_fonts["latin"].style) == ("DejaVu Sans Mono", "Bold")


def test_missing_fonts_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="chinese font"):
        TextRenderingDataset(4, vocabulary="chinese", font_dirs=[str(tmp_path)])
    with pytest.raises(ValueError, match="vocabulary"):
        TextRenderingDataset(4, vocabulary="klingon")


@needs_fonts
def test_write_and_reload(tmp_path):
    dataset = TextRenderingDataset(5, mode="varied", vocabulary="mixed", image_size=(32, 64))
    manifest = dataset.write(str(tmp_path))
    loaded = ManifestDataset(manifest)
    assert len(loaded) == 5
    for i in range(5):
        assert loaded[i]["prompt"] == dataset[i]["prompt"]
        assert loaded[i]["target_text"] == dataset[i]["target_text"]
        assert np.array_equal(np.asarray(loaded[i]["image"]), np.asarray(dataset[i]["image"]))


@needs_fonts
@pytest.mark.parametrize("mode,vocabulary,size", [("simple", "digits", (32, 96)), ("simple", "words", (32, 96)),
                                                  ("simple", "chinese", (32, 96)), ("varied", "mixed", (64, 192))])
def test_ocr_reads_the_renders(mode, vocabulary, size):
    """The rewards package's OCR reads the renders exactly (reward 1.0): the data is legible to the reward
    that GRPO will optimise."""
    pytest.importorskip("rapidocr")
    from rlhf_image.rewards.ocr import OCRReward
    from rlhf_image.rewards.text_match import normalize_text

    dataset = TextRenderingDataset(6, mode=mode, vocabulary=vocabulary, image_size=size, min_length=1, max_length=2)
    items = [dataset[i] for i in range(6)]
    reward = OCRReward(use_det=mode == "varied")
    reads = [normalize_text(reward.read(it["image"])) for it in items]
    assert reads == [normalize_text(it["target_text"]) for it in items]  # exact reads (case and spaces aside)
    scores = reward([it["prompt"] for it in items], [it["image"] for it in items],
                    target_text=[it["target_text"] for it in items])
    assert scores == [1.0] * 6
