"""Image-text datasets for pretraining and SFT, and aspect-ratio buckets.

Every dataset here is a map-style `torch.utils.data.Dataset` whose items are dicts
`{"image": PIL.Image.Image (RGB), "prompt": str, "key": str, **extra_columns}` (every trainer reads the text from
the `prompt` column); `key` names the sample in its source (file, row or tar member), for logs. An image that cannot be decoded (truncated bytes, a text
file named `.png`, ...) is never fatal: `dataset[i]` returns `None`, the dataset counts it in
`num_skipped`, and the trainer's collator drops it from its batch and logs `data/skipped_images`. A caption that
cannot be read is the same: a `.txt` that is not UTF-8, a tar shard's `.json` sidecar that is not a JSON object,
a tar member cut off where a shard ends early (the samples before the cut are kept; the shard is listed in
`TarShardDataset.damaged_shards` and named in a warning). The index of a dataset must parse: a manifest row
that is not JSON, not UTF-8 or lacks its columns fails at construction, naming the file and the line.

Sources: a folder of images with same-stem `.txt` captions ([`ImageFolderDataset`]), a JSONL or CSV
manifest ([`ManifestDataset`]), parquet files with image bytes or paths ([`ParquetImageDataset`]) and
webdataset-style tar shards ([`TarShardDataset`], read with `tarfile`, no webdataset dependency).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import logging
import math
import os
import struct
import tarfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch

from .seeding import Stream, seeded_generator

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# What PIL raises on undecodable input: broken headers (UnidentifiedImageError is an OSError), truncated
# data ("image file is truncated"), corrupt chunks (SyntaxError, struct.error, zlib.error), huge images.
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error,
                           PIL.Image.DecompressionBombError)

ImageSource = str | bytes  # a file path or the encoded bytes


def open_image(source: ImageSource) -> PIL.Image.Image:
    """Decode an image fully (so truncation is caught here, not later) and convert it to RGB."""
    with PIL.Image.open(source if isinstance(source, str) else io.BytesIO(source)) as image:
        image.load()
        return image.convert("RGB")


def read_image_size(source: ImageSource) -> tuple[int, int]:
    """`(height, width)` from the image header only (cheap; does not detect truncated data)."""
    with PIL.Image.open(source if isinstance(source, str) else io.BytesIO(source)) as image:
        width, height = image.size
    return height, width


def load_image(source: Any, size: tuple[int, int] | None = None) -> PIL.Image.Image:
    """An RGB PIL image from an image source, resized to cover `size = (height, width)` and center-cropped to it
    when `size` is given. A source is a path, a PIL image, an array (`numpy.ndarray` `[H, W, 3]` or `[H, W]`, uint8,
    or float in [0, 1]), encoded bytes, or a `{"bytes": ..., "path": ...}` dict (a `datasets.Image(decode=False)`
    value). A `torch.Tensor` is not an image here: the trainers take it as precomputed latents."""
    if isinstance(source, PIL.Image.Image):
        image = source.convert("RGB")
    elif isinstance(source, (str, os.PathLike, bytes)):
        image = open_image(os.fspath(source) if isinstance(source, os.PathLike) else source)
    elif isinstance(source, np.ndarray):
        image = PIL.Image.fromarray(array_to_uint8(source)).convert("RGB")
    elif isinstance(source, Mapping) and (source.get("bytes") or source.get("path")):
        image = open_image(source.get("bytes") or os.fspath(source["path"]))
    else:
        raise TypeError(f"cannot read an image from {type(source).__name__}; pass a path, a PIL image, a numpy array, "
                        "encoded bytes, a {'bytes': ...} dict, or precomputed latents as a torch.Tensor")
    return image if size is None else resize_to_bucket(image, size)


def array_to_uint8(array: np.ndarray) -> np.ndarray:
    """An image array `[H, W, 3]` / `[H, W]` as uint8: uint8 as it is, floats in [0, 1] scaled and rounded."""
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ValueError(f"an image array must be [H, W], [H, W, 3] or [H, W, 4], got shape {array.shape}")
    if array.dtype == np.uint8:
        return array if array.ndim == 2 or array.shape[2] != 1 else array[..., 0]
    if np.issubdtype(array.dtype, np.floating):
        return array_to_uint8((np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8))
    raise ValueError(f"an image array must be uint8 or float in [0, 1], got {array.dtype}")


def image_source_size(source: Any) -> tuple[int, int]:
    """`(height, width)` in pixels of an image source (see [`load_image`]), from the header where it is a file."""
    if isinstance(source, PIL.Image.Image):
        return source.height, source.width
    if isinstance(source, np.ndarray):
        return int(source.shape[0]), int(source.shape[1])
    if isinstance(source, Mapping):
        source = source.get("bytes") or source["path"]
    if isinstance(source, (str, os.PathLike, bytes)):
        return read_image_size(os.fspath(source) if isinstance(source, os.PathLike) else source)
    raise TypeError(f"cannot read an image size from {type(source).__name__}")


def image_key(source: Any) -> str:
    """A stable cache key of an image source: the path with its size and modification time, or a hash of
    the pixels / bytes."""
    if isinstance(source, Mapping):
        source = source.get("bytes") or source["path"]
    if isinstance(source, (str, os.PathLike)):
        stat = os.stat(source)
        return f"path:{os.path.abspath(source)}:{stat.st_size}:{stat.st_mtime_ns}"
    if isinstance(source, bytes):
        return "bytes:" + hashlib.sha256(source).hexdigest()
    if isinstance(source, PIL.Image.Image):
        return f"pil:{source.mode}:{source.size}:" + hashlib.sha256(source.tobytes()).hexdigest()
    if isinstance(source, np.ndarray):
        array = np.ascontiguousarray(source)
        return f"array:{array.dtype}:{array.shape}:" + hashlib.sha256(array.tobytes()).hexdigest()
    raise TypeError(f"cannot key an image source of type {type(source).__name__}")


class UnreadableSample(ValueError):
    """A sample whose caption cannot be read (a bad sidecar, a member cut off by a truncated shard); it is skipped
    and counted like an unreadable image."""


class ImageTextDataset(torch.utils.data.Dataset, ABC):
    """Base class of the image-caption datasets. Subclasses implement `__len__`, [`_image_source`] and
    [`_text`]; synthetic datasets may override [`_load_image`] instead of [`_image_source`].

    Attributes:
        num_skipped (`int`): samples whose image (or caption) could not be read so far, in this process (each
            index once).
    """

    def __init__(self):
        self._skipped: set[int] = set()

    @property
    def num_skipped(self) -> int:
        return len(self._skipped)

    @abstractmethod
    def __len__(self) -> int: ...

    def _image_source(self, index: int) -> ImageSource:
        """The path or encoded bytes of image `index`."""
        raise NotImplementedError(f"{type(self).__name__} must implement `_image_source` or `_load_image`")

    @abstractmethod
    def _text(self, index: int) -> dict[str, Any]:
        """`{"prompt": str, "key": str, **extra_columns}` of item `index` (no image decoding)."""

    def _load_image(self, index: int) -> PIL.Image.Image:
        return open_image(self._image_source(index))

    def _read_size(self, index: int) -> tuple[int, int]:
        return read_image_size(self._image_source(index))

    def _key(self, index: int) -> str:
        """The `key` of item `index`, for logs (subclasses whose `_text` can fail give it without reading)."""
        return self._text(index)["key"]

    def _mark_unreadable(self, index: int, error: Exception) -> None:
        if index not in self._skipped:
            logger.warning("skipping unreadable image %s: %s", self._key(index), error)
        self._skipped.add(index)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        try:
            image = self._load_image(index)
            text = self._text(index)  # a caption file can be unreadable too (UnicodeDecodeError is a ValueError)
        except UNREADABLE_IMAGE_ERRORS as error:
            self._mark_unreadable(index, error)
            return None
        return {"image": image, **text}

    def image_size(self, index: int) -> tuple[int, int] | None:
        """`(height, width)` of image `index` from its header, or `None` (counted) if unreadable."""
        try:
            return self._read_size(index)
        except UNREADABLE_IMAGE_ERRORS as error:
            self._mark_unreadable(index, error)
            return None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The readable items in order (unreadable ones skipped and counted)."""
        for index in range(len(self)):
            item = self[index]
            if item is not None:
                yield item


class ImageFolderDataset(ImageTextDataset):
    """Images in a folder (recursively) with a same-stem `.txt` caption file beside each one
    (`cat.jpg` + `cat.txt`). Images without a caption file are left out (and logged).

    Args:
        root (`str`): the folder.
    """

    def __init__(self, root: str):
        super().__init__()
        self.root = root
        self.paths: list[str] = []
        num_uncaptioned = 0
        for path in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True)):
            if path.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(path):
                if os.path.isfile(os.path.splitext(path)[0] + ".txt"):
                    self.paths.append(path)
                else:
                    num_uncaptioned += 1
        if num_uncaptioned:
            logger.warning("%d images in %s have no .txt caption and are left out", num_uncaptioned, root)
        if not self.paths:
            raise ValueError(f"no image with a same-stem .txt caption found under {root!r}")

    def __len__(self) -> int:
        return len(self.paths)

    def _image_source(self, index: int) -> str:
        return self.paths[index]

    def _key(self, index: int) -> str:
        return os.path.relpath(self.paths[index], self.root)

    def _text(self, index: int) -> dict[str, Any]:
        path = os.path.splitext(self.paths[index])[0] + ".txt"
        try:
            with open(path, encoding="utf-8") as f:
                caption = f.read().strip()
        except UnicodeDecodeError as exc:
            raise UnreadableSample(f"{os.path.relpath(path, self.root)}: not UTF-8 text ({exc.reason})") from None
        return {"prompt": caption, "key": self._key(index)}


class ManifestDataset(ImageTextDataset):
    """Rows of a JSONL (`.jsonl`/`.json` lines) or CSV manifest: an image path (relative to the manifest's
    folder, or absolute), the prompt text, and any extra columns, passed through as item columns.

    Args:
        path (`str`): the manifest file.
        image_column (`str`, defaults to `"image"`), prompt_column (`str`, defaults to `"prompt"`): the manifest's
            columns holding the image path and the text (the item's `prompt`).
    """

    def __init__(self, path: str, image_column: str = "image", prompt_column: str = "prompt"):
        super().__init__()
        self.path = path
        self.image_column, self.prompt_column = image_column, prompt_column
        self.root = os.path.dirname(os.path.abspath(path))
        if path.endswith(".csv"):
            self.rows = _read_csv(path)
        elif path.endswith((".jsonl", ".json")):
            self.rows = _read_jsonl(path)
        else:
            raise ValueError(f"manifest {path!r} must end in .jsonl, .json (one object per line) or .csv")
        for number, row in enumerate(self.rows):
            missing = {image_column, prompt_column} - set(row)
            if missing:
                raise ValueError(f"{path} row {number} lacks the column(s) {sorted(missing)} (it has {sorted(row)}); "
                                 "set `image_column` and `prompt_column` to the manifest's column names")

    def __len__(self) -> int:
        return len(self.rows)

    def _image_source(self, index: int) -> str:
        return os.path.join(self.root, self.rows[index][self.image_column])

    def _text(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        extra = {k: v for k, v in row.items() if k not in (self.image_column, self.prompt_column)}
        return {**extra, "prompt": str(row[self.prompt_column]), "key": str(row[self.image_column])}


def _utf8(data: bytes, where: str) -> str:
    """`data` decoded, or `UnreadableSample` naming `where`."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnreadableSample(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    """The objects of a JSON-lines manifest; a line that is not UTF-8 JSON of an object raises `ValueError`
    naming it."""
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path} line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not JSON ({exc})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: a JSON {type(row).__name__}, not an object; each line of a manifest is "
                                 f"one object")
            rows.append(row)
    return rows


def _read_csv(path: str) -> list[dict[str, Any]]:
    """The rows of a CSV manifest (with a header line); text that is not UTF-8 or not CSV (an unterminated quote
    would swallow the rows after it) raises `ValueError` naming the line."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"{path} line {line}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    rows, line = [], 1
    try:
        reader.fieldnames  # reads the header line
        while True:
            line = reader.reader.line_num + 1  # where the next row starts
            rows.append(next(reader))
    except StopIteration:
        return rows
    except csv.Error as exc:
        raise ValueError(f"{path} line {line}: not CSV ({exc})") from None


class ParquetImageDataset(ImageTextDataset):
    """Rows of one or more parquet files. The image column holds encoded bytes, a
    `{"bytes": ..., "path": ...}` struct (the Hugging Face `datasets` Image feature) or a path string
    (relative to the file's folder). Other columns are passed through.

    Args:
        paths (`str` or `list[str]`): files, or a glob pattern.
        image_column (`str`, defaults to `"image"`), prompt_column (`str`, defaults to `"prompt"`): the columns
            holding the image and the text (the item's `prompt`).
    """

    def __init__(self, paths: str | Sequence[str], image_column: str = "image", prompt_column: str = "prompt"):
        super().__init__()
        import pyarrow.parquet as pq

        self.files = sorted(glob.glob(paths)) if isinstance(paths, str) else list(paths)
        if not self.files:
            raise ValueError(f"no parquet file matches {paths!r}")
        self.image_column, self.prompt_column = image_column, prompt_column
        self.rows: list[tuple[int, int]] = []  # (file number, row in file)
        self.tables = []
        for number, path in enumerate(self.files):
            table = pq.read_table(path, memory_map=True)
            missing = {image_column, prompt_column} - set(table.column_names)
            if missing:
                raise ValueError(f"{path} lacks the column(s) {sorted(missing)}; set `image_column` and "
                                 f"`prompt_column` to its column names ({table.column_names})")
            self.tables.append(table)
            self.rows += [(number, row) for row in range(table.num_rows)]

    def __len__(self) -> int:
        return len(self.rows)

    def _image_source(self, index: int) -> ImageSource:
        number, row = self.rows[index]
        value = self.tables[number].column(self.image_column)[row].as_py()
        if isinstance(value, dict):  # datasets' Image feature
            value = value["bytes"] if value.get("bytes") is not None else value["path"]
        if isinstance(value, str):
            return os.path.join(os.path.dirname(os.path.abspath(self.files[number])), value)
        if isinstance(value, bytes):
            return value
        raise ValueError(f"unsupported image value of type {type(value).__name__} in column {self.image_column!r}")

    def _text(self, index: int) -> dict[str, Any]:
        number, row = self.rows[index]
        table = self.tables[number]
        extra = {name: table.column(name)[row].as_py() for name in table.column_names
                 if name not in (self.image_column, self.prompt_column)}
        prompt = table.column(self.prompt_column)[row].as_py()
        return {**extra, "prompt": str(prompt), "key": f"{os.path.basename(self.files[number])}:{row}"}


# The magic bytes of compressed files: a compressed shard cannot be read by offset.
_COMPRESSION_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


class TarShardDataset(ImageTextDataset):
    """Webdataset-style tar shards: members grouped by key (the member path up to the first dot of its
    file name), one image (`key.jpg`, `key.png`, ...) plus a caption in `key.txt` or in the
    `caption_field` of `key.json` (whose other fields become columns). Read with `tarfile`; the shards
    are indexed once and members read by offset, so shards must be plain (uncompressed) tar files.

    A sample whose caption cannot be read (a `.json` that is not a JSON object, a `.txt` or `.json` that is not
    UTF-8, a sidecar cut off by the end of a truncated shard) is skipped and counted like an unreadable image.
    A shard that ends early (cut in a header or a member, or without its end-of-archive block) or is no tar at
    all keeps the samples before the damage; it is named in a warning and listed in `damaged_shards`.

    Args:
        shards (`str` or `list[str]`): shard files, or a glob pattern such as `"data/*.tar"`.
        caption_field (`str`, defaults to `"caption"`): the caption's field in `key.json`.

    Attributes:
        damaged_shards (`list[str]`): the shards that end early or could not be read as tar files.
    """

    def __init__(self, shards: str | Sequence[str], caption_field: str = "caption"):
        super().__init__()
        self.shards = sorted(glob.glob(shards)) if isinstance(shards, str) else list(shards)
        if not self.shards:
            raise ValueError(f"no tar shard matches {shards!r}")
        self.caption_field = caption_field
        # one entry per sample: (shard number, key, image (offset, size), caption, extra columns, error); a sample
        # with an error (its caption could not be read) has no caption and is unreadable
        self.samples: list[tuple[int, str, tuple[int, int], str | None, dict[str, Any], str | None]] = []
        self.damaged_shards: list[str] = []
        problems = []
        for number, shard in enumerate(self.shards):
            problem = self._index_shard(number, shard)
            if problem is not None:
                self.damaged_shards.append(shard)
                problems.append(f"{shard}: {problem}")
                logger.warning("tar shard %s: %s; the samples before the damage are kept", shard, problem)
        if not self.samples:
            raise ValueError(f"no image-caption sample found in {self.shards}" +
                             (f" ({'; '.join(problems)})" if problems else ""))

    def _index_shard(self, number: int, shard: str) -> str | None:
        """Add the samples of one shard; returns what is wrong with the shard, if anything."""
        with open(shard, "rb") as f:
            head = f.read(6)
        for magic, kind in _COMPRESSION_MAGIC.items():
            if head.startswith(magic):
                raise ValueError(f"tar shard {shard} is {kind}-compressed; members are read by their offset in the "
                                 f"file, so decompress the shards first (e.g. `{kind} -d`)")
        size = os.path.getsize(shard)
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            tar = tarfile.open(shard, mode="r:")
        except tarfile.ReadError as exc:
            return f"not a tar file ({exc})"
        problem = None
        with tar:
            try:
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, name = os.path.split(member.name)
                    key, _, suffix = name.partition(".")
                    groups.setdefault(os.path.join(folder, key), {})[suffix.lower()] = member
            except tarfile.ReadError as exc:  # a member's data runs past the end of the file
                problem = f"ends early ({exc})"
            if problem is None and (size % tarfile.BLOCKSIZE or size < tar.offset + tarfile.BLOCKSIZE):
                problem = f"ends early (cut at byte {size}, in a header or before the end-of-archive block)"
            for key, members in groups.items():
                image = next((members[s] for s in members if "." + s in IMAGE_EXTENSIONS), None)
                caption, extra, error = self._read_text(tar, shard, members)
                if image is None or (caption is None and error is None):
                    logger.warning("%s: sample %r has no image or no caption; left out", shard, key)
                    continue
                self.samples.append((number, key, (image.offset_data, image.size), caption, extra, error))
        return problem

    def _read_text(self, tar: tarfile.TarFile, shard: str, members: dict[str, tarfile.TarInfo]):
        """`(caption, extra columns, error)` of one sample; `error` names the shard and member it could not read."""
        extra: dict[str, Any] = {}
        caption = None
        for suffix in ("json", "txt"):
            if suffix not in members:
                continue
            where = f"{shard}:{members[suffix].name}"
            try:
                text = _utf8(tar.extractfile(members[suffix]).read(), where)
                if suffix == "txt":
                    caption = text.strip()
                    continue
                try:
                    extra = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise UnreadableSample(f"{where}: not JSON ({exc})") from None
                if not isinstance(extra, dict):
                    raise UnreadableSample(f"{where}: a JSON {type(extra).__name__}, not a JSON object")
                caption = extra.pop(self.caption_field, None)
            except UnreadableSample as exc:
                return None, {}, str(exc)
            except tarfile.ReadError as exc:  # the member is cut off by the end of the shard
                return None, {}, f"{where}: cut off ({exc})"
        return (None if caption is None else str(caption)), extra, None

    def __len__(self) -> int:
        return len(self.samples)

    def _image_source(self, index: int) -> bytes:
        number, _, (offset, size), _, _, error = self.samples[index]
        if error is not None:
            raise UnreadableSample(error)
        with open(self.shards[number], "rb") as f:
            f.seek(offset)
            return f.read(size)

    def _key(self, index: int) -> str:
        number, key = self.samples[index][:2]
        return f"{os.path.basename(self.shards[number])}:{key}"

    def _text(self, index: int) -> dict[str, Any]:
        _, _, _, caption, extra, error = self.samples[index]
        if error is not None:
            raise UnreadableSample(error)
        return {**extra, "prompt": caption, "key": self._key(index)}


# --- aspect-ratio buckets ------------------------------------------------------------------------

def make_buckets(resolution: int, aspect_ratios: Sequence[float] = (0.5, 0.75, 1.0, 4 / 3, 2.0),
                 multiple_of: int = 16) -> list[tuple[int, int]]:
    """Buckets `(height, width)` of about `resolution**2` pixels for the aspect ratios `width / height`,
    each side rounded to a multiple of `multiple_of` (the model's pixel unit: VAE factor x patch)."""
    buckets = []
    for ratio in aspect_ratios:
        height = max(multiple_of, round(resolution / math.sqrt(ratio) / multiple_of) * multiple_of)
        width = max(multiple_of, round(resolution * math.sqrt(ratio) / multiple_of) * multiple_of)
        if (height, width) not in buckets:
            buckets.append((height, width))
    return buckets


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket for an image: the closest aspect ratio (in log space); among buckets of that ratio, the
    largest the image covers without upscaling, else the smallest. Ties go to the earlier bucket."""
    distance = [abs(math.log(width / height) - math.log(w / h)) for h, w in buckets]
    best = min(distance)
    same_ratio = [b for b, d in zip(buckets, distance) if d - best <= 1e-9]
    covered = [b for b in same_ratio if b[0] <= height and b[1] <= width]
    if covered:
        return max(covered, key=lambda b: b[0] * b[1])
    return min(same_ratio, key=lambda b: b[0] * b[1])


def resize_to_bucket(image: PIL.Image.Image, bucket: tuple[int, int]) -> PIL.Image.Image:
    """Resize `image` so it covers `bucket` = `(height, width)` (aspect ratio kept, bicubic), then
    center-crop to exactly the bucket."""
    target_h, target_w = bucket
    scale = max(target_h / image.height, target_w / image.width)
    new_w = max(target_w, round(image.width * scale))
    new_h = max(target_h, round(image.height * scale))
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), PIL.Image.Resampling.BICUBIC)
    left, top = (new_w - target_w) // 2, (new_h - target_h) // 2
    return image.crop((left, top, left + target_w, top + target_h))


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches whose samples all share one bucket (so each batch has one resolution), for one rank.

    Per epoch, each bucket's indices are shuffled with a generator seeded by `(seed, DATA_ORDER, epoch)`
    (`rlhf_image.seeding`) and cut into batches of `batch_size` (a bucket's last, smaller batch is kept unless
    `drop_last`); the batches are then shuffled together. That global list is made a multiple of `num_replicas`
    (dropping the tail with `drop_last`, else repeating batches from its start, so every rank runs the same number
    of steps) and rank `r` takes batches `r, r + num_replicas, ...`: its local batch `j` is global batch
    `j * num_replicas + r`.

    Args:
        buckets (`list[tuple[int, int] | None]`): the bucket of each dataset index; `None` leaves it out.
        batch_size (`int`): samples per batch (per rank).
        shuffle (`bool`, defaults to `True`), seed (`int`, defaults to 0), drop_last (`bool`, defaults to `False`).
        num_replicas (`int`, defaults to 1), rank (`int`, defaults to 0): data-parallel sharding.
    """

    def __init__(self, buckets: Sequence[tuple[int, int] | None], batch_size: int, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, num_replicas: int = 1, rank: int = 0):
        if batch_size < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < num_replicas, got {batch_size}, {rank}, "
                             f"{num_replicas}")
        self.buckets = list(buckets)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self.groups: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(self.buckets):
            if bucket is not None:
                self.groups.setdefault(tuple(bucket), []).append(index)
        if not self.groups:
            raise ValueError("no readable sample to batch")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _num_global_batches(self) -> int:
        sizes = [len(g) // self.batch_size if self.drop_last else math.ceil(len(g) / self.batch_size)
                 for g in self.groups.values()]
        return sum(sizes)

    def __len__(self) -> int:
        num = self._num_global_batches()
        return num // self.num_replicas if self.drop_last else math.ceil(num / self.num_replicas)

    def global_batches(self) -> list[list[int]]:
        """This epoch's batches for all ranks, before sharding and padding."""
        generator = seeded_generator(self.seed, Stream.DATA_ORDER, self.epoch)
        batches = []
        for indices in self.groups.values():  # insertion order: the order buckets first appear
            if self.shuffle:
                indices = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_batches()
        total = len(self) * self.num_replicas
        batches = (batches * math.ceil(total / len(batches)))[:total] if total > len(batches) else batches[:total]
        yield from batches[self.rank::self.num_replicas]
