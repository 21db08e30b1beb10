"""Synthetic text-rendering data (the Ovis-Image report's "rendering engine"): images of typeset
English and Chinese text with captions that quote it.

Each item is `{"image": PIL.Image, "prompt": str, "target_text": str, "key": str}` and is a pure
function of `(seed, split, index)`: the same item every time, in any process. The target strings of the
`"train"` and `"eval"` splits never overlap (a string's split is fixed by a hash of the string). The
dataset feeds pretraining/SFT (an [`ImageTextDataset`]), GRPO prompts ([`TextRenderingDataset.prompt_records`])
and can be written to disk as images plus a JSONL manifest ([`TextRenderingDataset.write`]).

Modes: `"simple"` is the CPU-demo task (black on white, one bold monospace font, glyphs as large as
fit, centred, one caption template); `"varied"` draws fonts, sizes, colours, positions, backgrounds
and bilingual caption templates.
"""

from __future__ import annotations

import colorsys
import functools
import hashlib
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from rlhf_image.data import ImageTextDataset

DEFAULT_FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", os.path.expanduser("~/.fonts"))

ENGLISH_WORDS = (
    "OPEN", "SALE", "CAFE", "BOOK", "STOP", "EXIT", "HELLO", "WORLD", "LOVE", "HOME", "PARK", "SHOP", "FOOD", "MILK",
    "TEA", "BAR", "HOTEL", "TAXI", "BANK", "CITY", "ROAD", "BEACH", "SUN", "MOON", "STAR", "RAIN", "SNOW", "WIND",
    "FIRE", "WATER", "TREE", "LEAF", "ROSE", "BIRD", "FISH", "CAT", "DOG", "BEAR", "LION", "WOLF", "KING", "QUEEN",
    "GOLD", "BLUE", "RED", "GREEN", "PINK", "GRAY", "FAST", "SLOW", "BIG", "TINY", "NEW", "OLD", "HOT", "COLD",
    "JAZZ", "ROCK", "PLAY", "GAME", "WIN", "FUN", "ART", "MAP", "TIME", "NEWS", "MENU", "PIZZA", "BREAD", "CAKE",
    "FRESH", "FARM", "PORT", "GATE", "ZONE", "CLUB", "LAB", "CODE", "DATA", "WIFI", "FREE", "PUSH", "PULL", "WAIT",
    "WALK", "RUN", "JUMP", "DREAM", "HOPE", "PEACE", "SMILE", "HAPPY", "LUCKY", "MAGIC", "OCEAN", "RIVER", "HILL",
    "NORTH", "SOUTH", "EAST", "WEST",
)
CHINESE_WORDS = (
    "你好", "欢迎", "开业", "大吉", "咖啡", "书店", "餐厅", "酒店", "银行", "医院", "学校", "公园", "超市", "出口",
    "入口", "停车", "禁止", "吸烟", "安全", "快乐", "幸福", "平安", "健康", "美食", "面包", "蛋糕", "茶馆", "花店",
    "水果", "新鲜", "特价", "促销", "免费", "营业", "时间", "早安", "晚安", "春天", "夏天", "秋天", "冬天", "大海",
    "山水", "明月", "星空", "太阳", "彩虹", "城市", "北京", "上海", "中国", "世界", "和平", "梦想", "希望", "未来",
    "科技", "数据", "智能", "设计",
)
CAPTION_TEMPLATES = {
    "en": ('A sign that says "{}"', 'A poster with the text "{}"', 'The word "{}" painted on a wall',
           'A storefront sign reading "{}"', 'A label printed with "{}"', 'Bold letters spelling "{}"'),
    "zh": ("一块写着“{}”的招牌", "一张印有文字“{}”的海报", "墙上写着“{}”", "一个写有“{}”的标签",
           "店铺门头上写着“{}”", "醒目的大字“{}”"),
}
SIMPLE_TEMPLATE = 'A sign that says "{}"'
VOCABULARIES = ("digits", "words", "chinese", "mixed")


@dataclass(frozen=True)
class FontSpec:
    """A font face: file and face index (for `.ttc` collections), with its family and style names."""

    path: str
    index: int
    family: str
    style: str


def _is_latin_family(family: str, style: str) -> bool:
    return family.startswith("DejaVu") and "Math" not in family and "ExtraLight" not in style


def _is_chinese_family(family: str) -> bool:
    return any(mark in family for mark in ("CJK SC", "Han Sans SC", "Han Serif SC", "WenQuanYi"))


@functools.lru_cache(maxsize=8)
def discover_fonts(font_dirs: tuple[str, ...] = DEFAULT_FONT_DIRS) -> dict[str, list[FontSpec]]:
    """Usable fonts under `font_dirs` by script: `"latin"` (the DejaVu families, ExtraLight excluded) and
    `"chinese"` (Simplified-Chinese faces: Noto Sans/Serif CJK SC, Source Han SC, WenQuanYi)."""
    found: dict[str, list[FontSpec]] = {"latin": [], "chinese": []}
    for folder in font_dirs:
        for root, _, files in sorted(os.walk(folder)):
            for name in sorted(files):
                if not name.lower().endswith((".ttf", ".otf", ".ttc")):
                    continue
                path = os.path.join(root, name)
                for index in range(32 if name.lower().endswith(".ttc") else 1):
                    try:
                        family, style = PIL.ImageFont.truetype(path, 12, index=index).getname()
                    except OSError:  # no such face in the collection, or not a font
                        break
                    spec = FontSpec(path, index, family, style)
                    if _is_latin_family(family, style):
                        found["latin"].append(spec)
                    elif _is_chinese_family(family):
                        found["chinese"].append(spec)
    return found


def _script_of(text: str) -> str:
    return "chinese" if any("\u4e00" <= ch <= "\u9fff" for ch in text) else "latin"


def split_of(text: str, eval_fraction: float) -> str:
    """`"eval"` for a fixed `eval_fraction` of strings (by a hash of the string), else `"train"`."""
    bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64
    return "eval" if bucket < eval_fraction else "train"


class TextRenderingDataset(ImageTextDataset):
    """Rendered text images with captions quoting the text.

    Args:
        num_samples (`int`): dataset length (items are generated on access).
        mode (`str`, defaults to `"simple"`): `"simple"` or `"varied"` (see the module docstring).
        split (`str`, defaults to `"train"`): `"train"` or `"eval"`; their target strings are disjoint.
        vocabulary (`str` or `list[str]`, defaults to `"digits"`): `"digits"` (numbers of `min_length` to
            `max_length` digits), `"words"` (that many English words), `"chinese"` (that many Chinese
            words), `"mixed"` (each of those equally often), or an explicit list of target strings.
        min_length (`int`, defaults to 3), max_length (`int`, defaults to 4): length range, in digits or words.
        image_size (`tuple[int, int]`, defaults to `(32, 96)`): `(height, width)` in pixels.
        caption_language (`str`, *optional*): `"en"`, `"zh"` or `"mixed"`; defaults to `"en"` in simple mode
            and `"mixed"` in varied mode.
        eval_fraction (`float`, defaults to 0.1): share of target strings held out for `"eval"`.
        seed (`int`, defaults to 0).
        font_dirs (`list[str]`, *optional*): where to look for fonts (defaults to the system font folders).
    """

    def __init__(self, num_samples: int, *, mode: str = "simple", split: str = "train",
                 vocabulary: str | Sequence[str] = "digits", min_length: int = 3, max_length: int = 4,
                 image_size: tuple[int, int] = (32, 96), caption_language: str | None = None,
                 eval_fraction: float = 0.1, seed: int = 0, font_dirs: Sequence[str] | None = None):
        super().__init__()
        if mode not in ("simple", "varied"):
            raise ValueError(f"`mode` is {mode!r}; use 'simple' or 'varied'")
        if split not in ("train", "eval"):
            raise ValueError(f"`split` is {split!r}; use 'train' or 'eval'")
        if isinstance(vocabulary, str) and vocabulary not in VOCABULARIES:
            raise ValueError(f"`vocabulary` is {vocabulary!r}; use one of {list(VOCABULARIES)} or a list of strings")
        if not 1 <= min_length <= max_length:
            raise ValueError(f"need 1 <= min_length <= max_length, got {min_length}, {max_length}")
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"`eval_fraction` must be in (0, 1), got {eval_fraction}")
        caption_language = caption_language or ("en" if mode == "simple" else "mixed")
        if caption_language not in ("en", "zh", "mixed"):
            raise ValueError(f"`caption_language` is {caption_language!r}; use 'en', 'zh' or 'mixed'")
        self.num_samples, self.mode, self.split, self.seed = num_samples, mode, split, seed
        self.min_length, self.max_length = min_length, max_length
        self.height, self.width = image_size
        self.caption_language, self.eval_fraction = caption_language, eval_fraction
        self.candidates = None
        if not isinstance(vocabulary, str):
            self.candidates = sorted({t for t in vocabulary if split_of(t, eval_fraction) == split})
            if not self.candidates:
                raise ValueError(f"no string of `vocabulary` falls in the {split!r} split; give more strings")
        self.vocabulary = vocabulary if isinstance(vocabulary, str) else "list"
        fonts = discover_fonts(tuple(font_dirs) if font_dirs is not None else DEFAULT_FONT_DIRS)
        needed = {"digits": ["latin"], "words": ["latin"], "chinese": ["chinese"], "mixed": ["latin", "chinese"],
                  "list": sorted({_script_of(t) for t in self.candidates or []})}[self.vocabulary]
        for script in needed:
            if not fonts[script]:
                hint = "apt-get install fonts-noto-cjk" if script == "chinese" else "apt-get install fonts-dejavu-core"
                raise FileNotFoundError(f"no {script} font found under {list(font_dirs or DEFAULT_FONT_DIRS)}; "
                                        f"install one ({hint}) or pass `font_dirs`")
        self.fonts = fonts
        self.simple_fonts = {script: self._simple_font(specs) for script, specs in fonts.items() if specs}

    @staticmethod
    def _simple_font(specs: list[FontSpec]) -> FontSpec:
        """The bold monospace face if present, else a bold one, else the first."""
        def rank(spec: FontSpec) -> tuple[int, int]:
            return ("Mono" not in spec.family and "Sans CJK" not in spec.family, spec.style != "Bold")
        return min(specs, key=rank)

    def __len__(self) -> int:
        return self.num_samples

    # --- targets and captions -----------------------------------------------------------------
    def _rng(self, index: int) -> random.Random:
        return random.Random(f"text-rendering:{self.seed}:{self.split}:{index}")

    def _draw_target(self, rng: random.Random) -> str:
        while True:  # rejection: keep only strings of this split
            if self.candidates is not None:
                return rng.choice(self.candidates)
            kind = rng.choice(["digits", "words", "chinese"]) if self.vocabulary == "mixed" else self.vocabulary
            length = rng.randint(self.min_length, self.max_length)
            if kind == "digits":
                text = "".join(rng.choice("0123456789") for _ in range(length))
            elif kind == "words":
                words = [rng.choice(ENGLISH_WORDS) for _ in range(length)]
                if self.mode == "varied":
                    words = [rng.choice([w, w.lower(), w.capitalize()]) for w in words]
                text = " ".join(words)
            else:
                text = "".join(rng.choice(CHINESE_WORDS) for _ in range(length))
            if split_of(text, self.eval_fraction) == self.split:
                return text

    def _caption(self, rng: random.Random, target: str) -> str:
        if self.mode == "simple":
            return SIMPLE_TEMPLATE.format(target)
        language = rng.choice(["en", "zh"]) if self.caption_language == "mixed" else self.caption_language
        return rng.choice(CAPTION_TEMPLATES[language]).format(target)

    def _sample(self, index: int) -> tuple[str, str, random.Random]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        rng = self._rng(index)
        target = self._draw_target(rng)
        return target, self._caption(rng, target), rng

    def _text(self, index: int) -> dict[str, Any]:
        target, caption, _ = self._sample(index)
        return {"prompt": caption, "target_text": target, "key": f"text-rendering/{self.seed}/{self.split}/{index}"}

    def prompt_records(self) -> list[dict[str, str]]:
        """`[{"prompt": caption, "target_text": target}]` for all items, without rendering (GRPO prompts)."""
        records = []
        for index in range(self.num_samples):
            target, caption, _ = self._sample(index)
            records.append({"prompt": caption, "target_text": target})
        return records

    # --- rendering ----------------------------------------------------------------------------
    def _read_size(self, index: int) -> tuple[int, int]:
        return self.height, self.width

    def _load_image(self, index: int) -> PIL.Image.Image:
        target, _, rng = self._sample(index)
        return self.render(target, rng)

    def _fit(self, spec: FontSpec, text: str, max_w: float, max_h: float) -> PIL.ImageFont.FreeTypeFont:
        """The largest size of `spec` at which `text` fits in `max_w x max_h` (binary search)."""
        low, high = 4, max(5, int(max_h * 2))
        while low < high:
            size = (low + high + 1) // 2
            left, top, right, bottom = PIL.ImageFont.truetype(spec.path, size, index=spec.index).getbbox(text)
            if right - left <= max_w and bottom - top <= max_h:
                low = size
            else:
                high = size - 1
        return PIL.ImageFont.truetype(spec.path, low, index=spec.index)

    def render(self, text: str, rng: random.Random | None = None) -> PIL.Image.Image:
        """Render `text` on an RGB image of the dataset's size; `rng` draws the varied-mode choices."""
        script = _script_of(text)
        if self.mode == "simple":
            font = self._fit(self.simple_fonts[script], text, 0.9 * self.width, 0.8 * self.height)
            image = PIL.Image.new("RGB", (self.width, self.height), "white")
            left, top, right, bottom = font.getbbox(text)
            x = (self.width - (right - left)) / 2 - left
            y = (self.height - (bottom - top)) / 2 - top
            PIL.ImageDraw.Draw(image).text((x, y), text, font=font, fill="black")
            return image
        rng = rng if rng is not None else random.Random(text)
        spec = rng.choice(self.fonts[script])
        scale = rng.uniform(0.55, 1.0)
        font = self._fit(spec, text, 0.92 * self.width * scale, 0.85 * self.height * scale)
        background, foreground = self._colours(rng)
        image = self._background(rng, background)
        left, top, right, bottom = font.getbbox(text)
        x = rng.uniform(0, max(0.0, self.width - (right - left))) - left
        y = rng.uniform(0, max(0.0, self.height - (bottom - top))) - top
        PIL.ImageDraw.Draw(image).text((x, y), text, font=font, fill=foreground)
        return image

    @staticmethod
    def _colours(rng: random.Random) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """A background and a text colour whose lightness differs by at least 0.5 (legible)."""
        light = rng.random() < 0.5
        back_l, fore_l = (rng.uniform(0.8, 1.0), rng.uniform(0.0, 0.3)) if light else \
            (rng.uniform(0.0, 0.25), rng.uniform(0.75, 1.0))

        def rgb(lightness: float) -> tuple[int, int, int]:
            r, g, b = colorsys.hls_to_rgb(rng.random(), lightness, rng.uniform(0.0, 0.8))
            return round(r * 255), round(g * 255), round(b * 255)

        return rgb(back_l), rgb(fore_l)

    def _background(self, rng: random.Random, colour: tuple[int, int, int]) -> PIL.Image.Image:
        """A solid background, or a gentle linear gradient of it (horizontal or vertical)."""
        image = PIL.Image.new("RGB", (self.width, self.height), colour)
        if rng.random() < 0.5:
            return image
        other = tuple(max(0, min(255, c + rng.randint(-40, 40))) for c in colour)
        horizontal = rng.random() < 0.5
        steps = self.width if horizontal else self.height
        draw = PIL.ImageDraw.Draw(image)
        for i in range(steps):
            t = i / max(1, steps - 1)
            fill = tuple(round(a + (b - a) * t) for a, b in zip(colour, other))
            draw.line([(i, 0), (i, self.height)] if horizontal else [(0, i), (self.width, i)], fill=fill)
        return image

    # --- export -------------------------------------------------------------------------------
    def write(self, out_dir: str) -> str:
        """Write `images/NNNNNN.png` and `manifest.jsonl` (image, prompt, target_text) under `out_dir`,
        loadable with `rlhf_image.data.ManifestDataset`. Returns the manifest path."""
        os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
        manifest = os.path.join(out_dir, "manifest.jsonl")
        with open(manifest, "w", encoding="utf-8") as f:
            for index in range(self.num_samples):
                item = self[index]
                relative = f"images/{index:06d}.png"
                item["image"].save(os.path.join(out_dir, relative))
                row = {"image": relative, "prompt": item["prompt"], "target_text": item["target_text"]}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        return manifest
