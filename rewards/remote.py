"""The wire protocol shared by the reward server (`rlhf_image.rewards.server`) and client (`rlhf_image.rewards.client`).

HTTP + JSON, never pickle. Every request except `GET /health` carries `Authorization: Bearer <token>`.

    GET  /health  -> 200 {"status": "ok", "reward": <name>}
    POST /score   {"prompts": [str] * N, "images": [base64 PNG] * N, "columns": {name: [value] * N}}
                  -> 200 {"rewards": [float | null] * N, "reward": <name>}
                  -> 400 malformed request, 401 bad token, 404 unknown path, 413 body too large,
                     500 the reward raised or returned an invalid output; errors as {"error": str}.
"""

from __future__ import annotations

import base64
import binascii
import io
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


def decode_image(data: str) -> Image.Image:
    """Inverse of `encode_image`; raises `ValueError` on anything that is not a base64 PNG."""
    if not isinstance(data, str):
        raise ValueError(f"an image must be a base64 string, got {type(data).__name__}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"invalid base64: {exc}") from None
    try:
        image = Image.open(io.BytesIO(raw), formats=["PNG"])
        image.load()
    except Exception as exc:  # PIL raises several types for corrupt data
        raise ValueError(f"not a PNG image: {exc}") from None
    return image
