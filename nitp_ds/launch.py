"""Starting `nitp train` on every rank through the stock `deepspeed` launcher, on one node or several.

`launch` builds the launcher command (pdsh over ssh with a hostfile, or `--no_ssh` with one command per
node), prints it, runs it and returns its exit code; docs/multinode.md shows the commands it builds.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

from nitp_ds.console import debug_enabled
from nitp_ds.distributed import free_port, remove_shm_buffers
from nitp_ds.errors import NITPError

DEFAULT_MASTER_PORT = 29500  # DeepSpeed's and torch's default: the same on every node unless --master-port says otherwise
say = partial(print, flush=True)  # before the launcher's own output, also when stdout is a file


def launcher_command(argv: list[str], nproc: int | None, num_nodes: int, hostfile: str | None, master_port: int, *,
                     master_addr: str | None = None, node_rank: int | None = None, quiet: bool = True) -> list[str]:
    """The stock `deepspeed` command that runs `nitp train argv` on every rank; node_rank means --no_ssh.
    nproc None: the hostfile's slots decide (the launching host may have no GPUs). quiet: the launcher's
    own log at ERROR (its [INFO]/[WARNING] lines are noise unless --debug; pdsh's remote launchers keep theirs)."""
    cmd = ["deepspeed"]
    if quiet:
        cmd += ["--log_level", "error"]
    if hostfile:
        cmd += ["--hostfile", hostfile]
    if num_nodes > 1:
        cmd += ["--num_nodes", str(num_nodes)]
    if node_rank is not None:
        cmd += ["--no_ssh", "--node_rank", str(node_rank)]
    if master_addr:
        cmd += ["--master_addr", master_addr]
    if nproc is not None:
        cmd += ["--num_gpus", str(nproc)]
    cmd += ["--master_port", str(master_port), "--no_local_rank", "--module", "nitp_ds.cli", "train", *argv]
    return cmd


def no_ssh_hostfile(num_nodes: int, nproc: int, directory: Path) -> Path:
    """With --no_ssh the launcher reads node count and slots from a hostfile, never the host names."""
    path = directory / "hostfile"
    path.write_text("".join(f"node{i} slots={nproc}\n" for i in range(num_nodes)))
    return path


def node_count(num_nodes: int, hostfile: str | None) -> int:
    """--num-nodes, else the hosts listed in the hostfile (DeepSpeed's format: 'host slots=N', # comments)."""
    if num_nodes > 1 or not hostfile:
        return max(num_nodes, 1)
    try:
        lines = Path(hostfile).read_text().splitlines()
    except OSError as exc:
        raise NITPError(f"cannot read --hostfile {hostfile} ({exc.strerror}); pass a file with one 'host slots=N' "
                        "line per node") from None
    return sum(1 for line in lines if line.strip() and not line.strip().startswith("#"))


def check_multinode(nodes: int, hostfile: str | None, node_rank: int | None, master_addr: str | None) -> None:
    if node_rank is not None:
        if nodes < 2:
            raise NITPError("--node-rank needs --num-nodes N (N ≥ 2) or a --hostfile that lists every node")
        if not 0 <= node_rank < nodes:
            raise NITPError(f"--node-rank {node_rank} is outside [0, {nodes}); number the nodes 0 … {nodes - 1}")
        if not master_addr:
            raise NITPError("--node-rank (one launcher per node, no ssh) needs --master-addr: the address of node 0, "
                            "reachable from every node")
    elif nodes > 1 and not hostfile:
        raise NITPError(f"--num-nodes {nodes} needs either --hostfile (one command, nodes reached over ssh by pdsh) "
                        "or --node-rank with --master-addr (one command per node)")


def launch(argv: list[str], nproc: int | None, *, num_nodes: int = 1, hostfile: str | None = None,
           node_rank: int | None = None, master_addr: str | None = None, master_port: int | None = None,
           run_dir: str | Path | None = None, echo=say) -> int:
    """Run `nitp train argv` on every rank of this node's share of the job; the launcher's exit code.

    nproc None: the hostfile's slots decide. node_rank: this node's rank, one launcher per node (no ssh).
    run_dir: the run's train.out_dir, to name its newest checkpoint if a rank stops.
    """
    nodes = node_count(num_nodes, hostfile)
    check_multinode(nodes, hostfile, node_rank, master_addr)
    several = nodes > 1 or bool(hostfile)
    port = master_port or (DEFAULT_MASTER_PORT if several else free_port())
    with tempfile.TemporaryDirectory(prefix="nitp-launch-") as tmp:
        if node_rank is not None and not hostfile:
            hostfile = str(no_ssh_hostfile(nodes, nproc or 1, Path(tmp)))
            echo(f"hostfile {hostfile}: " + ", ".join(Path(hostfile).read_text().splitlines()))
        cmd = launcher_command(argv, nproc, num_nodes, hostfile, port, master_addr=master_addr, node_rank=node_rank,
                               quiet=not debug_enabled())
        return run_launcher(cmd, remote_ranks=nodes > 1 and node_rank is None, local_ranks=nproc, run_dir=run_dir,
                            echo=echo)


def run_launcher(cmd: list[str], *, remote_ranks: bool, local_ranks: int | None = None,
                 run_dir: str | Path | None = None, echo=say) -> int:
    """Run the deepspeed launcher to its end, printing its command first; its exit code.

    While it runs, this node's ranks are watched (`RankWatch`; not with pdsh, whose ranks are remote): when the
    job ends because one of them stopped, one line names it, how it stopped, and what to resume from.
    """
    from nitp_ds.phases import START_ENV, process_start
    from nitp_ds.rank_watch import POLL_S, RankWatch, lost_rank_message, watching_env

    env = dict(os.environ)
    if "DS_ACCELERATOR" not in env:
        import torch

        if not torch.cuda.is_available():
            env["DS_ACCELERATOR"] = "cpu"
    env[START_ENV] = str(process_start())  # the ranks' start-up phase counts from this process's start
    if not remote_ranks:
        env.update(watching_env())  # a rank that loses its peers leaves the one line to this process
    echo("launching: " + shlex.join(cmd))
    # A session of its own: a terminal's Ctrl-C reaches only this process, which forwards it to the ranks.
    launcher = subprocess.Popen(cmd, env=env, start_new_session=True)
    forward_stop_signals(launcher, remote_ranks=remote_ranks)
    watch = None if remote_ranks else RankWatch(launcher.pid, local_ranks)
    while True:
        try:
            returncode = launcher.wait(timeout=POLL_S if watch else None)
            break
        except subprocess.TimeoutExpired:
            watch.poll()
    if "--master_port" in cmd:  # ranks killed hard (kill -9, OOM) leave their CPU shared-memory buffers behind
        remove_shm_buffers(cmd[cmd.index("--master_port") + 1])
    if watch is not None and returncode != 0:
        watch.poll()
        from nitp_ds.checkpoint.state import resume_hint

        hint = resume_hint(Path(run_dir) / "checkpoints") if run_dir else "resume with the same command"
        message = lost_rank_message(watch, hint, launcher_code=returncode)
        if message:
            print(f"error: {message}", file=sys.stderr, flush=True)
    return returncode if returncode >= 0 else 1


def forward_stop_signals(launcher: subprocess.Popen, *, remote_ranks: bool = False) -> None:
    """SIGTERM/SIGINT to `nitp train` go to the ranks, which save a checkpoint and exit 0 (so do the launchers).

    Not to the launchers themselves: the deepspeed runner has no handler (it would die and orphan the
    ranks) and deepspeed.launcher.launch terminates the ranks, kills them after 30 s and exits 1.
    With pdsh (remote_ranks) no rank is a local process: the signal goes to the runner, whose handler
    has pdsh stop the launchers on every node (those terminate their ranks, as above).
    """
    import signal

    import psutil

    def forward(signum, frame):
        try:
            procs = psutil.Process(launcher.pid).children(recursive=True)
        except psutil.Error:
            return
        if remote_ranks:
            launcher.send_signal(signum)
            return
        for proc in procs:
            try:
                if "deepspeed.launcher.launch" in " ".join(proc.parent().cmdline()):
                    proc.send_signal(signum)
            except psutil.Error:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
