"""The NITP study: arms (NTP, NITP, the paper's ablations) × seeds on real text, paired by seed, with intervals.

Stages (`all` runs them in order; a rerun with the same --out continues where the last one stopped):
  corpus   the Python source files installed with the toolkit (the standard library and the packages of the
           environment: code, docstrings and comments; PSF/BSD/Apache/MIT licences), one JSONL document per
           file, sampled deterministically to about --corpus-mb megabytes. Skipped when OUT/corpus.jsonl or
           OUT/data exists (so OUT/data can be prepared on one machine and carried to another).
  prepare  `nitp prepare-data` with a byte-level BPE trained on the corpus (--vocab). Skipped when OUT/data
           exists (--rebuild-data redoes both).
  train    every (arm, seed) run with `nitp train`, one process each, --parallel of them at once on the one GPU
           (default: all, at most 8). Seed s is `train.seed=s` in every arm: the same initial weights of the
           shared model and the same data order, so arms are paired by seed. A finished run is evaluated at once with the
           shared evaluation (`nitp eval`, --per-layer). Runs resume from their checkpoints when the script is
           run again; --train-seconds stops the training that is still going (each run saves and exits).
  report   OUT/report.md and OUT/report.json: per arm, each metric's mean ± std over seeds; per arm, the paired
           difference to the `ntp` arm with a 95% t-interval over seeds; per-layer geometry; NITP loss phases.
           Then `nitp plot` with the seeds of each arm as one band (skipped where matplotlib is absent).

Arms (--arms, default `ntp nitp`; `all` for every one): see ARMS. `nitp` is the recipe (target layer 2 of 8,
cosine, stop-gradient, next-token target, λ 1). --tiny is a CPU smoke shape (8 layers of width 32) that runs
the whole pipeline in minutes. --export DIR copies the small results (report, metrics, evals, plots) to DIR.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "study_qwen3_moe.yaml"
NITP_CLI = [sys.executable, "-c", "from nitp_ds.cli.main import main; main()"]

ARMS = {
    "ntp": ["nitp.head=none", "nitp.weight=0"],
    "nitp": [],  # the recipe: target layer 2 of 8, cosine, stop-gradient, offset 1
    "layer1": ["nitp.target_layer=1"],
    "layer4": ["nitp.target_layer=4"],
    "no_stop_grad": ["nitp.stop_grad=false"],
    "offset0": ["nitp.offset=0"],
    "mse": ["nitp.loss=mse"],
}
BASELINE = "ntp"

# A CPU smoke shape: 8 layers (so every arm's target layer exists), width 32, short sequences.
TINY = ["model.hidden_size=32", "model.num_heads=4", "model.num_kv_heads=2", "model.num_experts=4",
        "model.experts_per_token=2", "model.moe_intermediate_size=32", "model.intermediate_size=64",
        "data.seq_len=64", "model.max_seq_len=64", "train.micro_batch_size=2", "schedule.warmup_steps=2",
        "logging.tensorboard=false"]


# ---------------------------------------------------------------------------------------------
# Statistics over seeds
# ---------------------------------------------------------------------------------------------


def t_two_sided_cdf(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with an integer df, in closed form (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 1:
        term, total = math.cos(theta), 0.0
        for k in range(1, (df - 1) // 2 + 1):  # cos θ + (2/3) cos³ θ + (2·4)/(3·5) cos⁵ θ + …
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + math.sin(theta) * total) if df > 1 else 2 * theta / math.pi
    term, total = 1.0, 0.0
    for k in range(1, df // 2 + 1):  # 1 + (1/2) cos² θ + (1·3)/(2·4) cos⁴ θ + …
        total += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return math.sin(theta) * total


def t_quantile(df: int, level: float = 0.95) -> float:
    """The t with P(|T| <= t) = level, by bisection on the closed-form distribution."""
    low, high = 0.0, 1e4
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_two_sided_cdf(mid, df) < level else (low, mid)
    return (low + high) / 2


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (None for one value) of the finite values."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"n": 0, "mean": None, "std": None}
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None}


def paired_difference(arm: dict[int, float], baseline: dict[int, float], level: float = 0.95) -> dict:
    """arm − baseline over the seeds both have: mean, sample std, and the t-interval of the mean difference.

    Pairing by seed removes what the seed does to both arms alike (initial weights, data order), which is
    most of the run-to-run spread; the interval has n − 1 degrees of freedom and is None for one pair.
    """
    seeds = sorted(s for s in arm if s in baseline and arm[s] is not None and baseline[s] is not None)
    diffs = [arm[s] - baseline[s] for s in seeds]
    result = {"seeds": seeds, "n": len(diffs), "mean": None, "std": None, "low": None, "high": None}
    if not diffs:
        return result
    result["mean"] = statistics.fmean(diffs)
    if len(diffs) > 1:
        result["std"] = statistics.stdev(diffs)
        half = t_quantile(len(diffs) - 1, level) * result["std"] / math.sqrt(len(diffs))
        result["low"], result["high"] = result["mean"] - half, result["mean"] + half
    return result


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def build_corpus(path: Path, megabytes: float) -> dict:
    """Every .py file under the stdlib and site-packages, kept when crc32(relative path) falls under a
    threshold chosen to hit the size: deterministic for a given environment, and spread over packages."""
    roots = sorted({sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]})
    files = []
    for root in roots:
        for d, dirs, names in os.walk(root):
            dirs[:] = sorted(x for x in dirs if x not in ("__pycache__", "test", "tests", "idle_test"))
            for name in sorted(names):
                if name.endswith(".py"):
                    full = Path(d) / name
                    size = full.stat().st_size
                    if 200 <= size <= 400_000:
                        files.append((zlib.crc32(str(full.relative_to(root)).encode()) / 2**32, size, full))
    total = sum(size for _, size, _ in files)
    keep = min(1.0, megabytes * 1e6 / max(total, 1))
    written = documents = 0
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as out:
        for key, size, full in files:
            if key >= keep:
                continue
            text = full.read_text(encoding="utf-8", errors="replace")
            out.write(json.dumps({"text": text}) + "\n")
            written += size
            documents += 1
    tmp.replace(path)
    return {"documents": documents, "bytes": written, "candidates": len(files), "fraction": keep}


def nitp(*args: str, env: dict | None = None, log: Path | None = None) -> int:
    """Run one `nitp` command; its output goes to `log` (appended) or to this process's stdout."""
    if log is None:
        print("$ nitp " + " ".join(args), flush=True)
        return subprocess.run([*NITP_CLI, *args], cwd=REPO, env=env).returncode
    with log.open("a") as handle:
        handle.write("$ nitp " + " ".join(args) + "\n")
        handle.flush()
        return subprocess.run([*NITP_CLI, *args], cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
    arm: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.arm}/seed{self.seed}"


def run_dir(out: Path, run: Run) -> Path:
    return out / "runs" / run.arm / f"seed{run.seed}"


def eval_json(out: Path, run: Run, steps: int) -> Path:
    """Named after the step it scores: a rerun with more --steps evaluates the longer run again."""
    return run_dir(out, run) / f"eval_step{steps}.json"


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def finished(out: Path, run: Run, steps: int) -> bool:
    summary = read_json(run_dir(out, run) / "summary.json") or {}
    return summary.get("status") == "finished" and summary.get("step", -1) >= steps


def train_command(args, run: Run) -> list[str]:
    sets = [f"data.path={args.out / 'data'}", f"train.out_dir={run_dir(args.out, run)}", f"train.steps={args.steps}",
            f"train.seed={run.seed}", f"checkpoint.every={args.checkpoint_every}", "checkpoint.keep_last=1",
            f"train.eval_every={args.eval_every}", f"logging.every={args.log_every}"]
    sets += (TINY if args.tiny else []) + ARMS[run.arm] + args.set
    command = ["train", "--config", str(RECIPE), "--ds-config", args.ds_config]
    for item in sets:
        command += ["--set", item]
    return command


def eval_command(args, run: Run) -> list[str]:
    """`nitp eval` of the run's final checkpoint (the shared evaluation: the trainer's validation loss over the
    whole val split up to --eval-tokens, at the training sequence length), with per-layer geometry."""
    return ["eval", str(run_dir(args.out, run)), "--tokens", str(args.eval_tokens), "--per-layer",
            "--sample-tokens", str(args.sample_tokens), "--out", str(eval_json(args.out, run, args.steps))]


class Trainer:
    """Starts the runs, at most --parallel at once, stops the training at the deadline, evaluates each run
    that finishes."""

    def __init__(self, args):
        self.args = args
        self.deadline = time.monotonic() + args.train_seconds if args.train_seconds else None
        self.lock = threading.Lock()
        # Runs of one wave finish together; ten evaluations at once (each consolidating a checkpoint) failed on
        # a 128 GB host, so at most --eval-parallel of them run at a time.
        self.eval_slots = threading.Semaphore(args.eval_parallel)
        self.procs: dict[Run, subprocess.Popen] = {}
        self.stopping = False
        self.env = {**os.environ}
        if args.tiny:
            self.env["DS_ACCELERATOR"] = "cpu"
        # Each process would otherwise start one CPU thread per core: N runs at once oversubscribe the host.
        threads = max(1, (os.cpu_count() or 1) // max(1, args.parallel))
        self.env.setdefault("OMP_NUM_THREADS", str(threads))

    def stop_all(self, *_):
        with self.lock:
            self.stopping = True
            for proc in self.procs.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)  # the run saves a checkpoint and exits 0

    def train_one(self, run: Run) -> str:
        args = self.args
        log = args.out / "logs" / f"{run.arm}-seed{run.seed}.log"
        if not finished(args.out, run, args.steps):
            with self.lock:
                if self.stopping:
                    return "not started (stopped)"
                handle = log.open("a")
                command = train_command(args, run)
                handle.write("$ nitp " + " ".join(command) + "\n")
                handle.flush()
                self.procs[run] = subprocess.Popen([*NITP_CLI, *command], cwd=REPO, env=self.env, stdout=handle,
                                                   stderr=subprocess.STDOUT)
            print(f"{run.name}: training (log {log})", flush=True)
            code = self.procs[run].wait()
            handle.close()
            if code != 0 and self.stopping:
                return f"stopped during start-up (exit {code}; rerun to continue)"
            if code != 0:
                return f"failed (exit {code}, see {log})"
            if not finished(args.out, run, args.steps):
                return "stopped before the last step (rerun to continue)"
        if eval_json(args.out, run, args.steps).exists():
            return "finished, evaluated before"
        print(f"{run.name}: finished, evaluating", flush=True)
        with self.eval_slots:
            code = nitp(*eval_command(args, run), env=self.env, log=log)
        if code != 0:
            return f"evaluation failed (exit {code}, see {log})"
        return "finished and evaluated"

    def watch_deadline(self, done: threading.Event) -> None:
        while not done.wait(5):
            if self.deadline is not None and time.monotonic() > self.deadline:
                print(f"--train-seconds {self.args.train_seconds} reached: stopping the runs still training",
                      flush=True)
                self.stop_all()
                return

    def run(self, runs: list[Run]) -> dict[str, str]:
        (self.args.out / "logs").mkdir(parents=True, exist_ok=True)
        signal.signal(signal.SIGTERM, self.stop_all)
        done = threading.Event()
        watcher = threading.Thread(target=self.watch_deadline, args=(done,), daemon=True)
        watcher.start()
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=self.args.parallel) as pool:
            outcomes = dict(zip((r.name for r in runs), pool.map(self.train_one, runs)))
        done.set()
        for name, outcome in outcomes.items():
            print(f"{name}: {outcome}", flush=True)
        print(f"train stage: {time.monotonic() - started:.0f} s", flush=True)
        return outcomes


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def train_series(run_directory: Path, key: str) -> dict[int, float]:
    """step -> value of `key` in the run's logged train records (each the mean over a logging interval); a
    step logged twice (a resumed run) keeps its last value."""
    path = run_directory / "metrics.jsonl"
    points: dict[int, float] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        value = record.get(key)
        if record.get("kind") == "train" and isinstance(value, (int, float)) and not isinstance(value, bool):
            points[record["step"]] = float(value)
    return points


def nitp_phases(points: dict[int, float], phase_steps: int) -> dict:
    """The NITP loss's phases: its minimum in the first `phase_steps` steps (the collapse), its maximum after
    them (the plateau), and its last value. Empty without a head (the part is logged as 0)."""
    if not points or max(points.values()) == 0.0:
        return {}
    early = [v for s, v in points.items() if s <= phase_steps]
    late = [v for s, v in points.items() if s > phase_steps]
    return {"nitp_loss_min_early": min(early) if early else None, "nitp_loss_max_late": max(late) if late else None,
            "nitp_loss_final": points[max(points)]}


def run_metrics(out: Path, run: Run, steps: int, phase_steps: int) -> dict[str, float]:
    evaluation = read_json(eval_json(out, run, steps)) or {}
    metrics = {"val_loss_ntp": evaluation.get("val/loss_ntp"), "val_loss_nitp": evaluation.get("val/loss_nitp"),
               "effective_rank": evaluation.get("geometry/effective_rank"),
               "anisotropy": evaluation.get("geometry/anisotropy")}
    for key, value in evaluation.items():
        if key.startswith("geometry/layer"):
            metrics[key.removeprefix("geometry/")] = value
    directory = run_dir(out, run)
    metrics.update(nitp_phases(train_series(directory, "loss/nitp"), phase_steps))
    ntp = train_series(directory, "loss/ntp")
    metrics["train_loss_ntp_final"] = ntp[max(ntp)] if ntp else None
    speed = list(train_series(directory, "tokens_per_s").values())
    metrics["tokens_per_s"] = statistics.median(speed) if speed else None
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


HEADLINE = ["val_loss_ntp", "effective_rank", "anisotropy", "val_loss_nitp", "nitp_loss_min_early",
            "nitp_loss_max_late", "nitp_loss_final", "train_loss_ntp_final", "tokens_per_s"]


def build_report(out: Path, arms: list[str], seeds: list[int], steps: int, phase_steps: int) -> dict:
    """Per arm and metric: mean ± std over its finished seeds; paired differences to the baseline arm."""
    per_run = {arm: {seed: run_metrics(out, Run(arm, seed), steps, phase_steps) for seed in seeds
                     if finished(out, Run(arm, seed), steps) and eval_json(out, Run(arm, seed), steps).exists()}
               for arm in arms}
    keys = sorted({k for runs in per_run.values() for m in runs.values() for k in m},
                  key=lambda k: (k not in HEADLINE, HEADLINE.index(k) if k in HEADLINE else 0, k))
    report = {"steps": steps, "seeds": seeds, "arms": arms, "baseline": BASELINE, "runs": per_run,
              "summary": {}, "paired": {}}
    for arm, runs in per_run.items():
        report["summary"][arm] = {k: mean_std([m.get(k) for m in runs.values()]) for k in keys}
        if arm != BASELINE and BASELINE in per_run:
            base = per_run[BASELINE]
            report["paired"][arm] = {
                k: paired_difference({s: m.get(k) for s, m in runs.items()}, {s: m.get(k) for s, m in base.items()})
                for k in keys if k != "tokens_per_s"}
    return report


def fmt(value, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def fmt_mean_std(stats: dict, digits: int) -> str:
    if not stats or stats["mean"] is None:
        return "—"
    return fmt(stats["mean"], digits) + ("" if stats["std"] is None else f" ± {fmt(stats['std'], digits)}")


def fmt_paired(diff: dict, digits: int) -> str:
    if not diff or diff["mean"] is None:
        return "—"
    text = f"{diff['mean']:+.{digits}f}"
    if diff["low"] is None:
        return text + " (1 pair: no interval)"
    noise = " within noise" if diff["low"] <= 0 <= diff["high"] else ""
    return f"{text} [{diff['low']:+.{digits}f}, {diff['high']:+.{digits}f}]{noise}"


def digits_for(key: str) -> int:
    return 1 if "effective_rank" in key or key == "tokens_per_s" else 4


def report_markdown(report: dict) -> str:
    arms, summary, paired = report["arms"], report["summary"], report["paired"]
    n = {arm: len(report["runs"][arm]) for arm in arms}
    lines = [f"# NITP study: {', '.join(arms)} × seeds {report['seeds']}, {report['steps']} steps", "",
             "Mean ± sample std over the finished seeds of each arm (n per arm in the header). Paired difference: "
             f"arm − {report['baseline']} over the seeds both finished, with its 95% t-interval (n − 1 degrees of "
             "freedom); 'within noise' where the interval contains 0.", ""]
    keys = [k for k in HEADLINE if any(summary[a].get(k, {}).get("n") for a in arms)]
    lines += ["| metric | " + " | ".join(f"{a} (n={n[a]})" for a in arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for key in keys:
        cells = [fmt_mean_std(summary[a].get(key), digits_for(key)) for a in arms]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    compared = [a for a in arms if a in paired]
    if compared:
        lines += ["", f"## Paired difference to {report['baseline']} (95% interval)", "",
                  "| metric | " + " | ".join(f"{a} − {report['baseline']}" for a in compared) + " |",
                  "|---" * (len(compared) + 1) + "|"]
        for key in keys:
            if key == "tokens_per_s" or not any(paired[a].get(key, {}).get("n") for a in compared):
                continue
            lines.append(f"| {key} | " + " | ".join(fmt_paired(paired[a].get(key), digits_for(key))
                                                    for a in compared) + " |")
    layers = sorted({int(k.split("/")[0].removeprefix("layer")) for a in arms for k in summary[a]
                     if k.startswith("layer")})
    if layers:
        lines += ["", "## Per-layer geometry at the end (hidden_states[k]; k = 0 the embedding output)", ""]
        lines += ["| arm | metric | " + " | ".join(str(k) for k in layers) + " |", "|---" * (len(layers) + 2) + "|"]
        for metric in ("effective_rank", "anisotropy"):
            for arm in arms:
                cells = [fmt_mean_std(summary[arm].get(f"layer{k}/{metric}"), digits_for(metric)) for k in layers]
                lines.append(f"| {arm} | {metric} | " + " | ".join(cells) + " |")
            for arm in compared:
                cells = [fmt_paired(paired[arm].get(f"layer{k}/{metric}"), digits_for(metric)) for k in layers]
                lines.append(f"| {arm} − {report['baseline']} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_arms(args, arms: list[str]) -> None:
    groups = [f"{arm}={args.out / 'runs' / arm}/seed*" for arm in arms if (args.out / "runs" / arm).is_dir()]
    if groups and nitp("plot", *groups, "--out", str(args.out / "plots"), "--band", "minmax") != 0:
        print("plot failed (matplotlib missing?); the report is complete without it", flush=True)


def export(args) -> None:
    """Copy the small results (no checkpoints) to --export."""
    target = args.export
    target.mkdir(parents=True, exist_ok=True)
    for name in ("report.md", "report.json", "corpus_stats.json"):
        if (args.out / name).exists():
            shutil.copy2(args.out / name, target / name)
    for folder in ("plots", "logs"):
        if (args.out / folder).is_dir():
            shutil.copytree(args.out / folder, target / folder, dirs_exist_ok=True)
    for directory in sorted((args.out / "runs").glob("*/seed*")):
        dest = target / "runs" / directory.relative_to(args.out / "runs")
        dest.mkdir(parents=True, exist_ok=True)
        for path in [directory / "metrics.jsonl", directory / "summary.json", directory / "resolved_config.yaml",
                     *directory.glob("eval_step*.json")]:
            if path.exists():
                shutil.copy2(path, dest / path.name)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stages", nargs="+", choices=["corpus", "prepare", "train", "report", "all"])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "study")
    parser.add_argument("--arms", nargs="+", default=["ntp", "nitp"], help=f"of {', '.join(ARMS)}, or all")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm: train.seed = first-seed, +1, …")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--parallel", type=int, default=0, help="runs at once (default: all of them, at most 8)")
    parser.add_argument("--eval-parallel", type=int, default=3, help="evaluations at once (default 3)")
    parser.add_argument("--train-seconds", type=float, default=0, help="stop the training after this long "
                        "(each run saves a checkpoint; rerun to continue); 0: no limit")
    parser.add_argument("--corpus-mb", type=float, default=45.0)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--rebuild-data", action="store_true", help="rebuild the corpus and data even if present")
    parser.add_argument("--ds-config", default="ds_configs/zero3_moe_1gpu.json")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=200, help="the trainer's own validation cadence")
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--phase-steps", type=int, default=50, help="NITP loss phases: min up to, max after")
    parser.add_argument("--eval-tokens", type=int, default=1_000_000, help="`nitp eval --tokens` (cap)")
    parser.add_argument("--sample-tokens", type=int, default=4096, help="token states for the geometry")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke shape (see TINY)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--export", type=Path, default=None, help="copy report, metrics, evals, plots here")
    parser.add_argument("--set", action="append", default=[], help="extra recipe override for every run")
    args = parser.parse_args(argv)
    args.arms = list(ARMS) if args.arms == ["all"] else args.arms
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)} or all")
    if args.tiny:
        args.corpus_mb, args.vocab = min(args.corpus_mb, 1.0), min(args.vocab, 512)
        args.ds_config = "ds_configs/zero3_moe_cpu.json"
        args.eval_tokens, args.sample_tokens = 4096, 256
    args.out = args.out.resolve()
    args.seed_list = list(range(args.first_seed, args.first_seed + args.seeds))
    runs = [Run(arm, seed) for seed in args.seed_list for arm in args.arms]
    args.runs = runs
    args.parallel = args.parallel or min(len(runs), 8)  # each run holds its own model and activations on the GPU
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    stages = {"corpus", "prepare", "train", "report"} if "all" in args.stages else set(args.stages)
    args.out.mkdir(parents=True, exist_ok=True)
    corpus, data = args.out / "corpus.jsonl", args.out / "data"
    have_data = (data / "manifest.json").exists()
    if "corpus" in stages and (args.rebuild_data or not (corpus.exists() or have_data)):
        stats = build_corpus(corpus, args.corpus_mb)
        (args.out / "corpus_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        print(json.dumps(stats), flush=True)
    if "prepare" in stages and (args.rebuild_data or not have_data):
        code = nitp("prepare-data", "--source", f"python={corpus}", "--out", str(data), "--train-tokenizer",
                    str(args.vocab), "--val-fraction", "0.01", "--force", "--no-progress")
        if code != 0:
            raise SystemExit(f"prepare-data failed (exit {code})")
    if "train" in stages:
        Trainer(args).run(args.runs)
    if "report" in stages:
        report = build_report(args.out, args.arms, args.seed_list, args.steps, args.phase_steps)
        (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        markdown = report_markdown(report)
        (args.out / "report.md").write_text(markdown)
        print(markdown, flush=True)
        if not args.no_plot:
            plot_arms(args, args.arms)
    if args.export is not None:
        export(args)


if __name__ == "__main__":
    main()
