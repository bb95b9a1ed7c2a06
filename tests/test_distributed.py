"""Rank environment and rank agreement on errors (nitp_ds.distributed), in a 1-process gloo group."""

import os

import pytest
import torch.distributed as dist

from nitp_ds.distributed import agree_on_errors, ensure_dist_env, free_port, world
from nitp_ds.errors import NITPError

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
