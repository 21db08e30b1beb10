"""Target extraction and string distances (no OCR engine)."""

from __future__ import annotations

import pytest

from rlhf_image.rewards import extract_target, levenshtein, normalize_text, normalized_edit_distance, ocr_accuracy


@pytest.mark.parametrize("prompt, target", [
    ('a neon sign that says "OPEN 24 HOURS"', "OPEN 24 HOURS"),
    ("a poster reading 'SALE'", "SALE"),
    ("a mug with \u201cgood morning\u201d on it", "good morning"),
    ("a banner with \u2018WELCOME\u2019 in red", "WELCOME"),
    ("\u4e00\u5f20\u5199\u7740\u300c\u4f60\u597d\u4e16\u754c\u300d\u7684\u6d77\u62a5", "\u4f60\u597d\u4e16\u754c"),
    ("\u62db\u724c\u4e0a\u5199\u7740\u300e\u6b22\u8fce\u5149\u4e34\u300f", "\u6b22\u8fce\u5149\u4e34"),
    ("a card that says \uff02THANK YOU\uff02", "THANK YOU"),
    ("\u5199\u7740'\u4f60\u597d'\u7684\u724c\u5b50", "\u4f60\u597d"),  # a straight quote right after a CJK character
])
def test_each_quote_style(prompt, target):
    assert extract_target(prompt) == target


def test_several_spans_are_joined_with_a_space():
    assert extract_target('a book titled "DEEP" with the subtitle \u201cLEARNING\u201d') == "DEEP LEARNING"
    assert extract_target("\u300c\u4f60\u597d\u300d\u548c\u300e\u4e16\u754c\u300f") == "\u4f60\u597d \u4e16\u754c"


def test_apostrophes_are_not_quotes():
    assert extract_target("don't forget the kids' room sign 'EXIT'") == "EXIT"
    assert extract_target("a sign saying 'don't panic'") == "don't panic"
    assert extract_target("the \u2018don\u2019t walk\u2019 signal") == "don\u2019t walk"
    assert extract_target("it's the dog's bowl") is None


def test_nested_quotes_belong_to_the_outer_span():
    assert extract_target("a shirt printed with \"say 'cheese' now\"") == "say 'cheese' now"


@pytest.mark.parametrize("prompt", ["a photo of a cat", 'an empty sign ""', "a blank label '   '", ""])
def test_no_target_gives_none(prompt):
    assert extract_target(prompt) is None


def test_normalize_text():
    assert normalize_text(" Hello \tWORLD\n") == "helloworld"
    assert normalize_text("\u4f60\u597d\u3000\u4e16\u754c") == "\u4f60\u597d\u4e16\u754c"  # ideographic space


@pytest.mark.parametrize("a, b, d", [
    ("", "", 0), ("abc", "", 3), ("", "ab", 2), ("kitten", "sitting", 3), ("flaw", "lawn", 2),
    ("helloworld", "heloworld", 1), ("\u4f60\u597d\u4e16\u754c", "\u4f60\u597d", 2),
])
def test_levenshtein(a, b, d):
    assert levenshtein(a, b) == d
    assert levenshtein(b, a) == d


def test_ocr_accuracy_formula():
    assert ocr_accuracy("HELLO WORLD", "hello world") == 1.0
    assert ocr_accuracy("big HELLO WORLD sale", "hello world") == 1.0  # target contained: d = 0
    assert ocr_accuracy("HELO WORLD", "Hello World") == pytest.approx(0.9)  # d = 1, len(g) = 10
    assert ocr_accuracy("", "hello") == 0.0  # blank image
    assert ocr_accuracy("a completely different and much longer text", "hello") == 0.0  # d capped at len(g)
    with pytest.raises(ValueError, match="blank"):
        ocr_accuracy("x", "  ")


def test_normalized_edit_distance():
    assert normalized_edit_distance("HELLO", "hello") == 0.0
    assert normalized_edit_distance("HELLO", "hello", normalize=False) == 1.0
    assert normalized_edit_distance("kitten", "sitting") == pytest.approx(3 / 7)
    assert normalized_edit_distance("", "") == 0.0
    assert normalized_edit_distance("", "abc") == 1.0
