"""`nitp train`: parse, resolve the config, and either run this rank or start the launcher."""

from __future__ import annotations

import json
import os
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


LAUNCHER_OPTIONS = ("--nproc", "--num-gpus", "--num-nodes", "--hostfile", "--node-rank", "--master-addr",
                    "--master-port")
LAUNCHER_FLAGS = ("--no-ssh",)


@app.command("train")
def train_command(
    config: str = typer.Option(..., "--config", "-c", help="Recipe YAML (or a bundled name such as 'debug')."),
    ds_config: str = typer.Option("ds_configs/zero3_moe.json", "--ds-config", help="DeepSpeed JSON config."),
    overrides: list[str] = typer.Option([], "--set", help="Override a recipe key: --set train.steps=100 (repeatable)."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and DeepSpeed config, then exit."),
    resume: str = typer.Option(None, "--resume", help="auto (default: newest complete checkpoint), never, or a checkpoint path."),
    nproc: int = typer.Option(None, "--nproc", "--num-gpus", help="Processes per node (default: all GPUs, or 1 on CPU)."),
    num_nodes: int = typer.Option(1, "--num-nodes", help="Nodes: with --hostfile (pdsh) or with --node-rank (no ssh)."),
    hostfile: str = typer.Option(None, "--hostfile", help="DeepSpeed hostfile ('host slots=N' per line) for multi-node runs."),
    node_rank: int = typer.Option(None, "--node-rank", help="This node's rank [0, nodes): start one `nitp train` per node, no ssh (deepspeed --no_ssh)."),
    master_addr: str = typer.Option(None, "--master-addr", help="Address of node 0, reachable from every node."),
    master_port: int = typer.Option(None, "--master-port", help="Rendezvous port on node 0 (default: a free port on one node, 29500 on several)."),
    no_ssh: bool = typer.Option(False, "--no-ssh", help="Same as giving --node-rank: each node starts its own launcher."),
    force: bool = typer.Option(False, "--force", help="Start afresh in a run directory that holds another run."),
) -> None:
    """Train a MoE model with NITP under DeepSpeed ZeRO-3 + expert parallelism."""
    from nitp_ds.config import load_config, validate

    if nproc is not None and nproc < 1:
        raise NITPError(f"--nproc {nproc} must be at least 1 (processes per node); omit it to use every GPU")
    if num_nodes < 1:
        raise NITPError(f"--num-nodes {num_nodes} must be at least 1")
    sets = list(overrides)
    if resume is not None:
        sets.append(f"checkpoint.resume={resume}")
    cfg = validate(load_config(resolve_recipe(config), sets))

    if print_config:
        from nitp_ds.launch import node_count

        _print_config(cfg, ds_config, (nproc or default_nproc()) * node_count(num_nodes, hostfile),
                      nproc or default_nproc())
        return

    procs = nproc if nproc is not None else default_nproc()
    if no_ssh and node_rank is None:
        raise NITPError("--no-ssh needs --node-rank: this node's rank in [0, number of nodes)")
    multinode = num_nodes > 1 or bool(hostfile) or node_rank is not None
    if not under_launcher() and (procs > 1 or multinode):
        from nitp_ds.launch import launch

        slots = None if hostfile and nproc is None else procs  # a hostfile without --nproc: its slots decide
        raise typer.Exit(launch(_forwarded_argv(), slots,
                                num_nodes=num_nodes, hostfile=hostfile, node_rank=node_rank,
                                master_addr=master_addr, master_port=master_port, run_dir=cfg.train.out_dir))

    import gc

    gc.disable()  # for the start-up's imports; `train` turns it on again when the training loop starts
    from nitp_ds.trainer import train

    try:
        summary = train(cfg, ds_config, force=force)
    except NITPError as exc:
        if getattr(exc, "raised_on_every_rank", False) and int(os.environ.get("RANK", "0")) != 0:
            raise typer.Exit(exc.exit_code)  # global rank 0 shows it: once for the whole job
        if getattr(exc, "quiet", False):
            raise typer.Exit(exc.exit_code)  # `nitp train`, watching this node's ranks, says it
        raise
    if int(os.environ.get("RANK", "0")) == 0:
        _print_summary(summary)


def _forwarded_argv() -> list[str]:
    """This command's own arguments, minus the launcher options, to run on every rank."""
    argv = sys.argv[1:]
    if "train" in argv:  # root options before it (--debug) reach the ranks through NITP_DEBUG
        argv = argv[argv.index("train") + 1:]
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        name = item.split("=", 1)[0]
        if name in LAUNCHER_OPTIONS:
            skip = "=" not in item
            continue
        if name in LAUNCHER_FLAGS:
            continue
        out.append(item)
    return out


def _print_config(cfg, ds_config_path: str, world_size: int, ranks_per_node: int) -> None:
    from nitp_ds.config import dump_yaml
    from nitp_ds.ds_config import load_ds_config
    from nitp_ds.resolve import resolve_run

    try:
        from nitp_ds.data.dataset import open_data

        data = open_data(cfg.data.path)
    except Exception:
        data = None  # only to show the derived config: resolve_run then uses model.vocab_size or a placeholder
    run = resolve_run(cfg, load_ds_config(ds_config_path), world_size, data)
    print("# resolved recipe")
    print(dump_yaml(cfg), end="")
    from nitp_ds.memory import describe, plan_for_run
    from nitp_ds.offload import fast_zero_step_notice

    plan, shape = plan_for_run(cfg, run, ranks_per_node)
    print(describe(plan, shape))
    notice = fast_zero_step_notice(cfg, run.ds_config)
    if notice:
        print(f"# {notice}")
    print(f"# derived DeepSpeed config (world size {world_size})")
    print(json.dumps(run.ds_config, indent=2))


def _print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"nitp train: {summary.get('status')}")
    table.add_column("metric")
    table.add_column("value")
    for key in ("step", "consumed_tokens", "first_loss_ntp", "loss/ntp", "loss/nitp", "loss/aux", "val/loss_ntp",
                "val/loss_ntp_se", "val/tokens", "val/ppl", "val/loss_nitp", "tokens_per_s", "mfu", "skipped_steps",
                "run_dir"):
        if summary.get(key) is not None:
            value = summary[key]
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    if summary.get("phases"):
        from nitp_ds.phases import describe

        for label, value in describe(summary["phases"]):
            table.add_row(f"time: {label}", value)
    Console().print(table)
