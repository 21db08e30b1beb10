"""Run a script on several local processes, as torchrun would, but rendezvous through a file.

torchrun's TCP store connects over an IPv4-mapped IPv6 loopback address and then reverse-resolves it,
which sends a DNS query off the machine; a `FileStore` needs no socket at all. The launched script calls
[`init_process_group_from_env`] before building its trainer; accelerate and DeepSpeed then use that group.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INIT_METHOD_VAR = "RLHF_IMAGE_TEST_INIT_METHOD"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(script: str, args: list[str], nprocs: int = 2, timeout: float = 600,
                  env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess]:
    """Start `nprocs` copies of `script` with torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, ...)
    and a `file://` init method; wait for all; return their results (stdout/stderr captured)."""
    store = tempfile.mktemp(prefix="rlhf_image_store_")
    base = dict(os.environ, **(env or {}), WORLD_SIZE=str(nprocs), LOCAL_WORLD_SIZE=str(nprocs),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), GLOO_SOCKET_IFNAME="lo",
                DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONFAULTHANDLER="1",
                TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".torch_extensions")),
                **{INIT_METHOD_VAR: f"file://{store}"})
    procs = [subprocess.Popen([sys.executable, script, *args], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=dict(base, RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(nprocs)]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        if os.path.exists(store):
            os.remove(store)
    return results


def init_process_group_from_env() -> None:
    """In a launched script: join the gloo group through the file store (no-op outside `run_processes`).

    The group is destroyed at a normal exit (after a barrier), before the interpreter shuts down: a gloo
    worker thread still completing DeepSpeed's asynchronous collectives while Python finalizes aborts the
    process ("terminate called without an active exception", exit -6), which happened after ZeRO-3 saves on
    one CI machine. `PYTHONFAULTHANDLER` (set by `run_processes`) prints the Python stack of any such abort.
    """
    import atexit

    import torch.distributed as dist

    init_method = os.environ.get(INIT_METHOD_VAR)
    if init_method and not dist.is_initialized():
        dist.init_process_group("gloo", init_method=init_method, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]))
        atexit.register(finish_process_group)


def finish_process_group() -> None:
    """Wait for every rank, then destroy the default process group (no-op when there is none)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
