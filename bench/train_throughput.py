"""Throughput of `nitp train` with NITP on vs off (λ = 0, no head), in one process on one device.

Usage: python bench/train_throughput.py --recipe recipes/qwen3_moe_small.yaml --data DIR [--steps 30]
       [--set key=value ...]
Prints tokens/s (median of the logged intervals after the first), step time, MFU and peak memory per
variant, and the NITP overhead in step time. Runs each variant in a fresh child process so that
memory and compilation caches do not leak between them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {"ntp (λ=0, no head)": ["nitp.head=none", "nitp.weight=0"], "nitp (λ=1, swiglu)": []}


def run_one(args, extra: list[str], out_dir: Path) -> dict:
    sets = [f"data.path={args.data}", f"train.out_dir={out_dir}", f"train.steps={args.steps}",
            "train.eval_every=0", "checkpoint.every=0", "checkpoint.resume=never", "logging.every=5",
            "logging.tensorboard=false", *args.set, *extra]
    code = ("import sys; from nitp_ds.config import load_config; from nitp_ds.trainer import train; "
            "cfg = load_config(sys.argv[1], sys.argv[3:]); cfg.train.eval_tokens = cfg.data.seq_len; "
            "import nitp_ds.checkpoint.manager as m; m.CheckpointManager.save = lambda self: None; "  # time training, not checkpoint I/O
            "train(cfg, sys.argv[2], force=True)")
    subprocess.run([sys.executable, "-c", code, args.recipe, args.ds_config, *sets], check=True,
                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    records = [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("kind") == "train"][1:]  # the first interval holds warm-up
    tps = statistics.median(r["tokens_per_s"] for r in train)
    return {"tokens_per_s": tps, "mfu": statistics.median(r.get("mfu", float("nan")) for r in train),
            "memory_gib": max(r.get("memory_gib", 0.0) for r in train), "loss": train[-1]["loss/ntp"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--ds-config", default="ds_configs/zero3_moe.json")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, extra) in enumerate(VARIANTS.items()):
            results[name] = run_one(args, extra, Path(tmp) / f"run{i}")
    base, nitp = results["ntp (λ=0, no head)"], results["nitp (λ=1, swiglu)"]
    print(f"\n{'variant':<22}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}{'last ntp':>10}")
    for name, r in results.items():
        print(f"{name:<22}{r['tokens_per_s']:>12,.0f}{100 * r['mfu']:>7.1f}%{r['memory_gib']:>10.1f}{r['loss']:>10.3f}")
    print(f"NITP overhead in step time: {100 * (base['tokens_per_s'] / nitp['tokens_per_s'] - 1):+.1f}%")


if __name__ == "__main__":
    main()
