"""`RemoteReward`: a reward computed by a `rlhf_image.rewards.server` over HTTP + JSON (protocol in `rlhf_image.rewards.remote`)."""

from __future__ import annotations

import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.request
from typing import Any

from .base import validate_output
from .remote import RemoteRewardAuthError, RemoteRewardError, encode_image

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
TOKEN_ENV = "REWARD_SERVER_TOKEN"


class _Retryable(Exception):
    pass


class _Failed(Exception):
    pass


class RemoteReward:
    """A reward under the contract whose values come from a remote reward server.

    Failure policy:
    - Retried (at most `max_retries` times, sleeping `min(backoff * 2**k, backoff_max)` before
      retry k+1): transport errors (connection refused or reset, timeouts, dropped connections) and
      HTTP 429, 502, 503, 504 (overload, gateways, restarts).
    - Not retried, handled per `on_failure`: HTTP 500 (the reward itself crashed: retrying a
      deterministic crash only wastes time) and malformed responses (not JSON, no `rewards`, wrong
      length, NaN). Also retries that ran out.
    - Always raised, whatever `on_failure` says, because they are configuration errors that would
      otherwise silently zero every advantage: 401/403 (`RemoteRewardAuthError`), and any other 4xx.

    `on_failure="raise"` raises `RemoteRewardError`; `on_failure="none"` logs a warning and returns
    `[None] * N` (the batch is unscored, so its advantages are 0). Connections go direct (environment
    proxies are ignored, so the token never passes through a proxy).

    Args:
        url (`str`): server base URL, e.g. `"http://127.0.0.1:8000"`.
        token (`str`, *optional*): bearer token; defaults to the `REWARD_SERVER_TOKEN` environment variable.
        name (`str`, *optional*): the logged name; defaults to `"remote"`.
        timeout (`float`, defaults to 60.0): seconds for the connection and for each read.
        max_retries (`int`, defaults to 3): retries after the first attempt.
        backoff (`float`, defaults to 0.5), backoff_max (`float`, defaults to 10.0): seconds.
        on_failure (`str`, defaults to `"raise"`): `"raise"` or `"none"`.
        columns (`list[str]`, *optional*): the columns to forward; default all (they must be JSON).

    Attributes:
        last_attempts (`int`): HTTP attempts made by the latest call.
    """

    def __init__(self, url: str, token: str | None = None, name: str | None = None, *, timeout: float = 60.0,
                 max_retries: int = 3, backoff: float = 0.5, backoff_max: float = 10.0, on_failure: str = "raise",
                 columns: list[str] | None = None):
        if on_failure not in ("raise", "none"):
            raise ValueError(f"on_failure must be 'raise' or 'none', got {on_failure!r}")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        if not token:
            raise ValueError(f"pass `token` or set {TOKEN_ENV}")
        self.url = url.rstrip("/")
        self.name = name or "remote"
        self.timeout, self.max_retries, self.on_failure = timeout, max_retries, on_failure
        self.backoff, self.backoff_max = backoff, backoff_max
        self.columns = columns
        self.last_attempts = 0
        self._token = token
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __repr__(self) -> str:  # never print the token
        return f"RemoteReward(url={self.url!r}, name={self.name!r})"

    def health(self) -> dict[str, Any]:
        """`GET /health` (one attempt); returns the server's JSON, e.g. `{"status": "ok", "reward": "ocr"}`."""
        with self._opener.open(urllib.request.Request(self.url + "/health"), timeout=self.timeout) as response:
            return json.loads(response.read())

    def __call__(self, prompts: list[str], images: list[Any], **columns: Any) -> list[float | None]:
        """Score a batch remotely: `list[float | None]` of length N (see the class docstring for failures)."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} images")
        body = self._encode(prompts, images, columns)
        try:
            return self._post_with_retries(body, len(prompts))
        except _Failed as exc:
            if self.on_failure == "none":
                logger.warning("remote reward %r: %s; returning None for %d samples", self.name, exc, len(prompts))
                return [None] * len(prompts)
            raise RemoteRewardError(f"remote reward {self.name!r} at {self.url}: {exc}") from None

    def _encode(self, prompts: list[str], images: list[Any], columns: dict[str, Any]) -> bytes:
        keep = columns if self.columns is None else {k: v for k, v in columns.items() if k in self.columns}
        sent = {}
        for key, value in keep.items():
            try:
                json.dumps(value)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"column {key!r} is not JSON-serialisable ({exc}); pass `columns=` to choose") from None
            sent[key] = list(value)
        payload = {"prompts": list(prompts), "images": [encode_image(im) for im in images], "columns": sent}
        return json.dumps(payload).encode()

    def _post_with_retries(self, body: bytes, n: int) -> list[float | None]:
        self.last_attempts = 0
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), self.backoff_max))
            self.last_attempts += 1
            try:
                return self._post_once(body, n)
            except _Retryable as exc:
                logger.info("remote reward %r attempt %d failed: %s", self.name, attempt + 1, exc)
                last = exc
        raise _Failed(f"gave up after {self.last_attempts} attempts, last error: {last}")

    def _post_once(self, body: bytes, n: int) -> list[float | None]:
        request = urllib.request.Request(self.url + "/score", data=body, method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {self._token}"})
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:  # before OSError: HTTPError is one
            detail = _error_text(exc)
            if exc.code in (401, 403):
                raise RemoteRewardAuthError(
                    f"remote reward {self.name!r} refused the token (HTTP {exc.code}): {detail}") from None
            if exc.code in RETRYABLE_STATUS:
                raise _Retryable(f"HTTP {exc.code}: {detail}") from None
            if exc.code >= 500:
                raise _Failed(f"HTTP {exc.code}: {detail}") from None
            raise RemoteRewardError(
                f"remote reward {self.name!r} rejected the request (HTTP {exc.code}): {detail}") from None
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, dropped
            raise _Retryable(f"{type(exc).__name__}: {exc}") from None
        try:
            values = json.loads(raw)["rewards"]
            return validate_output(self.name, values, n)
        except (ValueError, KeyError, TypeError) as exc:
            raise _Failed(f"malformed response ({type(exc).__name__}: {exc})") from None


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read()).get("error", ""))[:500]
    except Exception:  # the error body is only informative
        return exc.reason if isinstance(exc.reason, str) else ""
