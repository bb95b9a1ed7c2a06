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

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _windows import build_trainer, parse_args, spread, window  # noqa: E402

ARMS = {"padded": False, "in-place": True}  # arm -> NITPModel.unpadded_experts


def main() -> None:
    args = parse_args(shape="B", out_dir="/tmp/nitp-bench-expert-padding")
    trainer = build_trainer(args)
    model = trainer.engine.module

    batch = trainer.batch_to_device(next(trainer.loader))
    losses = {}
    with torch.no_grad():
        for arm, in_place in ARMS.items():
            model.unpadded_experts = in_place
            parts = trainer.engine(batch["input_ids"], batch["labels"])[1]
            losses[arm] = {k: float(v) for k, v in parts.items() if k.startswith("loss/")}
    print(json.dumps({"same_batch_losses": losses}), flush=True)

    for arm, in_place in ARMS.items():  # compiles each arm's layers and warms up
        model.unpadded_experts = in_place
        window(trainer, 4)
    results: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for _ in range(args.repeats):
        for arm, in_place in ARMS.items():
            model.unpadded_experts = in_place
            results[arm].append(window(trainer, args.window))
            print(f"{arm:<9} {results[arm][-1]:,.0f} tokens/s", flush=True)
    ratios = [b / a for a, b in zip(results["padded"], results["in-place"])]
    print(json.dumps({"shape": args.shape, "window": args.window, **{arm: spread(v) for arm, v in results.items()},
                      "in-place/padded": spread(ratios, 3)}))


if __name__ == "__main__":
    main()
