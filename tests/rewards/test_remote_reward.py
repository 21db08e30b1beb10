"""Reward server and RemoteReward client on loopback, including a deliberately faulty server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rlhf_image.rewards import RemoteReward, RemoteRewardAuthError, RemoteRewardError, RewardSet, serve_reward
from rlhf_image.rewards.remote import encode_image

REPO = Path(__file__).resolve().parents[2]
FAST = dict(timeout=0.3, backoff=0.01, backoff_max=0.02)  # keep failure tests quick


def pixel_reward(prompts, images, scale=None, **columns):
    """Mean pixel value times an optional per-sample `scale` column; None for prompts without 'x'."""
    scale = scale or [1.0] * len(prompts)
    return [float(np.asarray(im, dtype=np.float64).mean()) * s if "x" in p else None
            for p, im, s in zip(prompts, images, scale)]


def images(n=3):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (8 + i, 12, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def server():
    with serve_reward(pixel_reward, token="s3cret") as srv:
        yield srv


def post(url, body: bytes, token="s3cret"):
    request = urllib.request.Request(url, data=body, method="POST", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_remote_scores_equal_local(server):
    prompts, imgs = ["x1", "no", "x3"], images()
    remote = RemoteReward(server.url, token="s3cret", name="pixels")
    local = pixel_reward(prompts, imgs, scale=[1.0, 2.0, 0.5])
    assert remote(prompts, imgs, scale=[1.0, 2.0, 0.5]) == pytest.approx(local) and local[1] is None
    assert remote.last_attempts == 1
    assert server.url.startswith("http://127.0.0.1:")


def test_remote_ocr_reward_equals_local(ocr_rec, render):
    prompts, imgs = ['"EXIT"', '"CAFE"', "no target"], [render("EXIT"), render("CAFX"), render("EXIT")]
    with serve_reward(ocr_rec) as srv:
        remote = RemoteReward(srv.url, token=srv.token)
        assert remote(prompts, imgs) == ocr_rec(prompts, imgs) == [1.0, 0.75, None]


def test_health(server):
    limits = {"max_body_bytes": 256 << 20, "max_pixels": 4096 * 4096, "max_batch_pixels": 1 << 28}
    assert RemoteReward(server.url, token="s3cret").health() == {"status": "ok", "reward": "pixel_reward",
                                                                 "limits": limits}


@pytest.mark.parametrize("on_failure", ["raise", "none"])
def test_wrong_token_is_an_auth_error_and_not_retried(server, on_failure):
    remote = RemoteReward(server.url, token="wrong", max_retries=3, on_failure=on_failure, **FAST)
    with pytest.raises(RemoteRewardAuthError, match="refused the token.*401"):
        remote(["x"], images(1))
    assert remote.last_attempts == 1


def test_server_rejects_malformed_requests(server):
    score = server.url + "/score"
    good = {"prompts": ["x"], "images": [encode_image(images(1)[0])], "columns": {}}
    assert post(score, json.dumps(good).encode())[0] == 200
    assert post(score, json.dumps(good).encode(), token="")[0] == 401
    assert post(server.url + "/nothing", json.dumps(good).encode())[0] == 404
    bad_bodies = [b"not json", b"[1, 2]", {"prompts": ["x"], "images": []}, {"prompts": [1], "images": ["a"]},
                  {"prompts": ["x"], "images": ["%%%"]}, {"prompts": ["x"], "images": ["aGVsbG8="]},
                  {**good, "columns": {"scale": [1.0, 2.0]}}, {**good, "columns": []}]
    for body in bad_bodies:
        status, payload = post(score, body if isinstance(body, bytes) else json.dumps(body).encode())
        assert status == 400 and payload["error"], body


def crashing_reward(prompts, images, **columns):
    raise RuntimeError("model exploded")


def nan_reward(prompts, images, **columns):
    return [float("nan")] * len(prompts)


def test_reward_failure_is_500_and_not_retried():
    with serve_reward(crashing_reward, token="t") as srv:
        remote = RemoteReward(srv.url, token="t", max_retries=3, **FAST)
        with pytest.raises(RemoteRewardError, match="HTTP 500.*model exploded"):
            remote(["x", "y"], images(2))
        assert remote.last_attempts == 1
        lenient = RemoteReward(srv.url, token="t", max_retries=3, on_failure="none", **FAST)
        assert lenient(["x", "y"], images(2)) == [None, None] and lenient.last_attempts == 1


def test_nan_from_a_served_reward_arrives_as_unscored():
    with serve_reward(nan_reward, token="t") as srv, pytest.warns(RuntimeWarning, match="nan at index 0"):
        remote = RemoteReward(srv.url, token="t", max_retries=3, **FAST)
        assert remote(["x", "y"], images(2)) == [None, None] and remote.last_attempts == 1


class FaultyServer:
    """A loopback server that answers POST /score with `modes[i]` on the i-th request (the last one repeats).

    Modes: "stall" (no answer until the test ends), "503", "500", "garbage" (not JSON),
    "short" (one value too few), "ok" (one reward of 1.0 per prompt), "redirect" (`redirect_status` to
    `redirect_to`), "trickle" (a valid answer, one byte every 0.1 s). `authorizations` records the Authorization
    headers received; a GET (where a 302 sends a client) gets one reward of 1.0.
    """

    def __init__(self, *modes: str, redirect_to: str = "", redirect_status: int = 307):
        self.modes, self.requests, self.release = list(modes), 0, threading.Event()
        self.redirect_to, self.redirect_status, self.authorizations = redirect_to, redirect_status, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.requests += 1
                outer.authorizations.append(self.headers.get("Authorization"))
                body = json.dumps({"rewards": [1.0]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                n = len(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["prompts"])
                mode = outer.modes[min(outer.requests, len(outer.modes) - 1)]
                outer.requests += 1
                outer.authorizations.append(self.headers.get("Authorization"))
                if mode == "stall":
                    outer.release.wait(5.0)
                    return
                if mode in ("redirect", "trickle"):
                    body = json.dumps({"rewards": [1.0] * n}).encode()
                    self.send_response(outer.redirect_status if mode == "redirect" else 200)
                    self.send_header("Content-Length", "0" if mode == "redirect" else str(len(body)))
                    if mode == "redirect":
                        self.send_header("Location", outer.redirect_to + "/score")
                    self.end_headers()
                    for byte in body if mode == "trickle" else b"":
                        if outer.release.wait(0.1):
                            return
                        self.wfile.write(bytes([byte]))
                    return
                status, body = {"503": (503, b'{"error": "busy"}'), "500": (500, b'{"error": "boom"}'),
                                "garbage": (200, b"<html>oops"),
                                "short": (200, json.dumps({"rewards": [1.0] * (n - 1)}).encode()),
                                "ok": (200, json.dumps({"rewards": [1.0] * n}).encode())}[mode]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> int:
        """The number of requests received, once it reaches `n` (a request the client gave up on may still be
        on its way through a busy machine) or after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self.requests < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.requests

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("on_failure", ["raise", "none"])
def test_stalled_server_times_out_and_is_retried(on_failure):
    with FaultyServer("stall") as faulty:
        remote = RemoteReward(faulty.url, token="t", max_retries=2, on_failure=on_failure, **FAST)
        start = time.perf_counter()
        if on_failure == "raise":
            with pytest.raises(RemoteRewardError, match="gave up after 3 attempts.*timed out"):
                remote(["x", "y"], images(2))
        else:
            assert remote(["x", "y"], images(2)) == [None, None]
        assert time.perf_counter() - start < 2.0
        assert remote.last_attempts == 3 and faulty.wait_for_requests(3) == 3


def test_503_is_retried_until_success():
    with FaultyServer("503", "503", "ok") as faulty:
        remote = RemoteReward(faulty.url, token="t", max_retries=3, **FAST)
        assert remote(["x", "y"], images(2)) == [1.0, 1.0]
        assert remote.last_attempts == faulty.requests == 3


@pytest.mark.parametrize("mode, message", [("500", "HTTP 500: boom"), ("garbage", "malformed response"),
                                           ("short", "malformed response.*1 values for 2 samples")])
def test_500_and_malformed_responses_are_not_retried(mode, message):
    with FaultyServer(mode) as faulty:
        remote = RemoteReward(faulty.url, token="t", max_retries=3, **FAST)
        with pytest.raises(RemoteRewardError, match=message):
            remote(["x", "y"], images(2))
        assert remote.last_attempts == faulty.requests == 1
        lenient = RemoteReward(faulty.url, token="t", max_retries=3, on_failure="none", **FAST)
        assert lenient(["x", "y"], images(2)) == [None, None] and faulty.requests == 2


@pytest.mark.parametrize("on_failure", ["raise", "none"])
@pytest.mark.parametrize("status", [302, 307])
def test_redirects_are_refused_and_the_token_stays_home(status, on_failure):
    with FaultyServer("ok") as elsewhere, \
            FaultyServer("redirect", redirect_to=elsewhere.url, redirect_status=status) as faulty:
        remote = RemoteReward(faulty.url, token="t", max_retries=3, on_failure=on_failure, **FAST)
        with pytest.raises(RemoteRewardError, match=f"HTTP {status}, a redirect to .*/score.*not followed"):
            remote(["x"], images(1))
        assert faulty.authorizations == ["Bearer t"] and elsewhere.authorizations == [] and remote.last_attempts == 1


def test_the_timeout_bounds_a_whole_attempt_not_each_read():
    """A server trickling its (valid) answer one byte every 0.1 s would take seconds per attempt; each attempt
    is cut at `timeout` in all."""
    with FaultyServer("trickle") as faulty:
        remote = RemoteReward(faulty.url, token="t", timeout=0.5, max_retries=1, backoff=0.01)
        start = time.perf_counter()
        with pytest.raises(RemoteRewardError, match="gave up after 2 attempts.*timed out.*within 0.5 s"):
            remote(["x", "y"], images(2))
        assert time.perf_counter() - start < 2.5  # 2 x 0.5 s; the answer alone would take 2 x 2.5 s
        assert faulty.wait_for_requests(2) == 2


def test_a_batch_over_the_servers_body_limit_is_split_to_fit():
    calls = []

    def counting_pixels(prompts, images, **columns):
        calls.append(len(images))
        return pixel_reward(prompts, images, **columns)

    prompts, imgs = ["x"] * 8, images(8)
    one = len(json.dumps({"prompts": ["x"], "images": [encode_image(imgs[0])], "columns": {}}))
    with serve_reward(counting_pixels, token="t", max_body_bytes=3 * one) as srv:  # about 2 samples per request
        remote = RemoteReward(srv.url, token="t", on_failure="none", **FAST)
        assert remote(prompts, imgs) == pytest.approx(pixel_reward(prompts, imgs))
        assert sum(calls) == 8 and max(calls) <= 2 and remote.limits["max_body_bytes"] == 3 * one
        first_attempts = remote.last_attempts
        calls.clear()
        assert remote(prompts, imgs) == pytest.approx(pixel_reward(prompts, imgs))
        assert remote.last_attempts == len(calls) < first_attempts  # split up front: no 413 this time
        big = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
        with pytest.raises(RemoteRewardError, match=r"sample 1 alone is [\d,]+ bytes, over the server's "
                                                    r"max_body_bytes of [\d,]+ \(HTTP 413\)"):
            remote(["x", "x"], [imgs[0], big])  # raised even with on_failure="none": no retry can fix it


def test_a_batch_over_the_servers_pixel_budget_is_split_to_fit():
    with serve_reward(pixel_reward, token="t", max_pixels=16 * 16, max_batch_pixels=3 * 16 * 16) as srv:
        remote = RemoteReward(srv.url, token="t", **FAST)
        imgs = [Image.new("RGB", (16, 16), (i, i, i)) for i in range(7)]
        assert remote(["x"] * 7, imgs) == [float(i) for i in range(7)]
        assert remote.limits["max_batch_pixels"] == 768
        with pytest.raises(RemoteRewardError, match="HTTP 400.*bad image 0: 17x16.*max_pixels of 256"):
            remote(["x"], [Image.new("RGB", (17, 16))])


def test_connection_refused_is_retried():
    with FaultyServer("ok") as faulty:
        url = faulty.url  # the port is free again once this server is closed
    remote = RemoteReward(url, token="t", max_retries=2, **FAST)
    with pytest.raises(RemoteRewardError, match="gave up after 3 attempts"):
        remote(["x"], images(1))
    assert remote.last_attempts == 3


def test_concurrent_requests_and_async_reward():
    async def slow_reward(prompts, images, **columns):
        await asyncio.sleep(0.3)
        return [2.0] * len(prompts)

    with serve_reward(slow_reward, token="t", max_concurrency=2) as srv:
        remote = RemoteReward(srv.url, token="t", timeout=5.0)
        results = []
        threads = [threading.Thread(target=lambda: results.append(remote(["x"], images(1)))) for _ in range(2)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=5)
        assert results == [[2.0], [2.0]]
        assert time.perf_counter() - start < 0.55, "two requests were not served concurrently"


def test_remote_reward_in_a_reward_set(server):
    remote = RemoteReward(server.url, token="s3cret", name="pixels")
    result = RewardSet([remote, pixel_reward], weights=[1.0, -1.0])(["x", "x"], images(2))
    np.testing.assert_allclose(result.total, [0.0, 0.0], atol=1e-9)
    assert result.names == ["pixels", "pixel_reward"]


def test_client_argument_checks(server, monkeypatch):
    monkeypatch.delenv("REWARD_SERVER_TOKEN", raising=False)
    with pytest.raises(ValueError, match="REWARD_SERVER_TOKEN"):
        RemoteReward(server.url)
    monkeypatch.setenv("REWARD_SERVER_TOKEN", "s3cret")
    assert RemoteReward(server.url)(["x"], images(1))[0] is not None
    with pytest.raises(ValueError, match="on_failure"):
        RemoteReward(server.url, token="t", on_failure="ignore")
    with pytest.raises(TypeError, match="column 'obj' is not JSON"):
        RemoteReward(server.url, token="s3cret")(["x"], images(1), obj=[object()])
    assert "s3cret" not in repr(RemoteReward(server.url, token="s3cret"))


def test_command_line_server():
    env = {**os.environ, "MY_TOKEN": "cli-token", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "rlhf_image.rewards.server", "--reward", "rlhf_image.rewards.ocr:OCRReward",
               "--kwargs", '{"use_det": false, "num_threads": 1}', "--port", "0", "--token-env", "MY_TOKEN"]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = process.stdout.readline()  # "serving reward 'ocr' on http://127.0.0.1:PORT"
        assert "serving reward 'ocr'" in line, line
        url = line.split(" on ")[-1].strip()
        remote = RemoteReward(url, token="cli-token", timeout=10.0)
        assert remote.health()["reward"] == "ocr"
        assert remote(['"0427"'], [Image.new("RGB", (96, 32), "white")]) == [0.0]
    finally:
        process.terminate()
        process.wait(timeout=10)
