"""`nitp train`: parse, resolve the config, and either run this rank or start the launcher."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import typer

from nitp_ds.cli.main import app
from nitp_ds.errors import NITPError


def resolve_recipe(name: str) -> Path:
    """A recipe path, or the name of a bundled recipe (`debug` -> recipes/debug.yaml)."""
    path = Path(name)
    if path.exists():
        return path
    bundled = Path(__file__).resolve().parent.parent / "recipes" / f"{name}.yaml"
    if bundled.exists():
        return bundled
    raise NITPError(f"recipe {name} does not exist; pass a YAML file or a bundled name "
                    f"({', '.join(p.stem for p in sorted((bundled.parent).glob('*.yaml')))})"
                    if bundled.parent.exists() else f"recipe {name} does not exist; pass a YAML file")


def under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ or "RANK" in os.environ


def default_nproc() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def launcher_command(argv: list[str], nproc: int, num_nodes: int, hostfile: str | None, master_port: int) -> list[str]:
    cmd = ["deepspeed"]
    if hostfile:
        cmd += ["--hostfile", hostfile]
    if num_nodes > 1:
        cmd += ["--num_nodes", str(num_nodes)]
    cmd += ["--num_gpus", str(nproc), "--master_port", str(master_port), "--no_local_rank",
            "--module", "nitp_ds.cli", "train", *argv]
    return cmd


@app.command("train")
def train_command(
    config: str = typer.Option(..., "--config", "-c", help="Recipe YAML (or a bundled name such as 'debug')."),
    ds_config: str = typer.Option("ds_configs/zero3_moe.json", "--ds-config", help="DeepSpeed JSON config."),
    overrides: list[str] = typer.Option([], "--set", help="Override a recipe key: --set train.steps=100 (repeatable)."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and DeepSpeed config, then exit."),
    resume: str = typer.Option(None, "--resume", help="auto (default: newest complete checkpoint), never, or a checkpoint path."),
    nproc: int = typer.Option(None, "--nproc", "--num-gpus", help="Processes per node (default: all GPUs, or 1 on CPU)."),
    num_nodes: int = typer.Option(1, "--num-nodes", help="Nodes (with --hostfile) for the deepspeed launcher."),
    hostfile: str = typer.Option(None, "--hostfile", help="DeepSpeed hostfile for multi-node runs."),
    force: bool = typer.Option(False, "--force", help="Start afresh in a run directory that holds another run."),
) -> None:
    """Train a MoE model with NITP under DeepSpeed ZeRO-3 + expert parallelism."""
    from nitp_ds.config import dump_yaml, load_config, validate

    sets = list(overrides)
    if resume is not None:
        sets.append(f"checkpoint.resume={resume}")
    cfg = validate(load_config(resolve_recipe(config), sets))

    if print_config:
        _print_config(cfg, ds_config, nproc or default_nproc() * max(num_nodes, 1))
        return

    procs = nproc if nproc is not None else default_nproc()
    if not under_launcher() and (procs > 1 or num_nodes > 1 or hostfile):
        from nitp_ds.trainer import free_port

        argv = _forwarded_argv()
        cmd = launcher_command(argv, procs, num_nodes, hostfile, free_port())
        env = dict(os.environ)
        import torch

        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
        print("launching: " + shlex.join(cmd), flush=True)
        # A session of its own: a terminal's Ctrl-C reaches only this process, which forwards it to the ranks.
        launcher = subprocess.Popen(cmd, env=env, start_new_session=True)
        forward_stop_signals(launcher)
        returncode = launcher.wait()
        raise typer.Exit(returncode if returncode >= 0 else 1)

    from nitp_ds.trainer import train

    summary = train(cfg, ds_config, force=force)
    if int(os.environ.get("RANK", "0")) == 0:
        _print_summary(summary)


def forward_stop_signals(launcher: subprocess.Popen) -> None:
    """SIGTERM/SIGINT to `nitp train` go to the ranks, which save a checkpoint and exit 0 (so do the launchers).

    Not to the launchers themselves: the deepspeed runner has no handler (it would die and orphan the
    ranks) and deepspeed.launcher.launch terminates the ranks, kills them after 30 s and exits 1.
    """
    import signal

    import psutil

    def forward(signum, frame):
        try:
            procs = psutil.Process(launcher.pid).children(recursive=True)
        except psutil.Error:
            return
        for proc in procs:
            try:
                if "deepspeed.launcher.launch" in " ".join(proc.parent().cmdline()):
                    proc.send_signal(signum)
            except psutil.Error:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)


def _forwarded_argv() -> list[str]:
    """This command's own arguments, minus the launcher options, to run on every rank."""
    argv = sys.argv[1:]
    if argv and argv[0] == "train":
        argv = argv[1:]
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        name = item.split("=", 1)[0]
        if name in ("--nproc", "--num-gpus", "--num-nodes", "--hostfile"):
            skip = "=" not in item
            continue
        out.append(item)
    return out


def _print_config(cfg, ds_config_path: str, world_size: int) -> None:
    from nitp_ds.config import dump_yaml
    from nitp_ds.ds_config import derive_ds_config, load_ds_config
    from nitp_ds.models import build_hf_config, num_experts

    vocab = cfg.model.vocab_size
    if not vocab:
        try:
            from nitp_ds.data.dataset import open_data

            vocab = open_data(cfg.data.path).vocab_size
        except Exception:
            vocab = 32000  # only to show the derived config; training reads the data's vocabulary
    hf = build_hf_config(cfg.model, vocab)
    ds = derive_ds_config(load_ds_config(ds_config_path), cfg, world_size=world_size,
                          num_experts=num_experts(hf), model_type=hf.model_type)
    print("# resolved recipe")
    print(dump_yaml(cfg), end="")
    print(f"# derived DeepSpeed config (world size {world_size})")
    print(json.dumps(ds, indent=2))


def _print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"nitp train: {summary.get('status')}")
    table.add_column("metric")
    table.add_column("value")
    for key in ("step", "consumed_tokens", "first_loss_ntp", "loss/ntp", "loss/nitp", "loss/aux", "val/loss_ntp",
                "val/ppl", "val/loss_nitp", "tokens_per_s", "mfu", "skipped_steps", "run_dir"):
        if summary.get(key) is not None:
            value = summary[key]
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)
