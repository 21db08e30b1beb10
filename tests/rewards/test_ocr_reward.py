"""OCRReward on images rendered with real fonts (DejaVu Sans Bold, Noto Sans CJK Bold).

Measured OCR noise (rapidocr 3.10, PP-OCRv6 small, settings of `build_rapidocr`): on 60 random
strings (40 upper-case words, 20 pairs of lower-case words) rendered at 256x64, 96x32 and 512x128,
det+rec and rec-only each read 59/60 exactly at every size; the one miss was "gvi lsbxw" read as
"gvi Isbxw" (l and I are nearly the same glyph in a sans-serif bold). Six Chinese strings at
256x64 and 96x32: 6/6 in both modes. So the strings below avoid a lower-case l, and exact values
are asserted.
"""

from __future__ import annotations

import pickle

import pytest
from PIL import Image

from rlhf_image.rewards import OCRReward, RewardSet, levenshtein

HELLO_ZH = "\u4f60\u597d\u4e16\u754c"  # "hello world"


def expected_score(read: str, target: str) -> float:
    """The DESIGN.md formula written out again, for strings the OCR is known to read exactly."""
    g, p = "".join(target.lower().split()), "".join(read.lower().split())
    d = 0 if g in p else min(levenshtein(p, g), len(g))
    return 1 - d / len(g)


@pytest.fixture(params=["det", "rec"])
def ocr(request, ocr_det, ocr_rec):
    return ocr_det if request.param == "det" else ocr_rec


def test_exact_text_scores_one(ocr, render):
    prompts = ['a neon sign that says "OPEN 24 HOURS"', "a poster with 'SUMMER SALE'",
               "a mug reading \u201cgood morning\u201d"]
    images = [render("OPEN 24 HOURS"), render("SUMMER SALE"), render("good morning")]
    assert ocr(prompts, images) == [1.0, 1.0, 1.0]


def test_misspelled_render_scores_the_formula(ocr, render):
    cases = [("HELO WORD", "HELLO WORLD"), ("GOOD MORNXNG", "GOOD MORNING"), ("PARK", "CAR PARK ENTRANCE")]
    prompts = [f'a sign that says "{target}"' for _, target in cases]
    scores = ocr(prompts, [render(rendered) for rendered, _ in cases])
    expected = [expected_score(rendered, target) for rendered, target in cases]
    assert expected == pytest.approx([0.8, 1 - 1 / 11, 1 - 11 / 15])  # the formula, by hand
    assert scores == pytest.approx(expected)


def test_target_inside_longer_text_scores_one(ocr_det, render):
    assert ocr_det(['a shop window with "SALE"'], [render("BIG SALE TODAY")]) == [1.0]


def test_blank_image_scores_zero(ocr):
    blanks = [Image.new("RGB", (256, 64), "white"), Image.new("RGB", (512, 512), "black"),
              Image.new("L", (96, 32), 255)]
    assert ocr(['a sign that says "HELLO"'] * 3, blanks) == [0.0, 0.0, 0.0]


def test_prompt_without_target_gives_none(ocr, render):
    scores = ocr(["a photo of a cat", 'a sign that says "STOP"'], [render("STOP"), render("STOP")])
    assert scores == [None, 1.0]


def test_chinese(ocr, render):
    prompts = [f"\u4e00\u5f20\u5199\u7740\u300c{HELLO_ZH}\u300d\u7684\u6d77\u62a5", f'a sign that says "{HELLO_ZH}"']
    images = [render(HELLO_ZH, font="cjk"), render(HELLO_ZH[:3], font="cjk")]
    assert ocr(prompts, images) == pytest.approx([1.0, 0.75])  # one of four characters missing


def test_target_from_column(ocr_det, render):
    images = [render("CAFE"), render("CAFE"), render("CAFE")]
    prompts = ['a sign that says "BAR"', 'a sign that says "CAFE"', "no quotes here"]
    # The column wins over the prompt; a blank or missing value falls back to the prompt's quotes.
    scores = ocr_det(prompts, images, target_text=["CAFE", None, "  "], other_column=[1, 2, 3])
    assert scores == [1.0, 1.0, None]
    renamed = OCRReward(target_column="caption_text", use_det=False, num_threads=2)
    assert renamed(prompts[:1], images[:1], caption_text=["CAFE"], target_text=["BAR"]) == [1.0]


def test_ocr_text_for_evaluation(ocr_det, ocr_rec, render):
    images = [render("HELLO WORLD"), Image.new("RGB", (256, 64), "white")]
    assert ocr_det.ocr_text(images) == ["HELLO WORLD", ""]
    assert ocr_rec.ocr_text(images) == ["HELLO WORLD", ""]


def test_rec_only_reads_tiny_digit_renders(ocr_rec, render):
    # The CPU demo's format: 4 digits, 32x96; rec-only upscales to the recogniser's 48-pixel height.
    digits = ["0427", "1985", "3360", "7712"]
    scores = ocr_rec([f'the number "{d}"' for d in digits], [render(d, size=(96, 32)) for d in digits])
    assert scores == [1.0] * 4


def test_image_modes_and_arrays(ocr_det, render):
    import numpy as np

    image = render("EXIT")
    inputs = [image.convert("RGBA"), image.convert("L"), np.asarray(image)]
    assert ocr_det(['"EXIT"'] * 3, inputs) == [1.0, 1.0, 1.0]


def test_pickle_rebuilds_the_engine(ocr_rec, render):
    clone = pickle.loads(pickle.dumps(ocr_rec))
    assert clone.use_det is False and clone(['"EXIT"'], [render("EXIT")]) == [1.0]


def test_in_a_reward_set(ocr_det, render):
    def length_bonus(prompts, images, **columns):
        return [0.1] * len(prompts)

    result = RewardSet([ocr_det, length_bonus], weights=[1.0, 1.0])(
        ['"EXIT"', "no target"], [render("EXIT"), render("EXIT")], target_text=[None, None])
    assert result.names == ["ocr", "length_bonus"]
    assert result.total[0] == pytest.approx(1.1) and result.scored.tolist() == [True, False]
