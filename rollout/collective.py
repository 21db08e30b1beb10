"""A `torch.distributed` process group between the trainer (rank 0) and the rollout workers (ranks 1..N).

The group is built from the backend classes (`ProcessGroupGloo`, `ProcessGroupNCCL`) over its own store,
not with `init_process_group`: it is not the default group, so it coexists with the trainer's own
(DeepSpeed, DDP) and can be torn down and rebuilt when a worker is replaced. NCCL on GPUs, gloo on CPU.

The members meet through a store named like torch's `init_method`: `file:///path` when they all run on one
machine (a `FileStore` opens no socket; a `TCPStore` would look up a name for each peer's address, a DNS query
when the hosts file does not list the IPv4-mapped loopback address), `tcp://addr:port` across machines, where
the trainer's store listens on its own address only.
"""

from __future__ import annotations

import socket
import urllib.parse
from datetime import timedelta

import torch
import torch.distributed as dist


class WeightGroup:
    """One member's handle on the group.

    Args:
        backend (`str`): `"gloo"` or `"nccl"`.
        init_method (`str`): where the members meet: `"file:///path"` (every member on one machine) or
            `"tcp://addr:port"` (the trainer's store).
        rank (`int`), world_size (`int`): 0 for the trainer, 1..N for workers; N + 1.
        local_addr (`str`): the address this member's gloo device binds to.
        name (`str`): a prefix in the store, unique per (re)build of the group.
        timeout_s (`float`): for building the group and for each collective.
        listen_fd (`int`, *optional*): rank 0 of a `tcp://` group only: a bound, listening socket's file
            descriptor (see [`listening_socket`]), which the store takes over.
    """

    def __init__(self, backend: str, init_method: str, rank: int, world_size: int, local_addr: str, name: str,
                 timeout_s: float, listen_fd: int | None = None):
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"collective backend must be 'gloo' or 'nccl', got {backend!r}")
        timeout = timedelta(seconds=timeout_s)
        self.backend, self.rank, self.world_size = backend, rank, world_size
        self.store = make_store(init_method, rank, world_size, timeout, listen_fd)
        store = dist.PrefixStore(name, self.store)
        if backend == "gloo":
            options = dist.ProcessGroupGloo._Options()
            options._devices = [dist.ProcessGroupGloo.create_device(hostname=local_addr)]
            options._timeout = timeout
            self.pg = dist.ProcessGroupGloo(store, rank, world_size, options)
            self.device = torch.device("cpu")
        else:
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(store, rank, world_size, options)
            self.device = torch.device("cuda", torch.cuda.current_device())

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Broadcast `tensor` from rank 0 into every member's `tensor` (in place), and wait."""
        options = dist.BroadcastOptions()
        options.rootRank = 0
        options.rootTensor = 0
        self.pg.broadcast([tensor], options).wait()

    def close(self) -> None:
        """Drop the group (its peers may already be gone)."""
        if self.backend == "nccl":
            self.pg.abort()  # NCCL communicators must be aborted when a peer may be dead
        self.pg = None
        self.store = None


def make_store(init_method: str, rank: int, world_size: int, timeout: timedelta,
               listen_fd: int | None = None) -> dist.Store:
    """The store named by `init_method` (`file:///path` or `tcp://addr:port`, rank 0 serving the TCP one)."""
    url = urllib.parse.urlsplit(init_method)
    if url.scheme == "file" and url.path:
        store = dist.FileStore(url.path, world_size)
        store.set_timeout(timeout)
        return store
    if url.scheme == "tcp" and url.hostname and url.port:
        # The trainer's store is server and client at once; workers are clients (they retry until timeout).
        return dist.TCPStore(url.hostname, url.port, world_size, rank == 0, timeout=timeout, wait_for_workers=False,
                             master_listen_fd=listen_fd, use_libuv=listen_fd is None)
    raise ValueError(f"init_method must be 'file:///path' or 'tcp://addr:port', got {init_method!r}")


def listening_socket(addr: str) -> tuple[int, int]:
    """`(fd, port)` of a TCP socket bound to `addr` on a free port and listening, for the trainer's store to
    take over (so the store listens on `addr` only, not on every interface)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((addr, 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    return sock.detach(), port
