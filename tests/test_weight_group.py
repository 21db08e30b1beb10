"""The trainer-workers process group of the Ray engine (`rlhf_image.rollout.collective`) without Ray: members on
one machine meet through a file store, members across machines through the trainer's TCP store; both broadcast.

torch's TCP store looks up a name for every address it connects to (the loopback address included, written
as IPv4-mapped IPv6, which hosts files do not list): the real TCP rendezvous is the opt-in `network` test, and
the default run checks how the TCP store is built."""

import threading
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from rlhf_image.rollout.collective import WeightGroup, listening_socket, make_store


def broadcast_in_threads(init_method: str, world: int, listen_fd: int | None = None) -> list:
    """Build a gloo `WeightGroup` of `world` members in threads, broadcast a tensor from rank 0; each member's
    (store, received tensor)."""
    results, errors = [None] * world, []

    def member(rank: int) -> None:
        try:
            group = WeightGroup("gloo", init_method, rank, world, "127.0.0.1", "weights_1", 60.0,
                                listen_fd=listen_fd if rank == 0 else None)
            tensor = torch.arange(6, dtype=torch.float32) if rank == 0 else torch.zeros(6)
            group.broadcast(tensor)
            results[rank] = (group.store, tensor)
            group.close()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=member, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    return results


def test_members_on_one_machine_meet_through_a_file(tmp_path):
    results = broadcast_in_threads(f"file://{tmp_path / 'store'}", world=3)
    for store, tensor in results:
        assert isinstance(store, dist.FileStore)
        assert torch.equal(tensor, torch.arange(6, dtype=torch.float32))


@pytest.mark.network
def test_members_across_machines_meet_through_the_trainers_tcp_store():
    fd, port = listening_socket("127.0.0.1")
    results = broadcast_in_threads(f"tcp://127.0.0.1:{port}", world=2, listen_fd=fd)
    for store, tensor in results:
        assert isinstance(store, dist.TCPStore)
        assert torch.equal(tensor, torch.arange(6, dtype=torch.float32))


@pytest.mark.parametrize("init_method, host", [("tcp://10.0.0.5:29500", "10.0.0.5"),
                                               ("tcp://[fd00::5]:29500", "fd00::5")])
@pytest.mark.parametrize("rank", [0, 1])
def test_the_tcp_store_is_served_by_the_trainer_from_its_listening_socket(monkeypatch, init_method, host, rank):
    made = []
    monkeypatch.setattr(dist, "TCPStore", lambda *args, **kwargs: made.append((args, kwargs)) or "store")
    assert make_store(init_method, rank, 3, timedelta(seconds=7), listen_fd=5 if rank == 0 else None) == "store"
    args, kwargs = made[0]
    assert args == (host, 29500, 3, rank == 0) and kwargs["timeout"] == timedelta(seconds=7)
    assert kwargs["master_listen_fd"] == (5 if rank == 0 else None) and kwargs["use_libuv"] == (rank != 0)
    assert kwargs["wait_for_workers"] is False


@pytest.mark.parametrize("init_method", ["env://", "file://", "tcp://127.0.0.1", "127.0.0.1:29500"])
def test_an_unknown_init_method_is_refused(init_method):
    with pytest.raises(ValueError, match="file:///path' or 'tcp://addr:port"):
        make_store(init_method, 0, 2, timedelta(seconds=1))
