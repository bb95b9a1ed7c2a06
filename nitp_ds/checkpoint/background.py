"""Checkpoint files written by nitp itself: with their CRC-32 as they are written, in the background when asked.

`BackgroundWriter` is a DeepSpeed checkpoint engine for one `engine.save_checkpoint` call. DeepSpeed hands it
each file's state dict (`save`). Every file is written by `write_file`: `torch.save`'s own format, its CRC-32
and size taken from the bytes as they go out (zlib hashing one record while the file takes it), so that no
file is read back to check it; torch.save's own per-entry zip CRCs, a second pass over the same bytes, are
left out. With a host memory budget the writing leaves the training path: `save` copies the tensors into host
memory (`host_snapshot`, storage by storage, so views that share a storage still share it, as in `torch.save`)
and queues the file; `commit` starts one thread that writes the queued files while training goes on
(`torch.save` and zlib release the GIL). A `live` writer is for a state that nothing changes until its files
are written (the run's last save, written while the final evaluation runs): `save` returns at once, and the
thread copies (on a CUDA stream of its own, beside the evaluation's) and writes each file in turn. A file whose
snapshot would not fit in the budget is written at once instead (the save then blocks for it).

Host memory (`HostBuffers`): copying from a GPU into fresh pages is slow, the kernel faulting them in one by one
during the copy; into pages already touched it is 8× faster. Measured on an H200 host, 8 GiB: 1.5 GB/s into
fresh pages, 12.8 GB/s into touched ones; touching fresh pages first (`fill_`) ran at 22 GB/s. So new buffers
are touched before the copy, and a save's buffers are kept for the next one.

A checkpoint is complete only when every rank has written its files and rank 0 has marked it
(`CheckpointManager`): a run killed while the thread writes leaves an incomplete checkpoint, which resume skips.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine


def state_bytes(obj: Any, seen: set | None = None) -> int:
    """Bytes of the distinct tensor storages in a (nested) state dict."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        key = storage._cdata  # one per storage, as torch.save tells them apart
        if key in seen or obj.device.type == "meta":
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(state_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v, seen) for v in obj)
    return 0


class HostBuffers:
    """Host storages kept from one save to the next, by size: a run's saves copy the same storages every time."""

    def __init__(self) -> None:
        self.free: dict[int, list[torch.UntypedStorage]] = {}
        self.lock = threading.Lock()

    def take(self, nbytes: int) -> torch.UntypedStorage:
        with self.lock:
            stack = self.free.get(nbytes)
            if stack:
                return stack.pop()
        return torch.zeros(nbytes, dtype=torch.uint8).untyped_storage()  # its pages touched now, not in the copy

    def give_back(self, storages: list[torch.UntypedStorage]) -> None:
        with self.lock:
            for storage in storages:
                self.free.setdefault(storage.nbytes(), []).append(storage)

    def held_bytes(self) -> int:
        with self.lock:
            return sum(size * len(stack) for size, stack in self.free.items())


def host_snapshot(obj: Any, buffers: HostBuffers | None = None) -> Any:
    """A copy of a (nested) state dict that later training cannot change: every tensor storage copied once into
    host memory (from `buffers` when given), views rebuilt on the copies, with their Python attributes; dicts,
    lists and tuples rebuilt; anything else deep-copied where it can be. An object met twice is copied once, as
    torch.save writes it once. Device copies are complete when it returns."""
    return snapshot_with_copies(obj, buffers or HostBuffers())[0]


def snapshot_with_copies(obj: Any, buffers: HostBuffers) -> tuple[Any, list[torch.UntypedStorage]]:
    """`host_snapshot(obj)` and the host storages it copied into (given back to `buffers` once written)."""
    memo: dict = {}  # ("storage", id) -> its host copy; ("object", id) -> (object, copy)
    snapshot = _copy_to_host(obj, memo, buffers)
    if torch.cuda.is_available():
        torch.cuda.current_stream().synchronize()  # the device-to-host copies are done
    return snapshot, [copy for key, copy in memo.items() if key[0] == "storage"]


def _copy_to_host(obj: Any, memo: dict, buffers: HostBuffers) -> Any:
    ident = ("object", id(obj))
    if ident in memo:
        return memo[ident][1]
    if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
        storage = obj.untyped_storage()
        key = ("storage", storage._cdata)  # one per storage, as torch.save tells them apart
        if key not in memo:
            memo[key] = copy_storage(storage, buffers)
        view = torch.empty(0, dtype=obj.dtype).set_(memo[key], obj.storage_offset(), obj.size(), obj.stride())
        view.requires_grad_(obj.requires_grad)  # torch.save keeps the flag
        out = torch.nn.Parameter(view, requires_grad=obj.requires_grad) if isinstance(obj, torch.nn.Parameter) else view
        # and its Python attributes (DeepSpeed's ds_id, ds_shape, ...), which torch.save writes too
        out.__dict__.update({name: _copy_to_host(value, memo, buffers) for name, value in vars(obj).items()})
    elif type(obj) in (dict, OrderedDict):
        out = type(obj)((k, _copy_to_host(v, memo, buffers)) for k, v in obj.items())
    elif type(obj) in (list, tuple):
        out = type(obj)(_copy_to_host(v, memo, buffers) for v in obj)
    else:
        try:
            out = copy.deepcopy(obj)
        except Exception:  # an object that cannot be copied is saved as it is when the thread writes it
            out = obj
    memo[ident] = (obj, out)  # obj kept alive: its id stays its own
    return out


def copy_storage(storage: torch.UntypedStorage, buffers: HostBuffers) -> torch.UntypedStorage:
    host = buffers.take(storage.nbytes())
    if storage.nbytes():
        source = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
        torch.empty(0, dtype=torch.uint8).set_(host).copy_(source, non_blocking=storage.device.type == "cuda")
    return host


class ChecksummedFile:
    """A binary file that keeps the CRC-32 (zlib's) and the count of the bytes written to it. A large write is
    hashed by a helper thread while the file takes it: on an H200 host zlib hashes 2.9 GB/s and the disk takes
    1.3, so the hashing costs no time; one after the other they ran at 0.9 GB/s."""

    PARALLEL_BYTES = 1 << 20

    def __init__(self, handle, hasher: ThreadPoolExecutor) -> None:
        self.handle, self.hasher, self.crc, self.nbytes = handle, hasher, 0, 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if view.nbytes < self.PARALLEL_BYTES:
            self.crc = zlib.crc32(view, self.crc)
            self.handle.write(view)
        else:
            crc = self.hasher.submit(zlib.crc32, view, self.crc)
            self.handle.write(view)
            self.crc = crc.result()  # before returning: torch may free the record's memory once written
        self.nbytes += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self.handle.flush()


def write_file(state_dict: Any, path: str | Path) -> dict[str, int | str]:
    """`torch.save(state_dict)` into `path`, without the zip archive's per-entry CRCs; its integrity record
    {"bytes", "crc32"}, taken from the bytes as they were written."""
    from torch.utils.serialization import config

    with open(path, "wb") as handle, ThreadPoolExecutor(1, thread_name_prefix="nitp-crc32") as hasher:
        out = ChecksummedFile(handle, hasher)
        zip_crcs, config.save.compute_crc32 = config.save.compute_crc32, False
        try:
            torch.save(state_dict, out)
        finally:
            config.save.compute_crc32 = zip_crcs
    return {"bytes": out.nbytes, "crc32": f"{out.crc:08x}"}


class BackgroundWriter(CheckpointEngine):
    """The checkpoint engine of one save: every file written by `write_file`, its record kept in `records`.

    `budget`: the host memory this rank may hold in snapshots; a file beyond it is written at once (0: every
    file, a save that blocks until written). `buffers`: the host memory kept between saves, which snapshots
    are copied into and go back to once written. `live`: nothing changes the state until the files are written
    (the run's last save): `save` takes no snapshot, the thread copies and writes one file at a time.
    """

    def __init__(self, budget: int, buffers: HostBuffers | None = None, *, live: bool = False):
        super().__init__()
        self.name = "nitp-background"
        self.budget, self.live = budget, live
        self.buffers = buffers if buffers is not None else HostBuffers()
        self.queue: list[tuple[Any, list[torch.UntypedStorage], str]] = []  # state or snapshot, its copies, path
        self.queued_bytes = 0
        self.inline_files = 0  # files written at once, beyond the budget
        self.records: dict[str, dict[str, int | str]] = {}  # file name -> {"bytes", "crc32"}, as written
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.device = torch.cuda.current_device() if torch.cuda.is_available() else None  # this rank's GPU
        self.ready = None  # live: where the training stream stood at `save` (the copies start after it)

    def create(self, info) -> None:
        pass

    def save(self, state_dict, path: str) -> None:
        size = state_bytes(state_dict)
        if self.queued_bytes + size > self.budget:
            self.records[Path(path).name] = write_file(state_dict, path)
            self.inline_files += 1
            return
        copies: list[torch.UntypedStorage] = []
        if self.live and self.device is not None and self.ready is None:
            self.ready = torch.cuda.Event()
            self.ready.record()
        if not self.live:
            state_dict, copies = snapshot_with_copies(state_dict, self.buffers)
        self.queue.append((state_dict, copies, path))
        self.queued_bytes += size

    def load(self, path: str, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=False)

    def commit(self, info) -> bool:
        """DeepSpeed calls this once every file of the save is handed over: the writing starts, if any is queued."""
        if self.queue:
            self.thread = threading.Thread(target=self._write, name="nitp-checkpoint-writer", daemon=True)
            self.thread.start()
        return True

    def _write(self) -> None:
        stream = contextlib.nullcontext()
        if self.device is not None:
            torch.cuda.set_device(self.device)  # this rank's GPU, not GPU 0
            stream = torch.cuda.stream(torch.cuda.Stream())  # the copies beside the evaluation's kernels
        try:
            while self.queue:
                state, copies, path = self.queue.pop(0)
                if self.live:
                    with stream:
                        if self.ready is not None:
                            torch.cuda.current_stream().wait_event(self.ready)
                        state, copies = snapshot_with_copies(state, self.buffers)
                self.records[Path(path).name] = write_file(state, path)
                del state
                self.buffers.give_back(copies)
        except BaseException as exc:  # the manager reports it where the ranks agree on the save
            self.error = exc
            self.queue.clear()

    def busy(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def wait(self) -> BaseException | None:
        """Wait for the files to be written; the error that stopped the writing, if any."""
        if self.thread is not None:
            self.thread.join()
        return self.error


def host_budget(ranks_on_node: int, buffers: HostBuffers) -> int:
    """Host memory one rank may hold in checkpoint snapshots: 3/4 of what is available now, shared by the node's
    ranks (they snapshot at the same time), plus what it already keeps for them."""
    import psutil

    return int(psutil.virtual_memory().available * 0.75 / max(ranks_on_node, 1)) + buffers.held_bytes()
