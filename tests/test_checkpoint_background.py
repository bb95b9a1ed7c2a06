"""Checkpoint files written by nitp (nitp_ds.checkpoint.background): records taken as written, the host snapshot
and the writer.

Whole runs with background saves (the default) are tested in test_reliability.py: resume after kill -9, stop
signals, failing saves, and that a finished run's checkpoints are complete with their records.
"""

import threading

import pytest
import torch
from nitp_ds.checkpoint import background, integrity
from nitp_ds.checkpoint.background import BackgroundWriter, HostBuffers, host_snapshot, state_bytes, write_file


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


def test_a_file_is_recorded_by_the_bytes_written_and_loads_as_torch_save_wrote_it(tmp_path):
    original = state()
    record = write_file(original, tmp_path / "a.pt")
    assert record == integrity.file_record(tmp_path / "a.pt")  # what a reader of the whole file finds
    loaded = torch.load(tmp_path / "a.pt", weights_only=False)
    torch.save(original, tmp_path / "b.pt")
    theirs = torch.load(tmp_path / "b.pt", weights_only=False)
    assert loaded.keys() == theirs.keys() and all(
        torch.equal(loaded[k], theirs[k]) for k in ("flat", "bf16", "param", "grad"))
    assert loaded["views"][1].untyped_storage().data_ptr() == loaded["flat"].untyped_storage().data_ptr()
    assert isinstance(loaded["param"], torch.nn.Parameter) and loaded["nested"] == theirs["nested"]


def test_a_large_record_is_hashed_beside_its_write_to_the_same_checksum(tmp_path):
    big = {"flat": torch.randn(3 << 20), "small": torch.ones(3)}  # 12 MiB: hashed by the helper thread
    record = write_file(big, tmp_path / "big.pt")
    assert record == integrity.file_record(tmp_path / "big.pt") and record["bytes"] > 12 << 20
    assert torch.equal(torch.load(tmp_path / "big.pt", weights_only=False)["flat"], big["flat"])


def test_writer_writes_after_commit_what_torch_save_writes(tmp_path):
    writer = BackgroundWriter(budget=1 << 30)
    original = state()
    writer.save(original, str(tmp_path / "a.pt"))
    assert not (tmp_path / "a.pt").exists()  # nothing written before commit: only the snapshot
    original["flat"].add_(100)
    writer.commit(None)
    assert writer.wait() is None and not writer.busy()
    loaded = torch.load(tmp_path / "a.pt", weights_only=False)
    assert torch.equal(loaded["flat"], torch.arange(12, dtype=torch.float32))
    assert loaded["views"][0].untyped_storage().data_ptr() == loaded["flat"].untyped_storage().data_ptr()
    assert writer.inline_files == 0 and writer.records == {"a.pt": integrity.file_record(tmp_path / "a.pt")}


def test_a_live_save_copies_nothing_until_its_thread_writes(tmp_path):
    """The run's last save: `save` returns at once, holding no host copy; the thread copies and writes."""
    buffers, original = HostBuffers(), state()
    writer = BackgroundWriter(budget=1 << 30, buffers=buffers, live=True)
    writer.save(original, str(tmp_path / "a.pt"))
    assert writer.queue[0][0] is original and not (tmp_path / "a.pt").exists()
    writer.commit(None)
    assert writer.wait() is None and writer.records == {"a.pt": integrity.file_record(tmp_path / "a.pt")}
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=False)["flat"], original["flat"])
    assert buffers.held_bytes() == state_bytes(original)  # its copies are kept for a next save, as any save's


def test_the_next_save_copies_into_the_host_memory_of_the_last_one(tmp_path):
    buffers, original = HostBuffers(), state()
    for step in (1, 2):
        writer = BackgroundWriter(budget=1 << 30, buffers=buffers)
        writer.save(original, str(tmp_path / f"{step}.pt"))
        assert buffers.held_bytes() == 0  # the second save took every storage back out of the pool
        writer.commit(None)
        assert writer.wait() is None
        assert buffers.held_bytes() == state_bytes(original)  # given back once written
        original["flat"].add_(1)  # training goes on between the saves
    first, second = (torch.load(tmp_path / f"{step}.pt", weights_only=False) for step in (1, 2))
    assert torch.equal(second["flat"], first["flat"] + 1) and torch.equal(second["views"][1], first["views"][1] + 1)


def test_a_file_beyond_the_host_budget_is_written_at_once(tmp_path):
    writer = BackgroundWriter(budget=10)
    writer.save(state(), str(tmp_path / "big.pt"))
    assert (tmp_path / "big.pt").exists() and writer.inline_files == 1 and writer.queued_bytes == 0
    assert writer.records == {"big.pt": integrity.file_record(tmp_path / "big.pt")}
    writer.commit(None)
    assert writer.wait() is None and not writer.busy()


def test_a_failed_write_is_reported_by_wait(tmp_path):
    writer = BackgroundWriter(budget=1 << 30)
    writer.save(state(), str(tmp_path / "missing-dir" / "a.pt"))
    writer.commit(None)
    error = writer.wait()
    assert isinstance(error, (OSError, RuntimeError)) and not writer.queue


def test_the_writing_runs_beside_the_caller(tmp_path, monkeypatch):
    """While the thread writes, the caller's Python keeps running (torch.save releases the GIL)."""
    started, release = threading.Event(), threading.Event()
    write = background.write_file

    def slow_write(state_dict, path):
        started.set()
        release.wait(timeout=30)
        return write(state_dict, path)

    monkeypatch.setattr(background, "write_file", slow_write)
    writer = BackgroundWriter(budget=1 << 30)
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
def test_a_live_save_copies_what_the_training_stream_wrote_before_it(tmp_path):
    """The live writer copies on a stream of its own: it must start after the work queued before `save`."""
    big = torch.randn(4096, 4096, device="cuda")
    state = {"w": torch.zeros(4096, 4096, device="cuda")}
    for _ in range(20):  # queued on the training stream, not finished when save() returns
        state["w"].copy_(big @ big).div_(big.abs().max())
    expected = state["w"].clone()  # queued after the loop: equal to what the file must hold
    writer = BackgroundWriter(budget=1 << 34, live=True)
    writer.save(state, str(tmp_path / "w.pt"))
    writer.commit(None)
    assert writer.wait() is None
    assert torch.equal(torch.load(tmp_path / "w.pt", weights_only=False)["w"], expected.cpu())
