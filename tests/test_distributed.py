"""Rank environment and rank agreement on errors (nitp_ds.distributed), in a 1-process gloo group; what a
surviving rank sees when its peer is killed, in a real 2-process gloo group, and the line it ends with."""

import multiprocessing
import os
import signal
import sys

import pytest
import torch.distributed as dist

from nitp_ds.distributed import (agree_on_errors, all_sum_read_later, ensure_dist_env, free_port, lost_peer,
                                 lost_peer_error, world)
from nitp_ds.errors import NITPError
from nitp_ds.rank_watch import LOST_PEER_EXIT, WATCH_ENV

RANK_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    for key in (*RANK_KEYS, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_a_process_without_launcher_is_rank_0_of_1(clean_env):
    ensure_dist_env()
    assert world() == (0, 1, 0) and os.environ["MASTER_ADDR"] == "127.0.0.1" and int(os.environ["MASTER_PORT"]) > 0


def test_openmpi_ranks_are_mapped(clean_env):
    clean_env.setenv("OMPI_COMM_WORLD_RANK", "3")
    clean_env.setenv("OMPI_COMM_WORLD_SIZE", "4")
    clean_env.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    with pytest.raises(NITPError, match="started by mpirun without MASTER_ADDR and MASTER_PORT; export"):
        ensure_dist_env()
    clean_env.setenv("MASTER_ADDR", "10.0.0.1")
    clean_env.setenv("MASTER_PORT", "29500")
    ensure_dist_env()
    assert world() == (3, 4, 1)


@pytest.fixture
def group():
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_agree_on_errors_returns_the_result_or_raises_the_error_for_every_rank(group):
    assert agree_on_errors(lambda: 7) == 7

    def bad_input():
        raise NITPError("data.path x does not exist; pass a directory")

    with pytest.raises(NITPError, match="^data.path x does not exist; pass a directory$") as raised:
        agree_on_errors(bad_input)
    assert raised.value.raised_on_every_rank


def test_agree_on_errors_reraises_a_bug_as_itself(group):
    with pytest.raises(ZeroDivisionError):
        agree_on_errors(lambda: 1 / 0)


def test_free_port_is_bindable():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", free_port()))


def start_two_ranks(target):
    """`target(port, rank, queue)` started on ranks 0 and 1 (spawned processes); returns them and the queue."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    ranks = [context.Process(target=target, args=(port, rank, queue)) for rank in (0, 1)]
    for process in ranks:
        process.start()
    return ranks, queue


def vote(port: int, rank: int, votes) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    read = all_sum_read_later(torch.tensor([float(rank), 1.0, 0.5 + rank]), 2)
    votes.put((rank, read()))
    dist.destroy_process_group()


def test_a_sum_queued_now_and_read_later_is_the_sum_of_every_rank():
    ranks, votes = start_two_ranks(vote)
    results = dict(votes.get(timeout=120) for _ in ranks)
    for process in ranks:
        process.join(timeout=30)
    assert results == {0: [1.0, 2.0, 2.0], 1: [1.0, 2.0, 2.0]}


def survivor(port: int, rank: int, verdict) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    dist.barrier()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9: its sockets are closed by the kernel
    try:
        for _ in range(1000):
            dist.all_reduce(torch.ones(4))
        verdict.put("no error")
    except RuntimeError as exc:
        verdict.put((lost_peer(exc), str(exc)))
        error = lost_peer_error(exc, "hint")  # leaves the broken group, as the trainer's boundary does
        sys.exit(error.exit_code)  # what the CLI does with it: the exit code must survive the teardown


def test_a_collective_after_a_peer_is_killed_is_recognised_as_a_lost_peer():
    ranks, verdict = start_two_ranks(survivor)
    recognised, message = verdict.get(timeout=120)
    for process in ranks:
        process.join(timeout=30)
    assert ranks[1].exitcode == -signal.SIGKILL
    assert recognised, message
    assert ranks[0].exitcode == LOST_PEER_EXIT  # no abort while leaving the group


def test_the_survivors_line_names_the_cause_and_the_checkpoint(monkeypatch):
    # The message gloo gave rank 0 of 2 when rank 1 was killed during a step (seen in a real run).
    gloo = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                        "[127.0.0.1]:12513: Connection reset by peer. This is typically caused by a remote worker "
                        "hanging or bugs in the application. Check the logs of the remote worker before reporting "
                        "an error. GLHF! 🏖️")
    assert lost_peer(gloo) and not lost_peer(RuntimeError("shape mismatch")) and not lost_peer(ValueError("x"))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv(WATCH_ENV, raising=False)
    error = lost_peer_error(gloo, "the newest complete checkpoint, run/checkpoints/global_step2, is intact: resume "
                                  "with the same command")
    assert str(error) == ("rank 0 of 2 lost contact with another rank, which stopped or whose node failed (Read "
                          "error [127.0.0.1]:12513: Connection reset by peer); the newest complete checkpoint, "
                          "run/checkpoints/global_step2, is intact: resume with the same command")
    assert error.exit_code == LOST_PEER_EXIT and not error.quiet
    monkeypatch.setenv(WATCH_ENV, "1")  # under `nitp train`, which names the rank that stopped
    assert lost_peer_error(gloo, "hint").quiet
