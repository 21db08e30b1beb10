"""The wire protocol shared by the reward server (`rlhf_image.rewards.server`) and client (`rlhf_image.rewards.client`).

HTTP + JSON, never pickle. Every request except `GET /health` carries `Authorization: Bearer <token>`.

    GET  /health  -> 200 {"status": "ok", "reward": <name>, "limits": {"max_body_bytes": int, "max_pixels": int,
                                                                     "max_batch_pixels": int}}
    POST /score   {"prompts": [str] * N, "images": [base64 PNG] * N, "columns": {name: [value] * N}}
                  optional header `X-Request-Id: <id>` (1-128 of A-Z a-z 0-9 . _ : -), the same on every retry
                  -> 200 {"rewards": [float | null] * N, "reward": <name>}
                  -> 400 malformed request (not JSON, nested too deeply, a column named `prompts` or `images`,
                         an image that is not a PNG or has more pixels than `max_pixels`),
                     401 bad token, 404 unknown path, 409 a request id reused for another body, 411 no
                     Content-Length, 413 body over `max_body_bytes` or images over `max_batch_pixels` in all,
                     500 the reward raised or returned an invalid output; errors as {"error": str}, and a 413
                     also carries the limits and the request's `body_bytes` or `batch_pixels`.

The server decides 401/404/411/413 from the headers, before it reads the body.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
from typing import Any

from PIL import Image

# Modes that PNG stores losslessly; anything else (CMYK, F, YCbCr ...) is sent as RGB.
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"}


class RemoteRewardError(RuntimeError):
    """A remote reward could not score a batch (server unreachable, crashed, or answered nonsense)."""


class RemoteRewardAuthError(RemoteRewardError):
    """The server refused the token (HTTP 401/403). Never retried: the configuration is wrong."""


def encode_image(image: Any) -> str:
    """A PIL image (or uint8 array) as base64-encoded PNG text."""
    if not isinstance(image, Image.Image):
        import numpy as np

        if not isinstance(image, np.ndarray):
            raise TypeError(f"expected a PIL image, got {type(image).__name__}")
        image = Image.fromarray(image)
    if image.mode not in _PNG_MODES:
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # speed over size: loopback or LAN
    return base64.b64encode(buffer.getvalue()).decode("ascii")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(raw: bytes) -> tuple[int, int]:
    """`(width, height)` read from a PNG's IHDR chunk (the first 24 bytes), without decoding anything."""
    if len(raw) < 24 or raw[:8] != PNG_SIGNATURE or raw[12:16] != b"IHDR":
        raise ValueError("not a PNG image (no PNG signature and IHDR header)")
    return struct.unpack(">II", raw[16:24])


def open_png(data: str, max_pixels: int | None = None) -> Image.Image:
    """A base64 PNG opened lazily (header parsed, pixels not decoded: call `.load()`); raises `ValueError` on
    anything that is not a base64 PNG, or one whose header gives more than `max_pixels` pixels."""
    if not isinstance(data, str):
        raise ValueError(f"an image must be a base64 string, got {type(data).__name__}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"invalid base64: {exc}") from None
    width, height = png_size(raw)
    if max_pixels is not None and width * height > max_pixels:
        raise ValueError(f"{width}x{height} is {width * height:,} pixels, over the server's max_pixels of "
                         f"{max_pixels:,}; resize it before scoring")
    try:
        return Image.open(io.BytesIO(raw), formats=["PNG"])
    except Exception as exc:  # PIL raises several types for corrupt data
        raise ValueError(f"not a PNG image: {exc}") from None


def decode_image(data: str, max_pixels: int | None = None) -> Image.Image:
    """Inverse of `encode_image`; raises `ValueError` on anything that is not a base64 PNG (of at most
    `max_pixels` pixels, when given)."""
    image = open_png(data, max_pixels)
    try:
        image.load()
    except Exception as exc:
        raise ValueError(f"not a PNG image: {exc}") from None
    return image
