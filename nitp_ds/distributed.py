"""The process group of a training job: launcher environment, start, rank agreement, collectives, teardown.

Every rank runs the same code. `ensure_dist_env` gives a process its rank whatever started it,
`start_process_group` joins the group before anything can fail, and `agree_on_errors` makes a start-up
error stop every rank together. `leave_process_group` ends it cleanly (and removes DeepSpeed's CPU
shared-memory buffers). `launch.py` imports from here, never the reverse; torch is imported where it is
used, so that the launcher starts without it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from nitp_ds.console import third_party_prints_hidden
from nitp_ds.errors import NITPError

if TYPE_CHECKING:
    import torch


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_dist_env() -> None:
    """RANK/WORLD_SIZE/LOCAL_RANK for this process, whatever started it.

    The deepspeed launcher (local, pdsh, --no_ssh) and MPICH set them. OpenMPI's mpirun (`deepspeed
    --launcher openmpi`) sets only OMPI_COMM_WORLD_*: mapped here, since DeepSpeed's own mapping needs
    mpi4py and would come too late (the trainer needs its rank before the process group exists). A single
    process started without a launcher gets a 1-process group.
    """
    if "RANK" in os.environ:
        return
    if "OMPI_COMM_WORLD_RANK" in os.environ:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise NITPError(f"started by mpirun without {' and '.join(missing)}; export MASTER_ADDR=<address of "
                            "the first node> and MASTER_PORT=<free port> to every rank (e.g. in .deepspeed_env)")
        os.environ.update(RANK=os.environ["OMPI_COMM_WORLD_RANK"], WORLD_SIZE=os.environ["OMPI_COMM_WORLD_SIZE"],
                          LOCAL_RANK=os.environ["OMPI_COMM_WORLD_LOCAL_RANK"])
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))


def world() -> tuple[int, int, int]:
    """(global rank, world size, local rank). Only the global rank says "rank 0": on the second of two nodes
    with one process each, LOCAL_RANK is 0 and RANK is 1."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


_group_started = False  # set once this process joins a process group (`joined_group`, `exit_process`)


def start_process_group() -> None:
    """Join the process group before anything can fail, so that ranks can agree on start-up errors."""
    global _group_started
    import torch
    from deepspeed import comm
    from deepspeed.accelerator import get_accelerator

    if torch.cuda.is_available():
        torch.cuda.set_device(world()[2])  # object collectives on NCCL use the current device
    with third_party_prints_hidden():  # DeepSpeed prints a line when it loads its CPU communication op
        comm.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    _group_started = True



def joined_group() -> bool:
    """Whether this process joined a process group (`start_process_group`), even if it has left it since."""
    return _group_started


def exit_process(code: int | str | None) -> None:
    """End the process with `code` (as `sys.exit` takes it).

    A process that joined a process group ends with `os._exit` once its output is flushed: the group's native
    threads can abort the interpreter's own shutdown ("terminate called without an active exception",
    SIGABRT), which now and then turned a clean exit 2 into 250 (seen in CI and in a test script). Nothing is
    lost: metrics.jsonl is appended and closed record by record, checkpoints and summaries are complete files,
    and `Trainer.run` closes TensorBoard and W&B on every way out.
    """
    import sys

    if not _group_started:
        if code not in (None, 0):
            sys.exit(code)
        return
    if isinstance(code, str):
        print(code, file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


# -- agreeing on errors -----------------------------------------------------------------------------------


def on_every_rank(exc: NITPError) -> NITPError:
    """Mark an error that every rank raises alike: global rank 0 shows it, the other ranks exit quietly."""
    exc.raised_on_every_rank = True
    return exc


def agree_on_errors(start):
    """Run `start()` on every rank; if it fails on any rank, every rank stops (none is left waiting in a
    collective) and global rank 0 shows each distinct error once, naming the ranks when not all had it."""
    import torch.distributed as dist

    try:
        result, error = start(), None
    except Exception as exc:  # noqa: BLE001 - reported to every rank, then re-raised below
        result, error = None, exc
    mine = None if error is None else str(error) if isinstance(error, NITPError) else f"{type(error).__name__}: {error}"
    messages: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, mine)
    failed: dict[str, list[int]] = {}
    for rank, message in enumerate(messages):
        if message is not None:
            failed.setdefault(message, []).append(rank)
    if not failed:
        return result
    if error is not None and not isinstance(error, NITPError):
        raise error  # not bad input but a bug: its traceback on the rank that hit it
    if len(failed) == 1 and len(next(iter(failed.values()))) == len(messages):
        text = next(iter(failed))
    else:
        text = "; ".join(f"on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} of {len(messages)}: "
                         f"{message}" for message, ranks in failed.items())
    raise on_every_rank(NITPError(text))


# -- collectives (no-ops in a 1-process job) ----------------------------------------------------------------


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def all_gather(value: Any, world_size: int) -> list[Any]:
    """Every rank's `value` (picklable), in rank order; [value] in a 1-process job."""
    import torch.distributed as dist

    if not dist.is_initialized() or world_size == 1:
        return [value]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, value)
    return gathered


def all_sum(values: torch.Tensor, world_size: int) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_initialized() and world_size > 1:
        dist.all_reduce(values)
    return values


def all_sum_read_later(values: torch.Tensor, world_size: int) -> Callable[[], list[float]]:
    """`all_sum(values)` queued now and read on the host by the returned function, which waits for that sum
    alone, not for the device work queued after it (a `.tolist()` then would wait for all of it)."""
    total = all_sum(values, world_size)
    if total.device.type != "cuda":
        result = total.tolist()
        return lambda: result
    import torch

    host = torch.empty(total.shape, dtype=total.dtype, pin_memory=True)
    host.copy_(total, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def read() -> list[float]:
        copied.synchronize()
        return host.tolist()

    return read


def all_mean(values: torch.Tensor, world_size: int) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_initialized() and world_size > 1:
        dist.all_reduce(values)
        values = values / world_size
    return values


def check_shared_run_dir(run_dir: Path, world_size: int, is_main: bool) -> None:
    """Every rank must see what rank 0 writes in the run directory: all ranks write their checkpoint shards
    there, and rank 0 alone marks checkpoints complete. A node-local disk would resume ranks differently.
    Checked before the model is built, so that a wrong set-up fails in seconds."""
    if world_size == 1:
        return
    import torch.distributed as dist

    name = [f".shared-check-{os.urandom(6).hex()}" if is_main else None]
    if is_main:
        (run_dir / name[0]).touch()
    dist.broadcast_object_list(name, src=0)  # a fresh name: no cached directory entry can answer for it
    seen: list[bool | None] = [None] * world_size
    dist.all_gather_object(seen, (run_dir / name[0]).exists())
    if is_main:
        (run_dir / name[0]).unlink()
    if not all(seen):
        raise on_every_rank(NITPError(
            f"train.out_dir {run_dir} is not shared: some rank cannot see what rank 0 writes there "
            "(a node-local disk?); put it on a filesystem that every node mounts at the same path"))


# -- a rank that is gone ------------------------------------------------------------------------------------

# What a collective raises when a peer's process is gone (its sockets closed by the kernel): gloo's transport
# errors ("Read error [127.0.0.1]:12513: Connection reset by peer"), NCCL's remote-exit report.
LOST_PEER_SIGNS = ("gloo/transport", "Connection reset by peer", "Connection closed by peer", "Broken pipe",
                   "remote process exited")


def lost_peer(exc: BaseException) -> bool:
    """Whether `exc` is a collective failing because another rank stopped (killed, crashed, its node lost)."""
    return isinstance(exc, RuntimeError) and any(sign in str(exc) for sign in LOST_PEER_SIGNS)


def lost_peer_error(exc: RuntimeError, resume_hint: str) -> NITPError:
    """The one line a surviving rank ends with, exit code LOST_PEER_EXIT, after leaving the broken process group.
    Under `nitp train`, which watches this node's ranks and names the one that stopped (`rank_watch.py`), the
    line is left to it (`quiet`)."""
    from nitp_ds.rank_watch import LOST_PEER_EXIT, watched

    try:
        leave_process_group(barrier=False)
    except Exception:  # noqa: BLE001 - the group is broken already; the exit must not be
        pass

    rank, world_size, _ = world()
    reason = str(exc).split("] ", 1)[-1].split(". This is typically", 1)[0].splitlines()[0]
    error = NITPError(f"rank {rank} of {world_size} lost contact with another rank, which stopped or whose node "
                      f"failed ({reason}); {resume_hint}")
    error.exit_code = LOST_PEER_EXIT
    error.quiet = watched()
    return error


# -- teardown -----------------------------------------------------------------------------------------------


def leave_process_group(barrier: bool) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
    if "MASTER_PORT" in os.environ and "RANK" in os.environ:  # every rank has mapped the others' by now
        remove_shm_buffers(os.environ["MASTER_PORT"], os.environ["RANK"])


def remove_shm_buffers(port: int | str, rank: int | str = "*") -> None:
    """Delete DeepSpeed's CPU shared-memory all-reduce buffers of the job on `port` (one rank's, or all).

    DeepSpeed's shm comm op (CPU accelerator) creates /dev/shm/deepspeed_allreduce_buffer_UID_ADDR_PORT_RANK
    (~66 MB each) and never unlinks it: without this, every CPU run leaks them until /dev/shm (RAM) is full.
    """
    import glob

    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_{rank}"):
        try:
            os.unlink(path)
        except OSError:
            pass
