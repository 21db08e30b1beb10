"""The reward server and client against hostile or unlucky peers, on 127.0.0.1: peak memory of the server process
(VmHWM from /proc, a fresh server per attack), seconds, and what the client gets back.

    .venv/bin/python bench/bench_reward_server.py              # everything (about a minute and 1.5 GB of RAM)
    .venv/bin/python bench/bench_reward_server.py --only bomb  # one scenario

`--package` names the package holding `server`, `client` and `remote` (default `rlhf_image.rewards`), to measure
another version of them side by side; flags its server does not know are left out.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import importlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "bench-token"
MB = 1 << 20


def constant(prompts, images, **columns):
    """The served reward: decodes nothing itself (the server decoded the images already)."""
    return [1.0] * len(images)


def bomb_png(side: int) -> bytes:
    """A valid all-black `side` x `side` RGB PNG: about 1 KB per megapixel on the wire, 3 bytes per pixel decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, row = zlib.compressobj(9), b"\0" * (1 + 3 * side)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


class ServerProcess:
    """`python -m <package>.server` serving `constant` in a subprocess."""

    def __init__(self, package: str, **flags):
        known = subprocess.run([sys.executable, "-m", f"{package}.server", "--help"], cwd=REPO, capture_output=True,
                               text=True).stdout
        argv = [sys.executable, "-m", f"{package}.server", "--reward", "bench.bench_reward_server:constant",
                "--port", "0"]
        for key, value in flags.items():
            flag = "--" + key.replace("_", "-")
            if flag in known:
                argv += [flag, str(value)]
        self.process = subprocess.Popen(argv, cwd=REPO, env={**os.environ, "REWARD_SERVER_TOKEN": TOKEN},
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.process.stdout.readline()
        self.url = line.split(" on ")[-1].strip()
        self.port = int(self.url.rsplit(":", 1)[1])
        self.baseline = self.peak_mb()

    def peak_mb(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.process.kill()
        self.process.wait()


def raw_post(port: int, body_size: int, token: str | None, chunk: int = MB) -> str:
    """POST /score with a body of `body_size` zero bytes, sent in chunks; the status read back, or the error."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    try:
        sock.sendall(f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: {body_size}\r\n{auth}\r\n".encode())
        zeros, sent = b"0" * chunk, 0
        while sent < body_size:
            sock.sendall(zeros[:min(chunk, body_size - sent)])
            sent += chunk
        response = http.client.HTTPResponse(sock)
        response.begin()
        return str(response.status)
    except OSError as exc:
        return type(exc).__name__
    finally:
        sock.close()


def in_parallel(fn, n: int) -> list:
    results = []
    threads = [threading.Thread(target=lambda: results.append(fn())) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def summary(results: list) -> str:
    return ", ".join(f"{results.count(r)} x {r}" for r in sorted(set(results)))


# --- the scenarios: each returns (what, peak MB or None, seconds, outcome) -----------------------------------------

def no_token(package: str):
    with ServerProcess(package) as server:
        start = time.perf_counter()
        results = in_parallel(lambda: raw_post(server.port, 240 * MB, token=None), 6)
        return "6 x 240 MB bodies without a token, in parallel", server.peak_mb() - server.baseline, \
            time.perf_counter() - start, summary(results)


def bomb(package: str):
    image = base64.b64encode(bomb_png(13000)).decode()
    body = json.dumps({"prompts": ["x"] * 3, "images": [image] * 3, "columns": {}}).encode()
    with ServerProcess(package) as server:
        start = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
        conn.request("POST", "/score", body=body, headers={"Authorization": f"Bearer {TOKEN}"})
        status = conn.getresponse().status
        return f"3 PNGs of 13000x13000 in one {len(body) / MB:.1f} MB request", server.peak_mb() - server.baseline, \
            time.perf_counter() - start, f"HTTP {status}"


def big_batch(package: str):
    """A valid batch near the default body limit: 60 images of 1024x1024 noise (the worst case for PNG)."""
    from PIL import Image

    remote_module = importlib.import_module(f"{package}.remote")
    rng = np.random.default_rng(0)
    image = remote_module.encode_image(Image.fromarray(rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)))
    body = json.dumps({"prompts": ["x"] * 60, "images": [image] * 60, "columns": {}}).encode()
    with ServerProcess(package) as server:
        start = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
        conn.request("POST", "/score", body=body, headers={"Authorization": f"Bearer {TOKEN}"})
        status = conn.getresponse().status
        return f"a valid batch: 60 images of 1024x1024 noise, {len(body) / MB:.0f} MB", \
            server.peak_mb() - server.baseline, time.perf_counter() - start, f"HTTP {status}"


def oversize(package: str):
    with ServerProcess(package) as server:
        start = time.perf_counter()
        result = raw_post(server.port, 300 * MB, token=TOKEN)
        return "300 MB body (limit 256 MiB), client reads the answer", server.peak_mb() - server.baseline, \
            time.perf_counter() - start, result


def burst(package: str, n: int):
    body = json.dumps({"prompts": [], "images": [], "columns": {}}).encode()

    def score() -> str:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
            conn.request("POST", "/score", body=body, headers={"Authorization": f"Bearer {TOKEN}"})
            status = conn.getresponse().status
            conn.close()
            return str(status)
        except OSError as exc:
            return type(exc).__name__

    with ServerProcess(package) as server:
        start = time.perf_counter()
        results = in_parallel(score, n)
        return f"{n} requests at once", None, time.perf_counter() - start, summary(results)


def slow_clients(package: str):
    """20 clients trickle a header byte per second; how many the server still holds after 8 s (its request
    timeout set to 5 s where it has one)."""
    with ServerProcess(package, request_timeout=5) as server:
        socks = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(20)]
        start = time.perf_counter()
        while time.perf_counter() - start < 8:
            for sock in socks:
                try:
                    sock.send(b"X")
                except OSError:
                    pass
            time.sleep(1)
        held = 0
        for sock in socks:
            try:
                sock.setblocking(False)
                held += sock.recv(1) != b""
            except BlockingIOError:
                held += 1  # open, nothing to read: still held
            except OSError:
                pass
            sock.close()
        return "20 clients sending a header byte per second", None, time.perf_counter() - start, \
            f"{held} of 20 still held after 8 s"


def slow_reward(package: str):
    """A 6 s reward, a client with a 2 s timeout and 3 retries, then a second client's request."""
    server_module = importlib.import_module(f"{package}.server")
    client_module = importlib.import_module(f"{package}.client")
    from PIL import Image

    runs = []

    def six_seconds(prompts, images, **columns):
        runs.append(time.perf_counter())
        time.sleep(6)
        return [1.0] * len(images)

    server = server_module.RewardServer(six_seconds, token=TOKEN).start()
    try:
        images = [Image.new("RGB", (8, 8))]
        start = time.perf_counter()
        first = client_module.RemoteReward(server.url, token=TOKEN, timeout=2.0, max_retries=3, backoff=0.5,
                                           on_failure="none")(["x"], images)
        first_runs = len(runs)
        second_start = time.perf_counter()
        client_module.RemoteReward(server.url, token=TOKEN, timeout=60.0)(["y"], images)
        waited = time.perf_counter() - second_start
        return "6 s reward, client timeout 2 s + 3 retries", None, time.perf_counter() - start, \
            f"reward ran {first_runs} x for the first client, which got {first}; the next client waited " \
            f"{waited:.1f} s"
    finally:
        server.close()


class _Peer:
    """A loopback HTTP server answering every request with `respond(handler)`; records Authorization headers."""

    def __init__(self, respond):
        self.authorizations = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.authorizations.append(self.headers.get("Authorization"))
                respond(self)

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.do_GET()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def _answer(handler, status: int, body: bytes, headers: dict | None = None, pace: float = 0.0):
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(body)))
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.end_headers()
    try:
        for i in range(len(body)) if pace else []:
            time.sleep(pace)
            handler.wfile.write(body[i:i + 1])
    except OSError:  # the client gave up
        return
    if not pace:
        handler.wfile.write(body)


def client_faults(package: str):
    client_module = importlib.import_module(f"{package}.client")
    from PIL import Image

    rows, images = [], [Image.new("RGB", (8, 8))]
    elsewhere = _Peer(lambda h: _answer(h, 200, b'{"rewards": [7.0]}'))
    redirect = _Peer(lambda h: _answer(h, 302, b"", {"Location": elsewhere.url + "/score"}))
    remote = client_module.RemoteReward(redirect.url, token=TOKEN, timeout=5, max_retries=0, on_failure="none")
    try:
        outcome = f"returned {remote(['x'], images)}"
    except Exception as exc:
        outcome = f"{type(exc).__name__}"
    rows.append(("302 redirect to another server", None, 0.0,
                 f"{outcome}; token sent elsewhere: {TOKEN in str(elsewhere.authorizations)}"))

    trickle = _Peer(lambda h: _answer(h, 200, b'{"rewards": [1.00000]}', pace=1.5))
    remote = client_module.RemoteReward(trickle.url, token=TOKEN, timeout=2.0, max_retries=0, on_failure="none")
    start = time.perf_counter()
    rows.append(("answer trickled 1 byte / 1.5 s, timeout=2", None, 0.0, f"returned {remote(['x'], images)}"))
    rows[-1] = rows[-1][:2] + (time.perf_counter() - start,) + rows[-1][3:]

    server_module = importlib.import_module(f"{package}.server")
    server = server_module.RewardServer(constant, token=TOKEN, max_body_bytes=2 * MB).start()
    try:
        remote = client_module.RemoteReward(server.url, token=TOKEN, timeout=30, max_retries=2, backoff=0.1,
                                            on_failure="none")
        noise = np.random.default_rng(0).integers(0, 256, (32, 256, 256, 3), dtype=np.uint8)
        many = [Image.fromarray(array) for array in noise]  # about 8 MB of PNG in base64
        start = time.perf_counter()
        try:
            outcome = f"returned {sum(v is None for v in remote(['x'] * 32, many))} None of 32"
        except Exception as exc:
            outcome = f"{type(exc).__name__}: {str(exc)[:80]}"
        rows.append(("32 images (8 MB) over max_body_bytes=2 MiB, on_failure='none'", None,
                     time.perf_counter() - start, f"{outcome} after {remote.last_attempts} attempts"))
    finally:
        server.close()
    return rows


SCENARIOS = {"no_token": no_token, "bomb": bomb, "big_batch": big_batch, "oversize": oversize,
             "burst50": lambda p: burst(p, 50), "burst200": lambda p: burst(p, 200), "slow_clients": slow_clients,
             "slow_reward": slow_reward, "client": client_faults}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", default="rlhf_image.rewards")
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), default=list(SCENARIOS))
    args = parser.parse_args()
    print(f"package {args.package}\n")
    print(f"| {'attack':62} | {'server peak MB':>14} | {'seconds':>7} | outcome |")
    print(f"|{'-' * 64}|{'-' * 16}|{'-' * 9}|---------|")
    for name in args.only:
        result = SCENARIOS[name](args.package)
        for what, peak, seconds, outcome in result if isinstance(result, list) else [result]:
            peak_text = f"{peak:.0f}" if peak is not None else "-"
            print(f"| {what:62} | {peak_text:>14} | {seconds:7.1f} | {outcome} |", flush=True)


if __name__ == "__main__":
    main()
