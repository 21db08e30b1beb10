"""Serve any reward over HTTP + JSON (protocol in `rlhf_image.rewards.remote`).

Run one from the command line (the token comes from an environment variable, never the command line,
so it does not show in `ps`):

    REWARD_TOKEN=... python -m rlhf_image.rewards.server --reward rlhf_image.rewards.ocr:OCRReward --port 8000 --token-env REWARD_TOKEN

`--reward module:attr` names a reward object or function, or a class (instantiated with
`--kwargs '{"use_det": false}'`). In tests use `serve_reward(reward)` as a context manager.
"""

from __future__ import annotations

import argparse
import hmac
import importlib
import json
import logging
import os
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .base import call_reward, reward_name
from .remote import decode_image

logger = logging.getLogger(__name__)


class _BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _parse_score_request(body: bytes) -> tuple[list[str], list[Any], dict[str, list[Any]]]:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _BadRequest(400, f"body is not JSON: {exc}") from None
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
    try:
        decoded = [decode_image(image) for image in images]
    except ValueError as exc:
        raise _BadRequest(400, f"bad image: {exc}") from None
    return prompts, decoded, columns


class RewardServer:
    """A reward behind a threaded HTTP server, serving in a background thread once `start()`ed.

    Args:
        reward: any reward under the contract (sync or async).
        host (`str`, defaults to `"127.0.0.1"`): loopback only unless told otherwise.
        port (`int`, defaults to 0): 0 picks a free port; read it back from `.port` / `.url`.
        token (`str`, *optional*): the bearer token; a random one is generated when omitted.
        max_concurrency (`int`, defaults to 1): reward calls allowed at once. Requests are accepted
            concurrently (health answers while a batch is scored), but model rewards are rarely
            safe or faster when called from several threads, so calls queue by default.
        max_body_bytes (`int`, defaults to 256 MiB): larger requests get 413.
    """

    def __init__(self, reward: Any, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 max_concurrency: int = 1, max_body_bytes: int = 256 << 20):
        if token is not None and not token:
            raise ValueError("the token must not be empty")
        self.reward = reward
        self.name = reward_name(reward)
        self.token = token or secrets.token_urlsafe(32)
        self.max_body_bytes = max_body_bytes
        self._slots = threading.Semaphore(max_concurrency)
        self._httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        host = self._httpd.server_address[0]
        return f"http://{host}:{self.port}"

    def start(self) -> RewardServer:
        """Serve in a daemon thread; returns `self`."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, name=f"reward-server-{self.name}",
                                        daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted."""
        self._httpd.serve_forever()

    def close(self) -> None:
        """Stop serving and release the port."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> RewardServer:
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _authorized(self, header: str | None) -> bool:
        expected = f"Bearer {self.token}".encode()
        return hmac.compare_digest((header or "").encode(), expected)

    def _score(self, body: bytes) -> dict[str, Any]:
        prompts, images, columns = _parse_score_request(body)
        with self._slots:
            rewards = call_reward(self.reward, prompts, images, **columns)
        return {"rewards": rewards, "reward": self.name}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt: str, *args: Any) -> None:
                logger.debug("%s " + fmt, self.address_string(), *args)

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/health":
                    self._send(200, {"status": "ok", "reward": server.name})
                else:
                    self._send(404, {"error": f"no such path: {self.path}"})

            def do_POST(self) -> None:
                try:
                    length = int(self.headers.get("Content-Length", ""))
                except ValueError:
                    self.close_connection = True
                    self._send(411, {"error": "Content-Length required"})
                    return
                if length < 0 or length > server.max_body_bytes:
                    self.close_connection = True
                    self._send(413, {"error": f"body larger than {server.max_body_bytes} bytes"})
                    return
                # Read the body even when refusing: closing with unread data makes the kernel send a
                # reset, and the client would see "connection reset" instead of the 401.
                body = self.rfile.read(length)
                if not server._authorized(self.headers.get("Authorization")):
                    self._send(401, {"error": "missing or wrong bearer token"})
                    return
                if self.path != "/score":
                    self._send(404, {"error": f"no such path: {self.path}"})
                    return
                try:
                    self._send(200, server._score(body))
                except _BadRequest as exc:
                    self._send(exc.status, {"error": str(exc)})
                except Exception as exc:  # the reward crashed or broke the contract: the client decides
                    logger.exception("reward %r failed", server.name)
                    self._send(500, {"error": f"reward {server.name!r} failed: {type(exc).__name__}: {exc}"})

        return Handler


def serve_reward(reward: Any, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 max_concurrency: int = 1) -> RewardServer:
    """Start serving `reward` in a background thread; use as `with serve_reward(r) as server: server.url`."""
    return RewardServer(reward, host=host, port=port, token=token, max_concurrency=max_concurrency).start()


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
    parser.add_argument("--max-concurrency", type=int, default=1)
    args = parser.parse_args(argv)
    token = os.environ.get(args.token_env)
    if not token:
        parser.error(f"set the bearer token in the environment variable {args.token_env}")
    logging.basicConfig(level=logging.INFO)
    reward = load_reward(args.reward, json.loads(args.kwargs))
    server = RewardServer(reward, host=args.host, port=args.port, token=token, max_concurrency=args.max_concurrency)
    print(f"serving reward {server.name!r} on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


if __name__ == "__main__":
    main()
