"""The one-rank shortcuts of nitp_ds/one_rank.py, measured in one process on one model.

Usage (one device call; DS_ACCELERATOR=cpu and ds_configs/zero3_moe_cpu.json run it on a CPU):
    python bench/one_rank.py --data DIR [--shape A] [--window 10] [--repeats 3] [--ds-config ds_configs/zero3_moe.json]

The run is built with `train.fast_zero_step=false` and the streamlined step put in afterwards, so that it
starts on DeepSpeed's own gradient path with its module hooks. Windows of --window steps then alternate
between DeepSpeed's gradient path (bucket, concatenation, reduce-scatter over one rank) and the hand-off
(`deepspeed`, `hand-off`, `deepspeed`, ...: drift hits both alike); then the module hooks are removed and the
parameters kept gathered between steps (irreversible, so those windows come last: `all`). Prints tokens/s
per window, and the median and min-max per arm.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_compare import SHAPES  # noqa: E402

from nitp_ds import one_rank  # noqa: E402
from nitp_ds.config import load_config  # noqa: E402
from nitp_ds.distributed import ensure_dist_env  # noqa: E402
from nitp_ds.engine import streamline_zero3_step  # noqa: E402
from nitp_ds.trainer import Trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--shape", default="A", choices=sorted(SHAPES))
    parser.add_argument("--window", type=int, default=10, help="steps per window")
    parser.add_argument("--repeats", type=int, default=3, help="windows per arm")
    parser.add_argument("--ds-config", default="ds_configs/zero3_moe.json")
    parser.add_argument("--out-dir", default="/tmp/nitp-bench-one-rank")
    args = parser.parse_args()
    ensure_dist_env()
    sets = {**SHAPES[args.shape], "data.path": args.data, "train.out_dir": args.out_dir, "train.steps": 10**6,
            "checkpoint.every": 0, "logging.tensorboard": False, "optim.lr": 1e-4, "schedule.warmup_steps": 0,
            "train.fast_zero_step": False}
    cfg = load_config("recipes/qwen3_moe_small.yaml", [f"{k}={v}" for k, v in sets.items()])
    trainer = Trainer(cfg, args.ds_config, force=True)
    trainer.build()
    zero = trainer.engine.optimizer
    streamline_zero3_step(zero)
    deepspeed_path = zero.reduce_independent_p_g_buckets_and_remove_grads
    one_rank.hand_off_gradients(zero)
    hand_off = zero.reduce_independent_p_g_buckets_and_remove_grads
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len * cfg.train.grad_accum
    gc.disable()  # as in `nitp train`'s loop (train.gc_every)

    def window(steps: int) -> float:
        gc.collect(0)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        sync()
        return steps * tokens / (time.perf_counter() - start)

    window(6)  # compiles and warms up
    results: dict[str, list[float]] = {"deepspeed": [], "hand-off": [], "all": []}
    for _ in range(args.repeats):
        for arm, path in (("deepspeed", deepspeed_path), ("hand-off", hand_off)):
            zero.reduce_independent_p_g_buckets_and_remove_grads = path
            results[arm].append(window(args.window))
            print(f"{arm:<10} {results[arm][-1]:,.0f} tokens/s", flush=True)
    if one_rank.stay_gathered(zero):
        for _ in range(args.repeats):
            results["all"].append(window(args.window))
            print(f"{'all':<10} {results['all'][-1]:,.0f} tokens/s", flush=True)
    summary = {arm: {"median": round(statistics.median(v)), "min": round(min(v)), "max": round(max(v))}
               for arm, v in results.items() if v}
    print(json.dumps({"shape": args.shape, "window": args.window, **summary}))


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
