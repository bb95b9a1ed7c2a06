"""Which rank of this node stopped first, and how: watched from `nitp train`, the parent of the launcher.

When one rank dies (kill -9, the OOM killer, a crash), the others fail inside their next collective and
DeepSpeed's launcher terminates them; its own log names neither the rank nor, reliably, the cause (it reports
whichever exit code it polls first). `nitp train` sees every local rank as a grandchild: `RankWatch` maps each
rank process to its RANK, polls them while the launcher runs, and keeps the first that stopped abnormally with
its exit status. A rank that merely lost its peers exits with LOST_PEER_EXIT (the trainer says so through
NITP_RANK_WATCH, which `nitp train` sets for the launcher), so it is never mistaken for the cause.

A rank's status is readable only while it is a zombie — until the launcher, its parent, reaps it (the launcher
polls once a second; this watch polls every POLL_S) — from /proc/PID/stat's exit_code field (Linux ≥ 3.5).
A rank reaped before it was seen is reported without a cause.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import psutil

WATCH_ENV = "NITP_RANK_WATCH"  # set: a rank that lost its peers exits quietly, `nitp train` says it
LOST_PEER_EXIT = 3
POLL_S = 0.1


@dataclass
class Stopped:
    rank: int
    status: int | None  # waitpid's encoding; None when the rank was reaped before it was seen
    at: float  # time.monotonic() when first seen stopped

    @property
    def lost_peer(self) -> bool:
        return self.status is not None and not self.status & 0x7F and self.status >> 8 == LOST_PEER_EXIT

    @property
    def normal(self) -> bool:
        """Exit 0 (done) or 2 (an error every rank agreed on and rank 0 showed): nothing to add."""
        return self.status is not None and not self.status & 0x7F and self.status >> 8 in (0, 2)

    def cause(self) -> str:
        if self.status is None:
            return "exit status unknown"
        if self.status & 0x7F:
            number = self.status & 0x7F
            try:
                name = signal.Signals(number).name
            except ValueError:
                name = "unknown"
            return f"killed by signal {number}: {name}" + (", kill -9 or the out-of-memory killer"
                                                           if number == signal.SIGKILL else "")
        return f"exit code {self.status >> 8}"


def zombie_status(pid: int) -> int | None:
    """The exit status of a process that has ended but is not yet reaped (field 52 of /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[49]) if len(fields) > 49 else None  # fields[0] is field 3 (state)


class RankWatch:
    """Watches the ranks that `launcher_pid`'s deepspeed.launcher.launch starts on this node."""

    def __init__(self, launcher_pid: int, local_ranks: int | None):
        self.launcher_pid = launcher_pid
        self.local_ranks = local_ranks
        self.ranks: dict[int, tuple[psutil.Process, int]] = {}  # pid -> (process, global rank)
        self.world_size: int | None = None
        self.stopped: dict[int, Stopped] = {}  # rank -> first seen stopped

    def poll(self) -> None:
        if self.local_ranks is None or len(self.ranks) < self.local_ranks:
            self._discover()
        for pid, (proc, rank) in self.ranks.items():
            if rank in self.stopped:
                continue
            try:
                ended = proc.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                self.stopped[rank] = Stopped(rank, None, time.monotonic())
                continue
            except psutil.Error:
                continue
            if ended:
                self.stopped[rank] = Stopped(rank, zombie_status(pid), time.monotonic())

    def _discover(self) -> None:
        try:
            procs = psutil.Process(self.launcher_pid).children(recursive=True)
        except psutil.Error:
            return
        for proc in procs:
            if proc.pid in self.ranks:
                continue
            try:
                if "deepspeed.launcher.launch" not in " ".join(proc.parent().cmdline()):
                    continue
                env = proc.environ()
                self.ranks[proc.pid] = (proc, int(env["RANK"]))
                self.world_size = int(env.get("WORLD_SIZE", 0)) or None
            except (psutil.Error, KeyError, ValueError):
                continue

    def cause(self) -> Stopped | None:
        """The rank that stopped first for a reason of its own (not lost peers, not a shared error), if any.
        Seen in the same poll, one already reaped goes first: the launcher reaps the rank that failed, then
        terminates the others."""
        suspects = [s for s in self.stopped.values() if not s.lost_peer and not s.normal]
        return min(suspects, key=lambda s: (s.at, s.status is not None), default=None)

    def only_lost_peers(self) -> bool:
        return any(s.lost_peer for s in self.stopped.values()) and self.cause() is None


def lost_rank_message(watch: RankWatch, resume_hint: str, launcher_code: int | None = None) -> str | None:
    """The one line for a job that ended because a rank stopped; None when no rank of this node did.

    `launcher_code`: the exit code of DeepSpeed's launcher, which exits with the first failing code it polled
    (`sys.exit(-9)` gives 247). It fills in the cause of a rank that was reaped before the watch saw it, when it
    is a signal: ranks that only lost their peers exit with LOST_PEER_EXIT, never by a signal. When it is 2 (an
    error every rank agreed on, which rank 0 showed), such a rank ended with it: nothing to add.
    """
    world = f" of {watch.world_size}" if watch.world_size else ""
    cause = watch.cause()
    while cause is not None and cause.status is None and launcher_code == 2:  # a busy machine: reaped unseen
        watch.stopped[cause.rank] = Stopped(cause.rank, 2 << 8, cause.at)
        cause = watch.cause()
    if cause is not None:
        if cause.status is None and launcher_code is not None and 128 < launcher_code < 256:
            cause = Stopped(cause.rank, 256 - launcher_code, cause.at)  # waitpid's encoding of that signal
        return f"rank {cause.rank}{world} stopped ({cause.cause()}) and the other ranks were stopped; {resume_hint}"
    if watch.only_lost_peers():
        return f"this node's ranks lost contact with a rank on another node (see that node's output); {resume_hint}"
    return None


def watching_env() -> dict[str, str]:
    return {WATCH_ENV: "1"}


def watched() -> bool:
    return os.environ.get(WATCH_ENV) == "1"
