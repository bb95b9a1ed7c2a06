"""Start real `nitp train` processes on CPU for the reliability tests: one helper for every run.

A run is a tiny Qwen3-MoE (hidden 32, 2 layers, 32-token sequences) so that the process start-up
dominates; `TINY` holds those overrides, and every test passes its own on top.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from nitp_ds.demo import module_documents, write_documents

REPO = Path(__file__).resolve().parent.parent
DS_CONFIG = REPO / "ds_configs" / "zero3_moe_cpu.json"
NITP = [sys.executable, "-m", "nitp_ds.cli"]

TINY = {
    "model.hidden_size": 32, "model.num_layers": 2, "data.seq_len": 32, "train.micro_batch_size": 2,
    "logging.every": 1, "train.deterministic": "true", "train.eval_every": 0, "train.eval_tokens": 64,
    "train.steps": 6, "checkpoint.every": 3, "checkpoint.keep_last": 0,
    "optim.fused": "true",  # fused AdamW, as on a GPU: the one-pass ZeRO-3 step (nitp_ds/one_pass_adamw.py)
}

STDLIB_MODULES = ["os", "json", "re", "collections", "itertools", "functools", "pathlib", "subprocess", "argparse",
                  "logging", "dataclasses", "random", "math", "string", "shutil", "tempfile", "textwrap",
                  "inspect", "socket", "threading", "heapq", "csv", "datetime", "decimal", "fractions",
                  "statistics", "unittest", "zipfile", "tarfile", "hashlib", "pickle", "enum", "contextlib", "io",
                  "difflib", "pprint", "glob", "struct", "codecs", "asyncio", "sqlite3", "ast", "traceback"]


def write_corpus(path: Path, limit: int = 300) -> Path:
    """A small learnable corpus: docstrings (over 80 characters) of standard-library functions and classes."""
    write_documents(path, module_documents(STDLIB_MODULES, min_chars=81), max_documents=limit)
    return path


def prepare_data(tmp: Path) -> Path:
    corpus = write_corpus(tmp / "corpus.jsonl")
    out = tmp / "data"
    subprocess.run([*NITP, "prepare-data", "--source", str(corpus), "--out", str(out), "--train-tokenizer", "400",
                    "--no-progress"], check=True, capture_output=True, text=True, cwd=REPO)
    return out


# What the libraries underneath print on their own (nitp_ds/console.py hides it unless --debug): Python
# warnings, DeepSpeed's log records, tqdm progress bars, DeepSpeed's "op built successfully" print.
THIRD_PARTY_NOISE = re.compile(r"Warning|\[WARNING\]|\[INFO\]|\d+%\||built successfully")


def third_party_noise(output: str) -> list[str]:
    return [line for line in output.splitlines() if THIRD_PARTY_NOISE.search(line)]


def train_args(data: Path, run_dir: Path, *, nproc: int = 1, extra: list[str] = (), ds_config: Path = DS_CONFIG,
               **sets) -> list[str]:
    values = {**TINY, "data.path": data, "train.out_dir": run_dir, **sets}
    args = [*NITP, "train", "--config", "debug", "--ds-config", str(ds_config), "--nproc", str(nproc)]
    for key, value in values.items():
        args += ["--set", f"{key}={value}"]
    return [*args, *extra]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NITP_FAULT_NAN_STEPS")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def train(data: Path, run_dir: Path, *, env: dict[str, str] | None = None, timeout: float = 240,
          preexec_fn=None, **kw) -> subprocess.CompletedProcess:
    """Run `nitp train` to its end; the result carries rc, stdout and stderr."""
    return subprocess.run(train_args(data, run_dir, **kw), env=child_env(**(env or {})), cwd=REPO, text=True,
                          capture_output=True, timeout=timeout, preexec_fn=preexec_fn)


def start(data: Path, run_dir: Path, *, env: dict[str, str] | None = None, log: Path | None = None,
          **kw) -> subprocess.Popen:
    """Start `nitp train` in the background, its output in `log` (default: run_dir's sibling `<name>.log`)."""
    out = open(log or run_dir.parent / f"{run_dir.name}.log", "w")
    return subprocess.Popen(train_args(data, run_dir, **kw), env=child_env(**(env or {})), cwd=REPO, text=True,
                            stdout=out, stderr=subprocess.STDOUT)


def node_args(node_rank: int, port: int, nodes: int = 2) -> list[str]:
    """`nitp train` options for one of several nodes simulated on this machine: a launcher per node (--no_ssh)."""
    return ["--num-nodes", str(nodes), "--node-rank", str(node_rank), "--master-addr", "127.0.0.1",
            "--master-port", str(port)]


def finish(proc: subprocess.Popen, timeout: float = 240) -> int:
    """The exit code of a started run; a run still going after `timeout` seconds is killed and fails the test."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        import psutil

        for child in psutil.Process(proc.pid).children(recursive=True):  # the launcher has a session of its own
            child.kill()
        proc.kill()
        raise AssertionError(f"run still going after {timeout} s (hung?): {shlex.join(proc.args)}") from None


def wait_until(condition, proc: subprocess.Popen, timeout: float = 180, poll: float = 0.02) -> None:
    """Wait until condition() holds; fail if the process ends first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before the awaited condition")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the condition")
        time.sleep(poll)


def stop(proc: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = 120) -> int:
    proc.send_signal(sig)
    return proc.wait(timeout=timeout)


def records(run_dir: Path, kind: str = "train") -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
            continue
        if record.get("kind") == kind:
            out.append(record)
    return out


def logged_step(run_dir: Path) -> int:
    steps = [r["step"] for r in records(run_dir)]
    return max(steps, default=0)


def complete(run_dir: Path, step: int) -> bool:
    return (run_dir / "checkpoints" / f"global_step{step}" / "nitp_meta.json").is_file()


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def curve(run_dir: Path, keys=("loss/total", "loss/ntp", "lr", "grad_norm", "consumed_tokens")) -> list[tuple]:
    return [(r["step"], *(r[k] for k in keys)) for r in records(run_dir)]
