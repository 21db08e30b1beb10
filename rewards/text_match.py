"""Text targets and string distances for the OCR reward and for evaluation (no OCR engine needed).

The OCR reward (DESIGN.md): target `g`, OCR output `p` (lines joined), both lowercased with all
whitespace removed; `d = 0` if `g` is a substring of `p`, else `min(levenshtein(p, g), len(g))`;
reward `1 - d / len(g)`, so it lies in [0, 1] and a blank image scores 0.
"""

from __future__ import annotations

import re

# Quote pairs recognised in prompts. Written as escapes to keep the source ASCII.
# The straight single quote and the curly closing one double as apostrophes ("don't", "kids' room"),
# so a single-quoted span must not open after, nor close before, a Latin letter or digit (checked on
# ASCII only: CJK text puts quotes right next to characters).
_QUOTE_PATTERNS = (
    r'"(?P<dq>[^"]+)"',  # "..."
    r"(?<![A-Za-z0-9])'(?P<sq>.+?)'(?![A-Za-z0-9])",  # '...'
    "\u201c(?P<cdq>[^\u201d]+)\u201d",  # curly double quotes
    "\u2018(?P<csq>.+?)\u2019(?![A-Za-z0-9])",  # curly single quotes
    "\u300c(?P<cjk1>[^\u300d]+)\u300d",  # CJK corner brackets
    "\u300e(?P<cjk2>[^\u300f]+)\u300f",  # CJK white corner brackets
    "\uff02(?P<fw>[^\uff02]+)\uff02",  # full-width double quotes
)
_QUOTE_RE = re.compile("|".join(_QUOTE_PATTERNS), re.DOTALL)


def extract_target(prompt: str) -> str | None:
    """The text a prompt asks to render: its quoted spans, joined with a space.

    Recognises "...", '...', curly double and single quotes, the CJK corner brackets (U+300C/U+300D
    and U+300E/U+300F) and full-width double quotes (U+FF02). Spans are taken left to right, so a
    quote nested in another belongs to the outer span. Blank spans are skipped.

    Args:
        prompt (`str`): for example `'a neon sign that says "OPEN 24 HOURS"'`.

    Returns:
        `str` (here `"OPEN 24 HOURS"`), or `None` when the prompt quotes nothing.
    """
    spans = []
    for match in _QUOTE_RE.finditer(prompt):
        span = next(g for g in match.groups() if g is not None)
        if span.strip():
            spans.append(span.strip())
    return " ".join(spans) if spans else None


def normalize_text(text: str) -> str:
    """Lowercase and remove all whitespace (Unicode whitespace included)."""
    return "".join(text.lower().split())


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1) between two strings."""
    if a == b:
        return 0
    if len(a) < len(b):
        a, b = b, a  # keep the row over the shorter string
    if not b:
        return len(a)
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def ocr_accuracy(pred: str, target: str) -> float:
    """The OCR reward of one sample: `1 - d / len(g)` (see the module docstring).

    Args:
        pred (`str`): OCR output, lines joined.
        target (`str`): the text the prompt asked for; must not be blank.

    Returns:
        `float` in [0, 1]; 1.0 when the target appears anywhere in the OCR output.
    """
    g, p = normalize_text(target), normalize_text(pred)
    if not g:
        raise ValueError("the OCR target is blank")
    d = 0 if g in p else min(levenshtein(p, g), len(g))
    return 1.0 - d / len(g)


def normalized_edit_distance(pred: str, target: str, normalize: bool = True) -> float:
    """Normalised edit distance (NED) for evaluation: `levenshtein(p, g) / max(len(p), len(g))`.

    Args:
        pred (`str`): OCR output.
        target (`str`): reference text.
        normalize (`bool`, defaults to `True`): lowercase and strip whitespace first, as the reward does.

    Returns:
        `float` in [0, 1]; 0 for an exact match (two empty strings included), 1 for nothing in common.
    """
    p, g = (normalize_text(pred), normalize_text(target)) if normalize else (pred, target)
    longest = max(len(p), len(g))
    return levenshtein(p, g) / longest if longest else 0.0
