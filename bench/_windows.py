"""What the one-process window benchmarks share (bench/one_rank.py, bench/expert_padding.py,
bench/step_parts.py): their arguments, one `nitp train` Trainer built for a shape of bench/gpu_compare.py,
timed windows of training steps, and the median and min-max of a list of figures."""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_compare import SHAPES  # noqa: E402

from nitp_ds.config import load_config  # noqa: E402
from nitp_ds.distributed import ensure_dist_env  # noqa: E402
from nitp_ds.trainer import Trainer  # noqa: E402


def arguments(shape: str, out_dir: str) -> argparse.ArgumentParser:
    """The arguments every window benchmark takes (a benchmark adds its own to it)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--shape", default=shape, choices=sorted(SHAPES))
    parser.add_argument("--window", type=int, default=10, help="steps per window")
    parser.add_argument("--repeats", type=int, default=3, help="windows per arm")
    parser.add_argument("--ds-config", default="ds_configs/zero3_moe.json")
    parser.add_argument("--out-dir", default=out_dir)
    return parser


def parse_args(shape: str, out_dir: str) -> argparse.Namespace:
    return arguments(shape, out_dir).parse_args()


def build_trainer(args: argparse.Namespace, **sets) -> Trainer:
    """A built Trainer for --shape on --data (recipe keys in `sets` override), Python's GC paused as in
    `nitp train`'s loop (train.gc_every)."""
    ensure_dist_env()
    sets = {**SHAPES[args.shape], "data.path": args.data, "train.out_dir": args.out_dir, "train.steps": 10**6,
            "checkpoint.every": 0, "logging.tensorboard": False, "optim.lr": 1e-4, "schedule.warmup_steps": 0,
            **sets}
    cfg = load_config("recipes/qwen3_moe_small.yaml", [f"{k}={v}" for k, v in sets.items()])
    trainer = Trainer(cfg, args.ds_config, force=True)
    trainer.build()
    gc.disable()
    return trainer


def tokens_per_step(trainer: Trainer) -> int:
    """The tokens one training step of this (one-rank) Trainer consumes."""
    train = trainer.cfg.train
    return train.micro_batch_size * trainer.cfg.data.seq_len * train.grad_accum


def window(trainer: Trainer, steps: int) -> float:
    """Tokens/s over `steps` training steps, from one device synchronisation to another."""
    gc.collect(0)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    sync()
    return steps * tokens_per_step(trainer) / (time.perf_counter() - start)


def spread(values: list[float], digits: int | None = None) -> dict:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
