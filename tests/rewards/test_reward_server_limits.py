"""The reward server under hostile or unlucky clients, on loopback: what it reads, decodes, holds and answers.

Memory and timings of the same attacks, measured in a server subprocess, are printed by
bench/bench_reward_server.py; these tests assert on the mechanisms instead (nothing below depends on how fast
the machine is, except generous upper bounds on waits that would otherwise last until the test times out)."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import struct
import threading
import time
import zlib

import numpy as np
import PIL.PngImagePlugin
import pytest
from PIL import Image

from rlhf_image.rewards import RemoteReward, RewardServer, serve_reward
from rlhf_image.rewards.remote import encode_image

TOKEN = "s3cret"


def mean_reward(prompts, images, **columns):
    return [float(np.asarray(im, dtype=np.float64).mean()) for im in images]


def png(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` RGB pixels (one zlib stream of zero rows, about 1 KB per
    megapixel): decoding it would allocate 3 * width * height bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compressobj(9)
    data = b"".join(rows.compress(b"\0" * (1 + 3 * width)) for _ in range(64)) + rows.flush()  # 64 rows suffice
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def score_body(images, prompts=None, columns=None) -> bytes:
    encoded = [im if isinstance(im, str) else encode_image(im) for im in images]
    return json.dumps({"prompts": prompts or ["x"] * len(encoded), "images": encoded,
                       "columns": columns or {}}).encode()


def send_head(server, path="/score", token=TOKEN, length=0, method="POST", extra="") -> socket.socket:
    """Open a connection and send only the request line and headers (no body)."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    auth = f"Authorization: Bearer {token}\r\n" if token is not None else ""
    sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {length}\r\n{auth}{extra}"
                 f"\r\n".encode())
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict]:
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, json.loads(response.read())


def post(server, body: bytes, token=TOKEN, request_id=None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    try:
        conn.request("POST", "/score", body=body, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


class CountingLoads:
    """Counts PNG decodes in this process (`PngImageFile.load` calls on images whose pixels are not loaded yet)."""

    def __init__(self, monkeypatch):
        self.count = 0
        original = PIL.PngImagePlugin.PngImageFile.load

        def load(image):
            self.count += bool(image.tile)  # PIL empties `tile` once the pixels are decoded
            return original(image)

        monkeypatch.setattr(PIL.PngImagePlugin.PngImageFile, "load", load)


# --- the body is read only after the headers passed every check -------------------------------------------------

@pytest.mark.parametrize("path, token, length, status", [
    ("/score", "wrong", 200 << 20, 401),
    ("/score", None, 200 << 20, 401),
    ("/nowhere", TOKEN, 200 << 20, 404),
    ("/score", TOKEN, (256 << 20) + 1, 413),
])
def test_refusals_are_answered_before_the_body_is_sent(path, token, length, status):
    """The answer arrives while the client has sent no byte of its announced body (within the 256 MiB limit
    but for the 413): the server decided from the headers alone, and never buffered the body."""
    with serve_reward(mean_reward, token=TOKEN) as server:
        sock = send_head(server, path, token, length)
        try:
            got, payload = read_response(sock)
        finally:
            sock.close()
    assert got == status and payload["error"]
    if status == 413:
        assert payload["max_body_bytes"] == 256 << 20 and payload["body_bytes"] == length


def test_expect_100_continue_is_refused_before_the_body():
    """A client that asks first (`Expect: 100-continue`, as curl does for large bodies) is refused without a 100."""
    with serve_reward(mean_reward, token=TOKEN) as server:
        sock = send_head(server, token="wrong", length=100 << 20, extra="Expect: 100-continue\r\n")
        try:
            assert read_response(sock)[0] == 401
        finally:
            sock.close()


def test_an_oversized_body_gets_a_413_the_client_can_read():
    """A body far larger than the socket buffers: the server answers 413 at once, then reads and discards the
    body, so the client (which sends the whole body before reading) gets the 413 and not a broken pipe."""
    with serve_reward(mean_reward, token=TOKEN, max_body_bytes=64 << 10) as server:
        status, payload = post(server, b"x" * (16 << 20))
    assert status == 413
    assert payload["max_body_bytes"] == 64 << 10 and payload["body_bytes"] == 16 << 20
    assert "max_body_bytes" in payload["error"]


# --- connections: a cap, a backlog that holds the waiting ones, a deadline per request -----------------------------

def test_connections_beyond_the_cap_wait_for_a_free_one():
    with serve_reward(mean_reward, token=TOKEN, max_connections=2) as server:
        holders = [send_head(server, length=10) for _ in range(2)]  # two requests that never send their body
        done = threading.Event()
        remote = RemoteReward(server.url, token=TOKEN, timeout=30.0)
        thread = threading.Thread(target=lambda: (remote.health(), done.set()), daemon=True)
        thread.start()
        assert not done.wait(0.5), "a third connection was served while two held the cap"
        holders[0].close()
        assert done.wait(10.0), "the waiting connection was not served once a slot was free"
        holders[1].close()


def test_a_burst_of_connections_is_queued_not_reset():
    """200 clients at once against a cap of 4: every one is answered (the listen backlog holds those that wait)."""
    with serve_reward(mean_reward, token=TOKEN, max_connections=4) as server:
        results = []

        def health():
            try:
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
                conn.request("GET", "/health")
                results.append(conn.getresponse().status)
                conn.close()
            except OSError as exc:
                results.append(repr(exc))

        threads = [threading.Thread(target=health) for _ in range(200)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert results == [200] * 200, [r for r in results if r != 200][:5]
    assert server.backlog >= 200


@pytest.mark.parametrize("behaviour", ["silent", "trickle", "slow body"])
def test_a_client_that_does_not_deliver_its_request_in_time_is_dropped(behaviour):
    """`request_timeout` bounds the time to send a whole request (headers and body), not each read: a client
    trickling a byte every 0.1 s is dropped as surely as a silent one."""
    with serve_reward(mean_reward, token=TOKEN, request_timeout=0.5) as server:
        if behaviour == "slow body":
            sock = send_head(server, length=1000)
        else:
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        start = time.monotonic()
        closed = False
        try:
            while time.monotonic() - start < 10:
                if behaviour != "silent":
                    sock.sendall(b"X")
                sock.settimeout(0.1)
                try:
                    if sock.recv(1024) == b"":
                        closed = True
                        break
                except TimeoutError:
                    continue
        except (ConnectionResetError, BrokenPipeError):
            closed = True
        finally:
            sock.close()
    assert closed, f"a {behaviour} client held its connection for 10 s"


# --- the client's errors are 400s --------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["column prompts", "column images", "deep json", "deep column"])
def test_client_errors_are_400_not_500(case):
    with serve_reward(mean_reward, token=TOKEN) as server:
        image = encode_image(png(4, 4))
        if case == "deep json":
            body = b"[" * 100_000 + b"]" * 100_000
        elif case == "deep column":
            body = b'{"prompts": ["x"], "images": ["' + image.encode() + b'"], "columns": {"c": [' + b"[" * 100_000 \
                + b"]" * 100_000 + b"]}}"
        else:
            body = score_body([image], columns={case.split()[1]: ["y"]})
        status, payload = post(server, body)
    assert status == 400, payload
    assert not payload["error"].startswith("reward")  # not blamed on the reward
    expected = {"column prompts": "'prompts'", "column images": "'images'", "deep json": "nested",
                "deep column": "nested"}[case]
    assert expected in payload["error"]


# --- images: a pixel limit checked from the header, decoded inside the scoring slot -------------------------------

def test_an_image_over_the_pixel_limit_is_refused_from_its_header(monkeypatch):
    loads = CountingLoads(monkeypatch)
    bomb = base64.b64encode(bomb_png(13000, 13000)).decode()
    with serve_reward(mean_reward, token=TOKEN) as server:
        assert server.max_pixels == 4096 * 4096
        status, payload = post(server, score_body([encode_image(png(8, 8)), bomb]))
        assert status == 400 and "image 1" in payload["error"] and "13000x13000" in payload["error"]
        assert "max_pixels" in payload["error"]
        assert loads.count == 0  # neither image was decoded: the batch was refused before any decode
        assert post(server, score_body([png(8, 8)]))[0] == 200 and loads.count == 1


def test_a_batch_over_the_pixel_budget_is_a_413_with_the_limits(monkeypatch):
    loads = CountingLoads(monkeypatch)
    with serve_reward(mean_reward, token=TOKEN, max_pixels=32 * 32, max_batch_pixels=2 * 32 * 32) as server:
        status, payload = post(server, score_body([png(32, 32, s) for s in range(3)]))
        assert status == 413 and payload["max_batch_pixels"] == 2048 and payload["batch_pixels"] == 3072
        assert payload["max_body_bytes"] == server.max_body_bytes and payload["max_pixels"] == 1024
        status, payload = post(server, score_body([png(33, 32)]))
        assert status == 400 and "33x32" in payload["error"]
        assert loads.count == 0
        assert post(server, score_body([png(32, 32, s) for s in range(2)]))[0] == 200 and loads.count == 2


def test_images_are_decoded_inside_the_scoring_slot(monkeypatch):
    """While one batch is scored (max_concurrency=1), the next request waits for the slot before decoding."""
    loads = CountingLoads(monkeypatch)
    release, started = threading.Event(), threading.Event()

    def blocking_reward(prompts, images, **columns):
        started.set()
        release.wait(10)
        return [1.0] * len(images)

    with serve_reward(blocking_reward, token=TOKEN, max_concurrency=1) as server:
        answers = []
        first = threading.Thread(target=lambda: answers.append(post(server, score_body([png(8, 8)]))))
        first.start()
        assert started.wait(10) and loads.count == 1
        second = threading.Thread(target=lambda: answers.append(post(server, score_body([png(8, 8), png(4, 4)]))))
        second.start()
        time.sleep(0.5)
        assert loads.count == 1, "the waiting request decoded its images outside the slot"
        release.set()
        first.join(10)
        second.join(10)
    assert loads.count == 3 and [a[0] for a in answers] == [200, 200]


# --- request ids: a retry never runs the reward again --------------------------------------------------------------

def test_a_retry_of_a_request_being_scored_waits_for_it_instead_of_rerunning_the_reward():
    calls, release, started = [], threading.Event(), threading.Event()

    def slow_reward(prompts, images, **columns):
        calls.append(len(images))
        started.set()
        release.wait(10)
        return [float(len(calls))] * len(images)

    with serve_reward(slow_reward, token=TOKEN, max_concurrency=2) as server:
        body = score_body([png(8, 8)])
        answers = []
        first = threading.Thread(target=lambda: answers.append(post(server, body, request_id="req-1")))
        first.start()
        assert started.wait(10)
        retry = threading.Thread(target=lambda: answers.append(post(server, body, request_id="req-1")))
        retry.start()
        time.sleep(0.3)
        release.set()
        first.join(10)
        retry.join(10)
        assert calls == [1] and answers == [(200, {"rewards": [1.0], "reward": "slow_reward"})] * 2
        # a retry that comes after the answer was sent gets the same answer, still without a second call
        assert post(server, body, request_id="req-1") == answers[0] and calls == [1]
        # the same id with another body is a client bug, not a retry
        status, payload = post(server, score_body([png(4, 4)]), request_id="req-1")
        assert status == 409 and "req-1" in payload["error"] and calls == [1]
        assert post(server, body, request_id="bad id!")[0] == 400


def test_a_timed_out_client_retry_does_not_run_a_slow_reward_again():
    """The issue's case, shortened: a reward slower than the client's timeout is run once, and a later retry of
    the same call collects its answer."""
    calls = []

    def slow_reward(prompts, images, **columns):
        calls.append(1)
        time.sleep(1.0)
        return [0.5] * len(images)

    with serve_reward(slow_reward, token=TOKEN) as server:
        remote = RemoteReward(server.url, token=TOKEN, timeout=0.3, max_retries=20, backoff=0.05, backoff_max=0.1)
        assert remote(["x"], [png(8, 8)]) == [0.5]
        assert calls == [1] and remote.last_attempts >= 2


def test_server_argument_checks():
    for kwargs, field in [(dict(max_pixels=0), "max_pixels"), (dict(max_connections=0), "max_connections"),
                          (dict(request_timeout=0), "request_timeout"), (dict(max_body_bytes=-1), "max_body_bytes"),
                          (dict(max_batch_pixels=10, max_pixels=100), "max_batch_pixels"),
                          (dict(max_concurrency=0), "max_concurrency")]:
        with pytest.raises(ValueError, match=field):
            RewardServer(mean_reward, **kwargs)
