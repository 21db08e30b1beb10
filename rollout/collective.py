"""A `torch.distributed` process group between the trainer (rank 0) and the rollout workers (ranks 1..N).

The group is built from the backend classes (`ProcessGroupGloo`, `ProcessGroupNCCL`) over its own
`TCPStore`, not with `init_process_group`: it is not the default group, so it coexists with the trainer's
own (DeepSpeed, DDP) and can be torn down and rebuilt when a worker is replaced. NCCL on GPUs, gloo on CPU.
The store listens on the trainer's address only (127.0.0.1 for a local Ray instance).
"""

from __future__ import annotations

import socket
from datetime import timedelta

import torch
import torch.distributed as dist


class WeightGroup:
    """One member's handle on the group.

    Args:
        backend (`str`): `"gloo"` or `"nccl"`.
        master_addr (`str`), master_port (`int`): the trainer's store.
        rank (`int`), world_size (`int`): 0 for the trainer, 1..N for workers; N + 1.
        local_addr (`str`): the address this member's gloo device binds to.
        name (`str`): a prefix in the store, unique per (re)build of the group.
        timeout_s (`float`): for building the group and for each collective.
        listen_fd (`int`, *optional*): rank 0 only: a bound, listening socket's file descriptor (see
            [`listening_socket`]), which the store takes over.
    """

    def __init__(self, backend: str, master_addr: str, master_port: int, rank: int, world_size: int,
                 local_addr: str, name: str, timeout_s: float, listen_fd: int | None = None):
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"collective backend must be 'gloo' or 'nccl', got {backend!r}")
        timeout = timedelta(seconds=timeout_s)
        self.backend, self.rank, self.world_size = backend, rank, world_size
        # The trainer's store is server and client at once; workers are clients (they retry until timeout).
        self.store = dist.TCPStore(master_addr, master_port, world_size, rank == 0, timeout=timeout,
                                   wait_for_workers=False,
                                   master_listen_fd=listen_fd, use_libuv=listen_fd is None)
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
