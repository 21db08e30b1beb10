"""`RemoteReward`: a reward computed by a `rlhf_image.rewards.server` over HTTP + JSON (protocol in `rlhf_image.rewards.remote`)."""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import threading
import time
import urllib.parse
import uuid
from typing import Any

from .base import validate_output
from .remote import RemoteRewardAuthError, RemoteRewardError, encode_image

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
TOKEN_ENV = "REWARD_SERVER_TOKEN"
MAX_RESPONSE_BYTES = 64 << 20  # an answer is a few bytes per sample; anything longer is not from a reward server


class _Retryable(Exception):
    pass


class _Failed(Exception):
    pass


class _TooLarge(Exception):
    """HTTP 413; `limits` are the server's, when its answer gives them."""

    def __init__(self, message: str, limits: dict[str, int]):
        super().__init__(message)
        self.limits = limits


class RemoteReward:
    """A reward under the contract whose values come from a remote reward server.

    Failure policy:
    - Retried (at most `max_retries` times, sleeping `min(backoff * 2**k, backoff_max)` before
      retry k+1): transport errors (connection refused or reset, timeouts, dropped connections) and
      HTTP 429, 502, 503, 504 (overload, gateways, restarts). Every attempt of a call carries the same
      `X-Request-Id`, so a retry of a batch the server is still scoring waits for that scoring (or gets its
      answer) instead of running the reward again.
    - Not retried, handled per `on_failure`: HTTP 500 (the reward itself crashed: retrying a
      deterministic crash only wastes time) and malformed responses (not JSON, no `rewards`, wrong
      length, NaN). Also retries that ran out.
    - Always raised, whatever `on_failure` says, because they are configuration errors that would
      otherwise silently zero every advantage: 401/403 (`RemoteRewardAuthError`), a redirect (never followed,
      so the token goes nowhere else), and any other 4xx.
    - HTTP 413 (the batch is over the server's `max_body_bytes` or `max_batch_pixels`): the batch is split to
      fit the limits the server states in its answer (they are kept for later calls); a single sample over a
      limit raises `RemoteRewardError` naming its size and the limit.

    `on_failure="raise"` raises `RemoteRewardError`; `on_failure="none"` logs a warning and returns
    `[None] * N` (the batch is unscored, so its advantages are 0). Connections go direct (environment
    proxies are ignored, so the token never passes through a proxy).

    Args:
        url (`str`): server base URL, e.g. `"http://127.0.0.1:8000"`.
        token (`str`, *optional*): bearer token; defaults to the `REWARD_SERVER_TOKEN` environment variable.
        name (`str`, *optional*): the logged name; defaults to `"remote"`.
        timeout (`float`, defaults to 60.0): seconds for one attempt, from connecting to the last byte of the
            answer (sending the batch and the scoring included), however the server paces its bytes.
        max_retries (`int`, defaults to 3): retries after the first attempt.
        backoff (`float`, defaults to 0.5), backoff_max (`float`, defaults to 10.0): seconds.
        on_failure (`str`, defaults to `"raise"`): `"raise"` or `"none"`.
        columns (`list[str]`, *optional*): the columns to forward; default all (they must be JSON).

    Attributes:
        last_attempts (`int`): HTTP attempts made by the latest call (over all its parts, if it was split).
        limits (`dict[str, int]`): the server's limits once a 413 stated them (`max_body_bytes`,
            `max_batch_pixels`, ...); later batches are split to fit them before they are sent.
    """

    def __init__(self, url: str, token: str | None = None, name: str | None = None, *, timeout: float = 60.0,
                 max_retries: int = 3, backoff: float = 0.5, backoff_max: float = 10.0, on_failure: str = "raise",
                 columns: list[str] | None = None):
        if on_failure not in ("raise", "none"):
            raise ValueError(f"on_failure must be 'raise' or 'none', got {on_failure!r}")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must look like 'http://host:port', got {url!r}")
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        if not token:
            raise ValueError(f"pass `token` or set {TOKEN_ENV}")
        self.url = url.rstrip("/")
        self.name = name or "remote"
        self.timeout, self.max_retries, self.on_failure = timeout, max_retries, on_failure
        self.backoff, self.backoff_max = backoff, backoff_max
        self.columns = columns
        self.last_attempts = 0
        self.limits: dict[str, int] = {}
        self._token = token
        self._connection_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._host, self._port, self._base_path = parts.hostname, parts.port, parts.path.rstrip("/")

    def __repr__(self) -> str:  # never print the token
        return f"RemoteReward(url={self.url!r}, name={self.name!r})"

    def health(self) -> dict[str, Any]:
        """`GET /health` (one attempt); returns the server's JSON, e.g.
        `{"status": "ok", "reward": "ocr", "limits": {...}}`."""
        status, location, raw = self._request("GET", "/health")
        if status != 200:
            raise RemoteRewardError(f"remote reward {self.name!r} at {self.url}: /health answered HTTP {status}"
                                    + (f" (a redirect to {location!r}, not followed)" if location else ""))
        return json.loads(raw)

    def __call__(self, prompts: list[str], images: list[Any], **columns: Any) -> list[float | None]:
        """Score a batch remotely: `list[float | None]` of length N (see the class docstring for failures)."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} images")
        batch = self._encode(prompts, images, columns)
        self.last_attempts = 0
        try:
            return self._score(batch, list(range(len(prompts))))
        except _Failed as exc:
            if self.on_failure == "none":
                logger.warning("remote reward %r: %s; returning None for %d samples", self.name, exc, len(prompts))
                return [None] * len(prompts)
            raise RemoteRewardError(f"remote reward {self.name!r} at {self.url}: {exc}") from None

    def _encode(self, prompts: list[str], images: list[Any], columns: dict[str, Any]) -> dict[str, Any]:
        keep = columns if self.columns is None else {k: v for k, v in columns.items() if k in self.columns}
        sent = {}
        for key, value in keep.items():
            try:
                json.dumps(value)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"column {key!r} is not JSON-serialisable ({exc}); pass `columns=` to choose") from None
            sent[key] = list(value)
        encoded = [encode_image(image) for image in images]  # PIL images or uint8 arrays (else TypeError)
        pixels = [image.width * image.height if hasattr(image, "width") else image.shape[0] * image.shape[1]
                  for image in images]
        return {"prompts": list(prompts), "images": encoded, "columns": sent, "pixels": pixels}

    def _body(self, batch: dict[str, Any], indices: list[int]) -> bytes:
        return json.dumps({"prompts": [batch["prompts"][i] for i in indices],
                           "images": [batch["images"][i] for i in indices],
                           "columns": {k: [v[i] for i in indices] for k, v in batch["columns"].items()}}).encode()

    def _over_limits(self, body_bytes: int, pixels: int) -> str | None:
        """Which known server limit a request of this size breaks, described; None if none."""
        if body_bytes > self.limits.get("max_body_bytes", body_bytes):
            return f"{body_bytes:,} bytes, over the server's max_body_bytes of {self.limits['max_body_bytes']:,}"
        if pixels > self.limits.get("max_batch_pixels", pixels):
            return f"{pixels:,} pixels, over the server's max_batch_pixels of {self.limits['max_batch_pixels']:,}"
        return None

    def _score(self, batch: dict[str, Any], indices: list[int]) -> list[float | None]:
        """Score the samples `indices` of `batch`, in halves (recursively) while they break the server's limits."""
        body = self._body(batch, indices)
        pixels = sum(batch["pixels"][i] for i in indices)
        over = self._over_limits(len(body), pixels)
        if over is None:
            try:
                return self._post_with_retries(body, len(indices))
            except _TooLarge as exc:
                self.limits.update(exc.limits)
                over = self._over_limits(len(body), pixels)
                if over is None:  # the server gave no limit that explains it: nothing to split by
                    raise RemoteRewardError(f"remote reward {self.name!r} at {self.url}: the request of "
                                            f"{len(body):,} bytes and {pixels:,} pixels was refused: {exc}") from None
        if len(indices) == 1:
            raise RemoteRewardError(
                f"remote reward {self.name!r} at {self.url}: sample {indices[0]} alone is {over} (HTTP 413); "
                f"send smaller images, or raise the server's limit (--max-body-bytes, --max-batch-pixels)")
        half = len(indices) // 2
        logger.info("remote reward %r: %d samples are %s; scoring them in two parts", self.name, len(indices), over)
        return self._score(batch, indices[:half]) + self._score(batch, indices[half:])

    def _post_with_retries(self, body: bytes, n: int) -> list[float | None]:
        request_id = uuid.uuid4().hex  # the same on every retry: the server answers a retry without rescoring
        attempts = 0
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), self.backoff_max))
            attempts += 1
            self.last_attempts += 1
            try:
                return self._post_once(body, n, request_id)
            except _Retryable as exc:
                logger.info("remote reward %r attempt %d failed: %s", self.name, attempt + 1, exc)
                last = exc
        raise _Failed(f"gave up after {attempts} attempts, last error: {last}")

    def _post_once(self, body: bytes, n: int, request_id: str) -> list[float | None]:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self._token}",
                   "X-Request-Id": request_id}
        try:
            status, location, raw = self._request("POST", "/score", body, headers)
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, dropped
            raise _Retryable(f"{type(exc).__name__}: {exc}") from None
        if status == 200:
            try:
                values = json.loads(raw)["rewards"]
                return validate_output(self.name, values, n)
            except (ValueError, KeyError, TypeError) as exc:
                raise _Failed(f"malformed response ({type(exc).__name__}: {exc})") from None
        detail, payload = _error_text(raw)
        if 300 <= status < 400:
            raise RemoteRewardError(
                f"remote reward {self.name!r} at {self.url} answered HTTP {status}, a redirect to {location!r}; "
                f"redirects are not followed (the token would go with it): point `url` at the reward server")
        if status in (401, 403):
            raise RemoteRewardAuthError(f"remote reward {self.name!r} refused the token (HTTP {status}): {detail}")
        if status == 413:
            limits = {k: v for k, v in payload.items() if k.startswith("max_") and isinstance(v, int)}
            raise _TooLarge(f"HTTP 413: {detail}", limits)
        if status in RETRYABLE_STATUS:
            raise _Retryable(f"HTTP {status}: {detail}")
        if status >= 500:
            raise _Failed(f"HTTP {status}: {detail}")
        if 400 <= status < 500:
            raise RemoteRewardError(f"remote reward {self.name!r} rejected the request (HTTP {status}): {detail}")
        raise _Failed(f"unexpected HTTP {status}: {detail}")

    def _request(self, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, str | None, bytes]:
        """One HTTP exchange, done within `timeout` seconds in all: `(status, Location header, body)`. Raises
        `TimeoutError` past the deadline, `OSError`/`http.client.HTTPException` on transport errors."""
        connection = self._connection_cls(self._host, self._port, timeout=self.timeout)
        expired, sockets = threading.Event(), []

        def expire() -> None:  # unblocks whatever read or write the exchange is in
            expired.set()
            for sock in sockets:  # kept here: the connection drops its reference once the answer says "close"
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        timer = threading.Timer(self.timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            connection.connect()
            sockets.append(connection.sock)
            if expired.is_set():  # expired while connecting, before the socket was there to shut down
                raise TimeoutError
            connection.request(method, self._base_path + path, body=body,
                               headers={**(headers or {}), "Connection": "close"})
            response = connection.getresponse()
            if response.length is not None and response.length > MAX_RESPONSE_BYTES:
                raise http.client.HTTPException(f"answer of {response.length:,} bytes announced; not a reward server")
            raw = response.read(MAX_RESPONSE_BYTES + 1)
            if len(raw) > MAX_RESPONSE_BYTES:
                raise http.client.HTTPException(f"answer over {MAX_RESPONSE_BYTES:,} bytes; not a reward server")
            if expired.is_set():
                raise TimeoutError
            return response.status, response.getheader("Location"), raw
        except (OSError, http.client.HTTPException):
            if expired.is_set():
                raise TimeoutError(f"timed out: no complete answer within {self.timeout} s") from None
            raise
        finally:
            timer.cancel()
            connection.close()


def _error_text(raw: bytes) -> tuple[str, dict[str, Any]]:
    """The `error` of a server's JSON error answer (at most 500 characters) and the whole answer."""
    try:
        payload = json.loads(raw)
        return str(payload.get("error", ""))[:500], payload
    except Exception:  # the error body is only informative
        return raw[:200].decode("utf-8", "replace"), {}
