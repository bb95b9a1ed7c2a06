"""`RankWatch` against DeepSpeed's real launcher (deepspeed.launcher.launch) running two tiny rank scripts
(no model: the launcher's handling of a rank that dies is what is under test; the trainer's side is in
tests/test_reliability.py)."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from nitp_ds.rank_watch import LOST_PEER_EXIT, RankWatch, Stopped, lost_rank_message, zombie_status

RANK_SCRIPT = textwrap.dedent("""
    import os, sys, time
    rank = int(os.environ["RANK"])
    open(os.path.join(sys.argv[1], f"rank{rank}.pid"), "w").write(str(os.getpid()))
    # A survivor, as the trainer does when a collective fails because a peer is gone: exit LOST_PEER_EXIT.
    while not os.path.exists(os.path.join(sys.argv[1], "peer-gone")):
        time.sleep(0.02)
    sys.exit(int(sys.argv[2]))
""")


def start_launcher(tmp_path, survivor_exit: int) -> subprocess.Popen:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    world = base64.urlsafe_b64encode(json.dumps({"localhost": [0, 1]}).encode()).decode()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env["DS_ACCELERATOR"] = "cpu"
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}", "--master_addr",
           "127.0.0.1", "--master_port", "29999", "--no_local_rank", str(script), str(tmp_path), str(survivor_exit)]
    return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def watch_until_done(launcher: subprocess.Popen, watch: RankWatch, on_ranks, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    acted = False
    while launcher.poll() is None:
        assert time.monotonic() < deadline, "the launcher did not end"
        watch.poll()
        if not acted and len(watch.ranks) == 2:
            on_ranks()
            acted = True
        time.sleep(0.05)
    watch.poll()
    return launcher.returncode


def test_the_killed_rank_is_named_with_its_signal_not_the_survivor(tmp_path):
    launcher = start_launcher(tmp_path, LOST_PEER_EXIT)
    watch = RankWatch(launcher.pid, local_ranks=2)

    def kill_rank_0():
        os.kill(next(pid for pid, (_, rank) in watch.ranks.items() if rank == 0), signal.SIGKILL)
        (tmp_path / "peer-gone").touch()  # the survivor's collective fails: it exits LOST_PEER_EXIT at once

    assert watch_until_done(launcher, watch, kill_rank_0) != 0
    assert sorted(rank for _, rank in watch.ranks.values()) == [0, 1] and watch.world_size == 2
    cause = watch.cause()
    assert cause is not None and cause.rank == 0
    # Read from /proc while the rank was a zombie (the launcher reaps once a second, the watch polls faster).
    assert cause.cause() == "killed by signal 9: SIGKILL, kill -9 or the out-of-memory killer"
    assert watch.stopped[1].lost_peer
    message = lost_rank_message(watch, "resume with the same command")
    assert message == ("rank 0 of 2 stopped (killed by signal 9: SIGKILL, kill -9 or the out-of-memory killer) and "
                       "the other ranks were stopped; resume with the same command")


def test_ranks_that_end_normally_or_with_a_shared_error_name_no_rank():
    watch = RankWatch(0, local_ranks=2)
    watch.stopped = {0: Stopped(0, 2 << 8, 1.0), 1: Stopped(1, 2 << 8, 1.0)}  # an error every rank agreed on
    assert watch.cause() is None and lost_rank_message(watch, "hint") is None
    watch.stopped = {0: Stopped(0, 0, 1.0), 1: Stopped(1, 1 << 8, 1.2)}  # rank 1 failed on its own after 0 ended
    assert lost_rank_message(watch, "hint") == "rank 1 stopped (exit code 1) and the other ranks were stopped; hint"


def test_ranks_that_only_lost_peers_point_at_another_node():
    watch = RankWatch(0, local_ranks=2)
    watch.world_size = 4
    watch.stopped = {0: Stopped(0, LOST_PEER_EXIT << 8, 1.0), 1: Stopped(1, LOST_PEER_EXIT << 8, 1.1)}
    assert lost_rank_message(watch, "hint") == ("this node's ranks lost contact with a rank on another node "
                                                "(see that node's output); hint")
    watch.stopped[1] = Stopped(1, None, 0.5)  # reaped before it was seen: named, cause unknown
    assert lost_rank_message(watch, "hint") == ("rank 1 of 4 stopped (exit status unknown) and the other ranks were "
                                                "stopped; hint")
    # ... unless the launcher's own exit code is a signal's (DeepSpeed's launch.py: sys.exit(-9) gives 247)
    assert lost_rank_message(watch, "hint", launcher_code=247) == (
        "rank 1 of 4 stopped (killed by signal 9: SIGKILL, kill -9 or the out-of-memory killer) and the other ranks "
        "were stopped; hint")
    assert "exit status unknown" in lost_rank_message(watch, "hint", launcher_code=LOST_PEER_EXIT)
    # ... and a rank reaped unseen when the launcher exits 2 ended with the error every rank agreed on (CI saw
    # this race on a busy machine: the launcher reaped rank 0, which had shown the error, before the watch polled)
    watch.stopped = {0: Stopped(0, None, 0.5), 1: Stopped(1, 2 << 8, 0.6)}
    assert lost_rank_message(watch, "hint", launcher_code=2) is None
    watch.stopped = {0: Stopped(0, None, 0.5), 1: Stopped(1, 1 << 8, 0.6)}  # another rank failed on its own
    assert lost_rank_message(watch, "hint", launcher_code=2) == ("rank 1 of 4 stopped (exit code 1) and the other "
                                                                 "ranks were stopped; hint")


def test_zombie_status_reads_a_killed_childs_signal(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    child.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while (status := zombie_status(child.pid)) in (None, 0) and time.monotonic() < deadline:
        time.sleep(0.01)  # until the child has died (a zombie: this process has not reaped it)
    assert status == signal.SIGKILL
    child.wait()
