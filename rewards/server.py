"""Serve any reward over HTTP + JSON (protocol in `rlhf_image.rewards.remote`).

Run one from the command line (the token comes from an environment variable, never the command line,
so it does not show in `ps`):

    REWARD_TOKEN=... python -m rlhf_image.rewards.server --reward rlhf_image.rewards.ocr:OCRReward --port 8000 --token-env REWARD_TOKEN

`--reward module:attr` names a reward object or function, or a class (instantiated with
`--kwargs '{"use_det": false}'`). In tests use `serve_reward(reward)` as a context manager.

What a client can make the server hold is bounded (see `RewardServer` for the knobs):
- the token, path and body size are checked from the headers, before any byte of the body is read; a refused
  request's body is then read and thrown away in small pieces, so the client can read the refusal;
- connections are served by at most `max_connections` threads; further ones wait in the listen backlog;
- each request must arrive whole (headers and body) within `request_timeout` seconds, however slowly it trickles;
- request bodies held in memory at once total at most `max_body_bytes * (max_concurrency + 1)`;
- images are checked against `max_pixels` (each) and `max_batch_pixels` (all of a request) from their PNG
  headers, and decoded only inside one of the `max_concurrency` scoring slots;
- a request repeated with the same `X-Request-Id` (a client's retry) waits for the first one's answer, or gets it
  if it is already known, instead of running the reward again.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import importlib
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .base import call_reward, reward_name
from .remote import open_png

logger = logging.getLogger(__name__)

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
RESULT_TTL_S = 600.0  # how long an answer is kept for a late retry of its request id
MAX_KEPT_RESULTS = 1024
_DISCARD_CHUNK = 64 << 10
_RESERVED_COLUMNS = ("prompts", "images")  # the reward's own arguments


class _BadRequest(Exception):
    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.extra = status, extra


def _load_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _BadRequest(400, f"body is not JSON: {exc}") from None
    except RecursionError:
        raise _BadRequest(400, "body is JSON nested too deeply") from None


def _parse_score_request(payload: Any, max_pixels: int, max_batch_pixels: int, limits: dict[str, int]):
    """`(prompts, images, columns)` of a parsed `/score` body; images are opened (headers checked) but not decoded,
    and each one's base64 text is dropped from `payload` once opened (the bytes are held once, not twice)."""
    if not isinstance(payload, dict):
        raise _BadRequest(400, "body must be a JSON object")
    prompts, images, columns = payload.get("prompts"), payload.get("images"), payload.get("columns", {})
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise _BadRequest(400, "'prompts' must be a list of strings")
    if not isinstance(images, list) or len(images) != len(prompts):
        raise _BadRequest(400, "'images' must be a list as long as 'prompts'")
    n = len(prompts)
    if not isinstance(columns, dict) or not all(isinstance(v, list) and len(v) == n for v in columns.values()):
        raise _BadRequest(400, "'columns' must map names to lists as long as 'prompts'")
    clashing = [name for name in _RESERVED_COLUMNS if name in columns]
    if clashing:
        raise _BadRequest(400, f"column(s) {clashing} have the names of the reward's own arguments "
                               f"{list(_RESERVED_COLUMNS)}; rename them")
    opened = []
    try:
        for index, image in enumerate(images):
            try:
                opened.append(open_png(image, max_pixels))
            except ValueError as exc:
                raise _BadRequest(400, f"bad image {index}: {exc}") from None
            images[index] = None
        batch_pixels = sum(image.width * image.height for image in opened)
        if batch_pixels > max_batch_pixels:
            raise _BadRequest(413, f"the {n} images have {batch_pixels:,} pixels in all, over the server's "
                                   f"max_batch_pixels of {max_batch_pixels:,}; send fewer images per request",
                              batch_pixels=batch_pixels, **limits)
    except _BadRequest:
        for image in opened:
            image.close()
        raise
    return prompts, opened, columns


class _Deadlines:
    """Shuts down the connections that have not delivered their request in time, however slowly they trickle."""

    def __init__(self):
        self._lock = threading.Lock()
        self._due: dict[socket.socket, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def arm(self, connection: socket.socket, seconds: float) -> None:
        with self._lock:
            self._due[connection] = time.monotonic() + seconds

    def disarm(self, connection: socket.socket) -> None:
        with self._lock:
            self._due.pop(connection, None)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="reward-server-deadlines", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            now = time.monotonic()
            with self._lock:
                late = [connection for connection, due in self._due.items() if due <= now]
                for connection in late:
                    del self._due[connection]
            for connection in late:
                try:
                    connection.shutdown(socket.SHUT_RDWR)  # the handler's blocked read returns at once
                except OSError:
                    pass


class _ByteBudget:
    """At most `capacity` bytes of request bodies held at once; a request waits (unread) for its share."""

    def __init__(self, capacity: int):
        self._free = capacity
        self._changed = threading.Condition()

    @contextmanager
    def reserve(self, nbytes: int):
        with self._changed:
            self._changed.wait_for(lambda: self._free >= nbytes)
            self._free -= nbytes
        try:
            yield
        finally:
            with self._changed:
                self._free += nbytes
                self._changed.notify_all()


class _Request:
    """A request id being answered, or answered: its body's digest, and the answer once known."""

    def __init__(self, digest: bytes):
        self.digest = digest
        self.done = threading.Event()
        self.answer: tuple[int, dict[str, Any]] = (500, {"error": "the request ended without an answer"})
        self.finished_at = 0.0


class _HTTPServer(ThreadingHTTPServer):
    """A threading HTTP server with at most `max_connections` handler threads; connections that arrive
    meanwhile wait, accepted by the kernel into a listen backlog of `backlog`."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], max_connections: int,
                 backlog: int):
        self.request_queue_size = backlog  # read by server_activate() in the base constructor
        self._connection_slots = threading.Semaphore(max_connections)
        self.closing = False
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        while not self._connection_slots.acquire(timeout=0.2):
            if self.closing:
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connection_slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connection_slots.release()


class RewardServer:
    """A reward behind a threaded HTTP server, serving in a background thread once `start()`ed.

    Args:
        reward: any reward under the contract (sync or async).
        host (`str`, defaults to `"127.0.0.1"`): loopback only unless told otherwise.
        port (`int`, defaults to 0): 0 picks a free port; read it back from `.port` / `.url`.
        token (`str`, *optional*): the bearer token; a random one is generated when omitted.
        max_concurrency (`int`, defaults to 1): reward calls (with the decoding of their images) allowed at once.
            Requests are accepted concurrently (health answers while a batch is scored), but model rewards are
            rarely safe or faster when called from several threads, so calls queue by default.
        max_body_bytes (`int`, defaults to 256 MiB): larger requests get 413 (decided from `Content-Length`).
        max_pixels (`int`, defaults to 4096 * 4096): an image with more pixels (from its PNG header) gets 400.
        max_batch_pixels (`int`, defaults to 2**28, 16 images of 4096 x 4096): a request whose images have more
            pixels in all gets 413. Decoded RGB images take 3 bytes per pixel.
        max_connections (`int`, defaults to 32): connections served at once; the next ones wait in the backlog.
        request_timeout (`float`, defaults to 60.0): seconds a client has to send a whole request (headers and
            body), and to send the next request on a kept-alive connection; then the connection is closed.
        backlog (`int`, *optional*): the listen backlog; defaults to `max(256, 4 * max_connections)`.
    """

    def __init__(self, reward: Any, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 max_concurrency: int = 1, max_body_bytes: int = 256 << 20, max_pixels: int = 4096 * 4096,
                 max_batch_pixels: int = 1 << 28, max_connections: int = 32, request_timeout: float = 60.0,
                 backlog: int | None = None):
        if token is not None and not token:
            raise ValueError("the token must not be empty")
        for field, value in (("max_concurrency", max_concurrency), ("max_body_bytes", max_body_bytes),
                             ("max_pixels", max_pixels), ("max_batch_pixels", max_batch_pixels),
                             ("max_connections", max_connections), ("request_timeout", request_timeout)):
            if not value > 0:
                raise ValueError(f"{field} must be > 0, got {value!r}")
        if max_batch_pixels < max_pixels:
            raise ValueError(f"max_batch_pixels ({max_batch_pixels}) must be >= max_pixels ({max_pixels}), or no "
                             f"image at the limit could be scored")
        self.reward = reward
        self.name = reward_name(reward)
        self.token = token or secrets.token_urlsafe(32)
        self.max_body_bytes, self.max_pixels, self.max_batch_pixels = max_body_bytes, max_pixels, max_batch_pixels
        self.max_connections, self.request_timeout = max_connections, request_timeout
        self.backlog = backlog if backlog is not None else max(256, 4 * max_connections)
        self._slots = threading.Semaphore(max_concurrency)
        self._budget = _ByteBudget(max_body_bytes * (max_concurrency + 1))
        self._deadlines = _Deadlines()
        self._requests: OrderedDict[str, _Request] = OrderedDict()
        self._requests_lock = threading.Lock()
        self._httpd = _HTTPServer((host, port), self._handler_class(), max_connections, self.backlog)
        self._thread: threading.Thread | None = None

    @property
    def limits(self) -> dict[str, int]:
        """The limits a client needs to size its batches (sent by `/health` and with every 413)."""
        return {"max_body_bytes": self.max_body_bytes, "max_pixels": self.max_pixels,
                "max_batch_pixels": self.max_batch_pixels}

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        host = self._httpd.server_address[0]
        return f"http://{host}:{self.port}"

    def start(self) -> RewardServer:
        """Serve in a daemon thread; returns `self`."""
        self._deadlines.start()
        self._thread = threading.Thread(target=self._httpd.serve_forever, name=f"reward-server-{self.name}",
                                        daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted."""
        self._deadlines.start()
        try:
            self._httpd.serve_forever()
        finally:
            self._deadlines.stop()

    def close(self) -> None:
        """Stop serving and release the port."""
        self._httpd.closing = True
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._deadlines.stop()
        self._httpd.server_close()

    def __enter__(self) -> RewardServer:
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _authorized(self, header: str | None) -> bool:
        expected = f"Bearer {self.token}".encode()
        return hmac.compare_digest((header or "").encode(), expected)

    def _refusal(self, path: str, headers: Any) -> tuple[int, dict[str, Any]] | None:
        """The answer to a POST that its headers alone say to refuse, or None."""
        if not self._authorized(headers.get("Authorization")):
            return 401, {"error": "missing or wrong bearer token"}
        if path != "/score":
            return 404, {"error": f"no such path: {path}"}
        try:
            length = int(headers.get("Content-Length", ""))
        except ValueError:
            return 411, {"error": "Content-Length required"}
        if length < 0 or length > self.max_body_bytes:
            return 413, {"error": f"body of {length:,} bytes is over the server's max_body_bytes of "
                                  f"{self.max_body_bytes:,}; send fewer or smaller images per request",
                         "body_bytes": length, **self.limits}
        request_id = headers.get("X-Request-Id")
        if request_id is not None and not REQUEST_ID.fullmatch(request_id):
            return 400, {"error": "X-Request-Id must be 1 to 128 characters of A-Z a-z 0-9 . _ : -"}
        return None

    def _answer(self, body: bytes | None, request_id: str | None) -> tuple[int, dict[str, Any]] | None:
        """Score `body`, or, for a request id already seen, wait for (or repeat) the answer of its first request.
        None when there is no body (the client did not send it all)."""
        if body is None:
            return None
        digest = hashlib.sha256(body).digest() if request_id is not None else b""
        # one copy of the data at a time, or nearly: bytes -> text -> parsed payload, each freed once converted
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            return 400, {"error": f"body is not JSON: not UTF-8 ({exc.reason} at byte {exc.start})"}
        del body
        try:
            payload = _load_json(text)
        except _BadRequest as exc:
            return exc.status, {"error": str(exc)}
        del text
        if request_id is None:
            return self._score(payload)
        with self._requests_lock:
            entry = self._requests.get(request_id)
            first = entry is None
            if first:
                entry = self._requests[request_id] = _Request(digest)
        if not first:
            del payload
            if entry.digest != digest:
                return 409, {"error": f"request id {request_id!r} was used before for another body; use a new id "
                                      f"per batch and the same one only to retry it"}
            entry.done.wait()
            return entry.answer
        try:
            entry.answer = self._score(payload)
        finally:
            entry.finished_at = time.monotonic()
            entry.done.set()
            self._forget_old_requests()
        return entry.answer

    def _forget_old_requests(self) -> None:
        now = time.monotonic()
        with self._requests_lock:
            finished = [(key, e) for key, e in self._requests.items() if e.done.is_set()]
            excess = len(finished) - MAX_KEPT_RESULTS
            for number, (key, entry) in enumerate(finished):
                if number < excess or now - entry.finished_at > RESULT_TTL_S:
                    del self._requests[key]

    def _score(self, payload: Any) -> tuple[int, dict[str, Any]]:
        try:
            prompts, images, columns = _parse_score_request(payload, self.max_pixels, self.max_batch_pixels,
                                                            self.limits)
            del payload
        except _BadRequest as exc:
            return exc.status, {"error": str(exc), **exc.extra}
        try:
            with self._slots:  # decoding belongs to the slot: it is where the memory goes
                for index, image in enumerate(images):
                    try:
                        image.load()
                    except Exception as exc:  # PIL raises several types for corrupt data
                        return 400, {"error": f"bad image {index}: not a PNG image: {exc}"}
                try:
                    rewards = call_reward(self.reward, prompts, images, **columns)
                except Exception as exc:  # the reward crashed or broke the contract: the client decides
                    logger.exception("reward %r failed", self.name)
                    return 500, {"error": f"reward {self.name!r} failed: {type(exc).__name__}: {exc}"}
        finally:
            for image in images:
                image.close()
        return 200, {"rewards": rewards, "reward": self.name}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = server.request_timeout  # per socket operation; the deadline below bounds the whole request

            def log_message(self, fmt: str, *args: Any) -> None:
                logger.debug("%s " + fmt, self.address_string(), *args)

            def handle_one_request(self) -> None:
                server._deadlines.arm(self.connection, server.request_timeout)
                try:
                    super().handle_one_request()
                finally:
                    server._deadlines.disarm(self.connection)

            def _send(self, status: int, payload: dict[str, Any], request_id: str | None = None) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if request_id is not None:
                    self.send_header("X-Request-Id", request_id)
                if self.close_connection:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

            def _refuse(self, status: int, payload: dict[str, Any]) -> None:
                """Answer, then read and discard what the client still sends (up to its Content-Length, within
                the request's deadline): closing on unread data would make the kernel reset the connection, and
                the client, busy sending, would see a broken pipe instead of the answer."""
                self.close_connection = True
                self._send(status, payload)
                try:
                    self.connection.shutdown(socket.SHUT_WR)  # the answer is complete
                    remaining = int(self.headers.get("Content-Length", "-1"))
                except (OSError, ValueError):
                    return
                remaining = remaining if remaining >= 0 else float("inf")
                try:
                    while remaining > 0:
                        chunk = self.rfile.read1(int(min(_DISCARD_CHUNK, remaining)))
                        if not chunk:
                            break
                        remaining -= len(chunk)
                except OSError:
                    pass

            def _read_body(self, length: int) -> bytes | None:
                """The body, or None if the client did not send it all within the request's deadline."""
                server._deadlines.arm(self.connection, server.request_timeout)
                try:
                    body = self.rfile.read(length)
                except OSError:
                    return None
                finally:
                    server._deadlines.disarm(self.connection)
                return body if len(body) == length else None

            def handle_expect_100(self) -> bool:
                refusal = server._refusal(self.path, self.headers) if self.command == "POST" else None
                if refusal is None:
                    return super().handle_expect_100()
                self.close_connection = True  # the client sends no body: nothing to discard
                self._send(*refusal)
                return False

            def do_GET(self) -> None:
                if self.path == "/health":
                    self._send(200, {"status": "ok", "reward": server.name, "limits": server.limits})
                else:
                    self._send(404, {"error": f"no such path: {self.path}"})

            def do_POST(self) -> None:
                refusal = server._refusal(self.path, self.headers)
                if refusal is not None:
                    self._refuse(*refusal)
                    return
                length, request_id = int(self.headers["Content-Length"]), self.headers.get("X-Request-Id")
                server._deadlines.disarm(self.connection)  # waiting for memory is not the client's delay
                with server._budget.reserve(length):
                    # the body is handed on, not kept here, so it is freed as soon as it is parsed
                    answer = server._answer(self._read_body(length), request_id)
                if answer is None:  # the client gave up, or was too slow
                    self.close_connection = True
                    return
                try:
                    self._send(*answer, request_id)
                except OSError:  # the client left (timed out): a retry with its request id gets the answer
                    self.close_connection = True

        return Handler


def serve_reward(reward: Any, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 **kwargs: Any) -> RewardServer:
    """Start serving `reward` in a background thread; use as `with serve_reward(r) as server: server.url`.
    `kwargs` are the other arguments of [`RewardServer`] (`max_concurrency`, `max_body_bytes`, ...)."""
    return RewardServer(reward, host=host, port=port, token=token, **kwargs).start()


def load_reward(spec: str, kwargs: dict[str, Any] | None = None) -> Any:
    """`"module:attr"` -> the reward; a class is instantiated with `kwargs`."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--reward must look like 'module:attr', got {spec!r}")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj(**(kwargs or {})) if isinstance(obj, type) else obj


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a reward over HTTP + JSON.")
    parser.add_argument("--reward", required=True, help="module:attr of a reward, function or class")
    parser.add_argument("--kwargs", default="{}", help="JSON keyword arguments when --reward names a class")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--token-env", default="REWARD_SERVER_TOKEN", help="environment variable holding the token")
    parser.add_argument("--max-concurrency", type=int, default=1, help="reward calls at once")
    parser.add_argument("--max-body-bytes", type=int, default=256 << 20, help="larger requests get 413")
    parser.add_argument("--max-pixels", type=int, default=4096 * 4096, help="per image; larger ones get 400")
    parser.add_argument("--max-batch-pixels", type=int, default=1 << 28, help="per request; more gets 413")
    parser.add_argument("--max-connections", type=int, default=32, help="connections served at once")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="seconds to send a whole request")
    args = parser.parse_args(argv)
    token = os.environ.get(args.token_env)
    if not token:
        parser.error(f"set the bearer token in the environment variable {args.token_env}")
    logging.basicConfig(level=logging.INFO)
    reward = load_reward(args.reward, json.loads(args.kwargs))
    server = RewardServer(reward, host=args.host, port=args.port, token=token, max_concurrency=args.max_concurrency,
                          max_body_bytes=args.max_body_bytes, max_pixels=args.max_pixels,
                          max_batch_pixels=args.max_batch_pixels, max_connections=args.max_connections,
                          request_timeout=args.request_timeout)
    print(f"serving reward {server.name!r} on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


if __name__ == "__main__":
    main()
