"""AutoEP at expert-parallel size 1 with and without its alignment-padding copies, in one process on one model.

Usage (one device call; DS_ACCELERATOR=cpu and ds_configs/zero3_moe_cpu.json run it on a CPU):
    python bench/expert_padding.py --data DIR [--shape B] [--window 10] [--repeats 3] [--ds-config ds_configs/zero3_moe.json]

`nitp train`'s model hands the routed tokens to the grouped GEMMs as they are (`nitp_ds.nitp.experts_unpadded`);
`padded` switches that off, so that DeepSpeed copies them into its padded layout and back. First the loss parts
of one batch are computed both ways (no gradient, same weights); then windows of --window training steps
alternate between the arms (`padded`, `in-place`, `padded`, ...: drift hits both alike) after one warm-up window
each (compiled layers compile once per arm). Prints tokens/s per window, and the median and min-max per arm.
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

from nitp_ds.config import load_config  # noqa: E402
from nitp_ds.distributed import ensure_dist_env  # noqa: E402
from nitp_ds.trainer import Trainer  # noqa: E402

ARMS = {"padded": False, "in-place": True}  # arm -> NITPModel.unpadded_experts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--shape", default="B", choices=sorted(SHAPES))
    parser.add_argument("--window", type=int, default=10, help="steps per window")
    parser.add_argument("--repeats", type=int, default=3, help="windows per arm")
    parser.add_argument("--ds-config", default="ds_configs/zero3_moe.json")
    parser.add_argument("--out-dir", default="/tmp/nitp-bench-expert-padding")
    args = parser.parse_args()
    ensure_dist_env()
    sets = {**SHAPES[args.shape], "data.path": args.data, "train.out_dir": args.out_dir, "train.steps": 10**6,
            "checkpoint.every": 0, "logging.tensorboard": False, "optim.lr": 1e-4, "schedule.warmup_steps": 0}
    cfg = load_config("recipes/qwen3_moe_small.yaml", [f"{k}={v}" for k, v in sets.items()])
    trainer = Trainer(cfg, args.ds_config, force=True)
    trainer.build()
    model = trainer.engine.module
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len * cfg.train.grad_accum

    batch = trainer.batch_to_device(next(trainer.loader))
    losses = {}
    with torch.no_grad():
        for arm, in_place in ARMS.items():
            model.unpadded_experts = in_place
            parts = trainer.engine(batch["input_ids"], batch["labels"])[1]
            losses[arm] = {k: float(v) for k, v in parts.items() if k.startswith("loss/")}
    print(json.dumps({"same_batch_losses": losses}), flush=True)
    gc.disable()  # as in `nitp train`'s loop (train.gc_every)

    def window(steps: int) -> float:
        gc.collect(0)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        sync()
        return steps * tokens / (time.perf_counter() - start)

    for arm, in_place in ARMS.items():  # compiles each arm's layers and warms up
        model.unpadded_experts = in_place
        window(4)
    results: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for _ in range(args.repeats):
        for arm, in_place in ARMS.items():
            model.unpadded_experts = in_place
            results[arm].append(window(args.window))
            print(f"{arm:<9} {results[arm][-1]:,.0f} tokens/s", flush=True)
    summary = {arm: {"median": round(statistics.median(v)), "min": round(min(v)), "max": round(max(v))}
               for arm, v in results.items()}
    ratios = [b / a for a, b in zip(results["padded"], results["in-place"])]
    print(json.dumps({"shape": args.shape, "window": args.window, **summary,
                      "in-place/padded": {"median": round(statistics.median(ratios), 3),
                                          "min": round(min(ratios), 3), "max": round(max(ratios), 3)}}))


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
