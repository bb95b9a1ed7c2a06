"""Peak memory of `nitp train` phase by phase, against the memory plan; and the largest model that trains.

Table mode (default): for each model size and process count, one real run (ZeRO-3, the trainer's own
build, two steps, a checkpoint save) in fresh processes, then `nitp convert` of its checkpoint. Prints,
per phase, the largest rank's peak host memory (VmHWM) and peak device memory (max_memory_allocated), and
the memory plan's estimate beside them:

    python bench/memory.py [--sizes 0.05B 0.1B 0.2B] [--nproc 1 2] [--ds-config FILE] [--set k=v ...]
                           [--data DIR] [--json OUT]

On a machine without a GPU the runs use DS_ACCELERATOR=cpu (gloo) and ds_configs/zero3_moe_cpu.json.

Largest model (`--find-largest`): grows model.num_layers of one shape (`--set` picks it; the default is
shape A of the GPU benchmark) until a run of two steps fails, starting from the plan's largest fitting
count and stepping by --step (default 15%; at most --max-tries runs of --timeout seconds each, no checkpoint save); prints
the largest that trained with its measured peak and its estimate (`--layers` sets the first try). Each try
initialises every weight on the host, one module at a time (a minute or more for billions of parameters):

    python bench/memory.py --find-largest [--ds-config ds_configs/zero3_moe_offload.json] [--nproc 1] [--layers N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHILD = REPO / "bench" / "_memory_child.py"
sys.path.insert(0, str(REPO))

# Qwen3-MoE shapes by total parameters (NITP head included), vocabulary 16,000, 256-token sequences.
SIZES = {
    "0.05B": {"model.hidden_size": 384, "model.num_layers": 8, "model.num_heads": 6, "model.num_kv_heads": 2,
              "model.num_experts": 8, "model.experts_per_token": 2, "model.moe_intermediate_size": 384},
    "0.1B": {"model.hidden_size": 512, "model.num_layers": 12, "model.num_heads": 8, "model.num_kv_heads": 2,
             "model.num_experts": 16, "model.experts_per_token": 2, "model.moe_intermediate_size": 256},
    "0.2B": {"model.hidden_size": 768, "model.num_layers": 10, "model.num_heads": 12, "model.num_kv_heads": 4,
             "model.num_experts": 16, "model.experts_per_token": 2, "model.moe_intermediate_size": 384},
}
COMMON = {"model.vocab_size": 16000, "data.seq_len": 256, "model.max_seq_len": 256, "train.micro_batch_size": 4,
          "train.eval_every": 0, "train.steps": 2, "checkpoint.every": 0,
          "checkpoint.keep_last": 0, "logging.tensorboard": "false", "logging.every": 1}
# Shape A of the GPU benchmark (docs/benchmarks.md), the starting shape of --find-largest.
SHAPE_A = {"model.hidden_size": 1024, "model.num_layers": 16, "model.num_heads": 16, "model.num_kv_heads": 4,
           "model.num_experts": 32, "model.experts_per_token": 4, "model.moe_intermediate_size": 512,
           "model.vocab_size": 32000, "data.seq_len": 2048, "model.max_seq_len": 2048, "train.micro_batch_size": 8}
PHASES = ("start", "build", "first step", "second step", "save")
PLAN_PARTS = ("host", "build_peak", "device", "build", "host_baseline", "params", "grads", "optimizer", "activations",
              "working")


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    if not on_gpu():
        env["DS_ACCELERATOR"] = "cpu"
    return env


def prepare_data(tmp: Path) -> Path:
    """A small corpus (standard-library docstrings) with a 2,000-token vocabulary; the model's vocabulary is
    set apart (model.vocab_size), so the data only has to fill a few batches."""
    from nitp_ds.data.prepare import prepare_data as prepare
    from nitp_ds.demo import build_corpus

    build_corpus(tmp / "corpus.jsonl", max_documents=3000)
    prepare([str(tmp / "corpus.jsonl")], tmp / "data", train_vocab_size=2000, val_fraction=0.05, num_workers=1,
            progress=False)
    return tmp / "data"


def sets_list(sets: dict) -> list[str]:
    return [f"{k}={v}" for k, v in sets.items()]


def run_phases(sets: dict, ds_config: str, nproc: int, out: Path, timeout: float,
               save: bool = True) -> list[dict] | str:
    """One run of the child on `nproc` ranks: every rank's phase records, or the reason it failed."""
    from nitp_ds.distributed import free_port

    record = out / "phases.json"
    args = [str(CHILD), str(REPO / "recipes" / "debug.yaml"), ds_config, str(record), *sets_list(sets)]
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
               str(free_port()), *args]
    env = {**child_env(), "NITP_MEMORY_SAVE": "1" if save else "0"}
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: a timeout ends the ranks too
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        # with NITP_DEBUG the trainer says each start-up part as it ends: how far the run got
        reached = [line.strip() for line in output.splitlines() if line.startswith("start-up:")]
        recompiled = sum("Recompiling function" in line for line in output.splitlines())  # TORCH_LOGS=recompiles
        return (f"timed out after {timeout:.0f} s" + (f", {reached[-1]}" if reached else "")
                + (f", {recompiled} recompilations" if recompiled else ""))
    if proc.returncode != 0 or not record.is_file():
        tail = output.strip().splitlines()[-3:]
        oom = any("out of memory" in line.lower() for line in tail)
        return "out of memory" if oom else f"exit {proc.returncode}: {' | '.join(tail)[-400:]}"
    return json.loads(record.read_text())


def convert_peak_mib(run_dir: Path, out: Path) -> float | None:
    """`nitp convert`'s own report: the larger of its process's and ds_to_universal's peak RSS."""
    result = subprocess.run([sys.executable, "-m", "nitp_ds.cli", "convert", str(run_dir), "--out", str(out)],
                            env=child_env(), cwd=REPO, capture_output=True, text=True)
    match = re.search(r"peak RSS (\d+) MiB, ds_to_universal (\d+) MiB", result.stdout)
    return max(float(match.group(1)), float(match.group(2))) if match else None


def estimate(sets: dict, ds_config: str, nproc: int):
    """The memory plan for this run, as the trainer computes it."""
    from nitp_ds.config import load_config, validate
    from nitp_ds.ds_config import load_ds_config
    from nitp_ds.memory import plan_for_run
    from nitp_ds.resolve import resolve_run

    cfg = validate(load_config(REPO / "recipes" / "debug.yaml", sets_list(sets)))
    return plan_for_run(cfg, resolve_run(cfg, load_ds_config(ds_config), nproc), nproc)


def gib(mib: float | None) -> str:
    return "-" if mib is None else f"{mib / 1024:.2f}"


def table(args, data: Path, tmp: Path) -> list[dict]:
    rows = []
    for size in args.sizes:
        for nproc in args.nproc:
            sets = {**COMMON, **SIZES[size], "data.path": data, "train.out_dir": tmp / f"{size}-{nproc}" / "run",
                    **dict(s.split("=", 1) for s in args.set)}
            plan, shape = estimate(sets, args.ds_config, nproc)
            print(f"{size} × {nproc} process(es): {shape.total / 1e6:.0f}M parameters ...", flush=True)
            ranks = run_phases(sets, args.ds_config, nproc, tmp / f"{size}-{nproc}", args.timeout)
            if isinstance(ranks, str):
                print(f"  failed: {ranks}")
                continue
            row = {"size": size, "params": shape.total, "nproc": nproc,
                   "peaks_reset": all(r["peaks_reset"] for r in ranks),
                   "host_mib": {p: max(r["phases"][p]["host_peak_mib"] for r in ranks) for p in PHASES},
                   "device_mib": {p: max((r["phases"][p]["device_peak_mib"] or 0) for r in ranks) or None
                                  for p in PHASES},
                   "convert_mib": convert_peak_mib(Path(sets["train.out_dir"]), tmp / f"{size}-{nproc}" / "hf"),
                   "rss_mib": {p: max(r["phases"][p]["host_rss_mib"] for r in ranks) for p in PHASES},
                   "plan": {key: getattr(plan, key) / 2**20 for key in PLAN_PARTS}}
            rows.append(row)
            print_row(row)
    return rows


def print_row(row: dict) -> None:
    h, d, p = row["host_mib"], row["device_mib"], row["plan"]
    measured = max(h[ph] for ph in ("first step", "second step"))
    print(f"  host GiB, largest rank: start {gib(h['start'])}  build {gib(h['build'])} (plan {gib(p['build_peak'])})"
          f"  steps {gib(measured)} (plan {gib(p['host'])})  save {gib(h['save'])}  convert {gib(row['convert_mib'])}")
    if any(d.values()):
        print(f"  device GiB: build {gib(d['build'])}  steps {gib(max(d['first step'] or 0, d['second step'] or 0))}"
              f" (plan {gib(p['device'])})  save {gib(d['save'])}")


def markdown(rows: list[dict]) -> None:
    """The rows as docs/benchmarks.md's table (GiB, the largest rank; steps: the larger of the two steps)."""
    device = any(any(r["device_mib"].values()) for r in rows)
    print("\n| model | processes | start | build: measured / plan | steps: measured / plan | save | convert |"
          + (" device steps: measured / plan |" if device else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if device else ""))
    for r in rows:
        h, d, p = r["host_mib"], r["device_mib"], r["plan"]
        steps = max(h["first step"], h["second step"])
        line = (f"| {r['size']} ({r['params'] / 1e6:.0f}M) | {r['nproc']} | {gib(h['start'])} | {gib(h['build'])} / "
                f"{gib(p['build_peak'])} | {gib(steps)} / {gib(p['host'])} ({100 * (p['host'] / steps - 1):+.0f}%) | "
                f"{gib(h['save'])} | {gib(r['convert_mib'])} |")
        if device:
            line += f" {gib(max(d['first step'] or 0, d['second step'] or 0))} / {gib(p['device'])} |"
        print(line)


def find_largest(args, data: Path, tmp: Path) -> None:
    """Grow model.num_layers from the plan's guess until two steps no longer train."""
    from nitp_ds.memory import device_capacity, host_capacity

    # The trainer's own memory check is off: the tries go past the plan's largest to measure it.
    base = {**COMMON, **SHAPE_A, "train.steps": 2, "train.memory_check": "false",
            **dict(s.split("=", 1) for s in args.set)}
    nproc = args.nproc[0]
    capacity, _ = device_capacity()
    capacity = capacity or host_capacity() // nproc

    def fits(layers: int) -> bool:  # on the device, and on the host (offload keeps the optimizer there)
        plan, _ = estimate({**base, "model.num_layers": layers, "data.path": data}, args.ds_config, nproc)
        if plan.settings.on_gpu:
            return plan.device <= capacity and plan.host <= host_capacity()
        return plan.host <= capacity

    if args.layers:
        low = args.layers  # the first try, chosen by the caller (e.g. from --print-config's plan)
    else:
        guess = int(base["model.num_layers"])
        while fits(guess * 2) and guess < 4096:
            guess *= 2
        low, high = guess, guess * 2
        while high - low > 1:  # the plan's largest fitting count
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
        print(f"plan: largest fitting model.num_layers ≈ {low}", flush=True)

    tried: dict[int, object] = {}

    def attempt(layers: int) -> bool:
        sets = {**base, "model.num_layers": layers, "data.path": data, "train.out_dir": tmp / f"L{layers}" / "run"}
        plan, shape = estimate(sets, args.ds_config, nproc)
        ranks = run_phases(sets, args.ds_config, nproc, tmp / f"L{layers}", args.timeout, save=False)
        ok = not isinstance(ranks, str)
        peak = host_peak = None
        if ok:
            key = "device_peak_mib" if on_gpu() else "host_peak_mib"
            peak = max(r["phases"][p][key] or 0 for r in ranks for p in ("first step", "second step"))
            host_peak = sum(max(r["phases"][p]["host_peak_mib"] or 0 for p in PHASES if p in r["phases"])
                            for r in ranks)  # the node's: every rank's own peak
        estimate_gib = (plan.device if plan.settings.on_gpu else plan.host) / 2**30
        host = f"; host peak {gib(host_peak)} GiB, plan {plan.host / 2**30:.1f} GiB" if on_gpu() else ""
        print(f"  {layers} layers, {shape.total / 1e9:.2f}B parameters: "
              f"{'trains' if ok else 'fails (' + ranks + ')'}; peak {gib(peak)} GiB, plan {estimate_gib:.2f} GiB"
              f"{host}", flush=True)
        tried[layers] = (ok, shape.total, peak, estimate_gib)
        import shutil

        shutil.rmtree(tmp / f"L{layers}", ignore_errors=True)
        return ok

    layers = max(1, low)
    step = lambda n: max(1, round(n * args.step))  # noqa: E731
    if attempt(layers):
        while len(tried) < args.max_tries and attempt(layers + step(layers)):
            layers += step(layers)
    else:
        while layers > 1 and len(tried) < args.max_tries:
            layers -= step(layers)
            if attempt(layers):
                break
    good = [(n, v) for n, v in tried.items() if v[0]]
    if good:
        n, (ok, total, peak, est) = max(good)
        print(f"largest that trained: {n} layers, {total / 1e9:.2f}B parameters, peak {gib(peak)} GiB "
              f"(plan {est:.2f} GiB), with {Path(args.ds_config).name} on {nproc} process(es)")
    else:
        print("no tried size trained")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--nproc", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--ds-config", default=None, help="default: zero3_moe.json on GPUs, zero3_moe_cpu.json on CPU")
    parser.add_argument("--set", action="append", default=[], help="recipe override key=value (repeatable)")
    parser.add_argument("--data", default=None, help="a prepared data directory (default: a small built-in corpus)")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--timeout", type=float, default=None, help="per run; default 1800 s, 300 with --find-largest")
    parser.add_argument("--find-largest", action="store_true")
    parser.add_argument("--max-tries", type=int, default=4)
    parser.add_argument("--step", type=float, default=0.15, help="--find-largest's step, a fraction of the layers")
    parser.add_argument("--layers", type=int, default=None, help="--find-largest's first try (default: the plan's)")
    args = parser.parse_args()
    if args.timeout is None:
        args.timeout = 300 if args.find_largest else 1800
    if args.ds_config is None:
        args.ds_config = str(REPO / "ds_configs" / ("zero3_moe.json" if on_gpu() else "zero3_moe_cpu.json"))
    with tempfile.TemporaryDirectory(prefix="nitp-memory-") as name:
        tmp = Path(name)
        data = Path(args.data) if args.data else prepare_data(tmp)
        if args.find_largest:
            find_largest(args, data, tmp)
            return
        rows = table(args, data, tmp)
    markdown(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
