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

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _windows import build_trainer, parse_args, spread, window  # noqa: E402

from nitp_ds import one_rank  # noqa: E402
from nitp_ds.engine import streamline_zero3_step  # noqa: E402


def main() -> None:
    args = parse_args(shape="A", out_dir="/tmp/nitp-bench-one-rank")
    trainer = build_trainer(args, **{"train.fast_zero_step": False})
    zero = trainer.engine.optimizer
    streamline_zero3_step(zero)
    deepspeed_path = zero.reduce_independent_p_g_buckets_and_remove_grads
    one_rank.hand_off_gradients(zero)
    hand_off = zero.reduce_independent_p_g_buckets_and_remove_grads

    window(trainer, 6)  # compiles and warms up
    results: dict[str, list[float]] = {"deepspeed": [], "hand-off": [], "all": []}
    for _ in range(args.repeats):
        for arm, path in (("deepspeed", deepspeed_path), ("hand-off", hand_off)):
            zero.reduce_independent_p_g_buckets_and_remove_grads = path
            results[arm].append(window(trainer, args.window))
            print(f"{arm:<10} {results[arm][-1]:,.0f} tokens/s", flush=True)
    if one_rank.stay_gathered(zero):
        for _ in range(args.repeats):
            results["all"].append(window(trainer, args.window))
            print(f"{'all':<10} {results['all'][-1]:,.0f} tokens/s", flush=True)
    print(json.dumps({"shape": args.shape, "window": args.window,
                      **{arm: spread(v) for arm, v in results.items() if v}}))


if __name__ == "__main__":
    main()
