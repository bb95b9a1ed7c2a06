"""Checkpoint files written in the background (nitp_ds.checkpoint.background): the host snapshot and the writer.

Whole runs with background saves (the default) are tested in test_reliability.py: resume after kill -9, stop
signals, failing saves, and that a finished run's checkpoints are complete with their records.
"""

import threading

import pytest
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from nitp_ds.checkpoint.background import BackgroundWriter, host_snapshot, state_bytes


def state():
    flat = torch.arange(12, dtype=torch.float32)
    return {"flat": flat, "views": [flat[:4], flat[4:]], "bf16": torch.ones(3, dtype=torch.bfloat16),
            "param": torch.nn.Parameter(torch.zeros(2)), "grad": torch.ones(2, requires_grad=True), "step": 7, "name": "adam", "nested": {"betas": (0.9, 0.95)}}


def test_snapshot_is_independent_of_later_training_and_keeps_shared_storages_shared():
    original = state()
    snap = host_snapshot(original)
    original["flat"].add_(100)  # training goes on: the optimizer updates its buffers in place
    original["param"].data.fill_(5)
    assert torch.equal(snap["flat"], torch.arange(12, dtype=torch.float32))
    assert torch.equal(snap["views"][1], torch.arange(4, 12, dtype=torch.float32))
    assert snap["views"][0].untyped_storage().data_ptr() == snap["flat"].untyped_storage().data_ptr()
    assert isinstance(snap["param"], torch.nn.Parameter) and torch.equal(snap["param"], torch.zeros(2))
    assert snap["grad"].requires_grad and not snap["flat"].requires_grad  # torch.save keeps the flag
    assert snap["bf16"].dtype == torch.bfloat16 and snap["nested"] == {"betas": (0.9, 0.95)} and snap["step"] == 7
    assert state_bytes(original) == 12 * 4 + 3 * 2 + 2 * 4 + 2 * 4  # the shared storage counted once


def test_writer_writes_after_commit_what_torch_save_writes(tmp_path):
    files = TorchCheckpointEngine()
    writer = BackgroundWriter(files, budget=1 << 30)
    original = state()
    writer.save(original, str(tmp_path / "a.pt"))
    assert not (tmp_path / "a.pt").exists()  # nothing written before commit: only the snapshot
    original["flat"].add_(100)
    writer.commit(None)
    assert writer.wait() is None and not writer.busy()
    loaded = torch.load(tmp_path / "a.pt", weights_only=False)
    assert torch.equal(loaded["flat"], torch.arange(12, dtype=torch.float32))
    assert loaded["views"][0].untyped_storage().data_ptr() == loaded["flat"].untyped_storage().data_ptr()
    assert writer.inline_files == 0


def test_the_next_save_copies_into_the_host_memory_of_the_last_one(tmp_path):
    from nitp_ds.checkpoint.background import HostBuffers

    buffers, original = HostBuffers(), state()
    for step in (1, 2):
        writer = BackgroundWriter(TorchCheckpointEngine(), budget=1 << 30, buffers=buffers)
        writer.save(original, str(tmp_path / f"{step}.pt"))
        assert buffers.held_bytes() == 0  # the second save took every storage back out of the pool
        writer.commit(None)
        assert writer.wait() is None
        assert buffers.held_bytes() == state_bytes(original)  # given back once written
        original["flat"].add_(1)  # training goes on between the saves
    first, second = (torch.load(tmp_path / f"{step}.pt", weights_only=False) for step in (1, 2))
    assert torch.equal(second["flat"], first["flat"] + 1) and torch.equal(second["views"][1], first["views"][1] + 1)


def test_a_file_beyond_the_host_budget_is_written_at_once(tmp_path):
    writer = BackgroundWriter(TorchCheckpointEngine(), budget=10)
    writer.save(state(), str(tmp_path / "big.pt"))
    assert (tmp_path / "big.pt").exists() and writer.inline_files == 1 and writer.queued_bytes == 0
    writer.commit(None)
    assert writer.wait() is None


def test_a_failed_write_is_reported_by_wait(tmp_path):
    writer = BackgroundWriter(TorchCheckpointEngine(), budget=1 << 30)
    writer.save(state(), str(tmp_path / "missing-dir" / "a.pt"))
    writer.commit(None)
    error = writer.wait()
    assert isinstance(error, (OSError, RuntimeError)) and not writer.queue


def test_the_writing_runs_beside_the_caller(tmp_path):
    """While the thread writes, the caller's Python keeps running (torch.save releases the GIL)."""
    files = TorchCheckpointEngine()
    started, release = threading.Event(), threading.Event()
    save = files.save

    def slow_save(state_dict, path):
        started.set()
        release.wait(timeout=30)
        save(state_dict, path)

    files.save = slow_save
    writer = BackgroundWriter(files, budget=1 << 30)
    writer.save(state(), str(tmp_path / "a.pt"))
    writer.commit(None)
    assert started.wait(timeout=30) and writer.busy()  # commit returned while the file is still being written
    release.set()
    assert writer.wait() is None and (tmp_path / "a.pt").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
def test_snapshot_of_device_tensors_is_on_the_host():
    flat = torch.arange(8, device="cuda", dtype=torch.float32)
    snap = host_snapshot({"a": flat, "b": flat[2:]})
    flat.zero_()
    assert snap["a"].device.type == "cpu" and torch.equal(snap["b"], torch.arange(2, 8, dtype=torch.float32))
