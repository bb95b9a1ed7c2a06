"""How a `nitp train` step divides on the device: forward + backward, and the optimizer step.

Usage (one device call; DS_ACCELERATOR=cpu and ds_configs/zero3_moe_cpu.json run it on a CPU, host clock for events):
    python bench/step_parts.py --data DIR [--shape B] [--window 10] [--repeats 3] [--baseline TOKENS_PER_S]

One process, one model. Each step of each window records three device events on the compute stream: before
its first batch is copied, before `engine.step()` and after it. The first span is the forward and backward
(batch copy, losses, the gradient hand-off); the second DeepSpeed's step (gradient norm, clipping, AdamW,
the bf16 partition written). The host queues ahead of the device, so the two spans add up to the step.
Prints, per window, tokens/s of the whole step and of the forward + backward alone (what the step would
reach with an optimizer that took no time), and the median and min-max of each, with the host's CPU model
and the GPU. With --baseline (plain HF + DeepSpeed's tokens/s, measured in the same call by
bench/gpu_compare.py) it prints both as ratios to it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _windows import arguments, build_trainer, spread, sync, tokens_per_step, window  # noqa: E402
from gpu_compare import machine  # noqa: E402


def main() -> None:
    parser = arguments(shape="B", out_dir="/tmp/nitp-bench-step-parts")
    parser.add_argument("--baseline", type=float, help="plain HF + DeepSpeed tokens/s on the same shape")
    args = parser.parse_args()
    trainer = build_trainer(args)
    engine, tokens = trainer.engine, tokens_per_step(trainer)
    marks: list[tuple] = []
    step, train_step = engine.step, trainer.train_step

    def event():
        if not torch.cuda.is_available():
            return HostMark()
        mark = torch.cuda.Event(enable_timing=True)
        mark.record()
        return mark

    def timed_step() -> None:  # the last engine.step() of a train_step: the optimizer's
        before = event()
        step()
        marks[-1] = (marks[-1][0], before, event())

    def timed_train_step():
        marks.append((event(), None, None))
        return train_step()

    engine.step, trainer.train_step = timed_step, timed_train_step
    window(trainer, 6)  # compiles and warms up
    whole, passes, update = [], [], []
    for _ in range(args.repeats):
        marks.clear()
        window(trainer, args.window)
        sync()
        stepped = [m for m in marks if m[2] is not None]  # a skipped step (non-finite loss) has no update
        fwd_bwd = sum(start.elapsed_time(before) for start, before, _ in stepped) / len(stepped)
        opt = sum(before.elapsed_time(after) for _, before, after in stepped) / len(stepped)
        whole.append(tokens / (fwd_bwd + opt) * 1e3)
        passes.append(tokens / fwd_bwd * 1e3)
        update.append(opt)
        print(f"step {fwd_bwd + opt:.1f} ms = forward+backward {fwd_bwd:.1f} + optimizer step {opt:.1f}; "
              f"{whole[-1]:,.0f} tokens/s, {passes[-1]:,.0f} without the optimizer step", flush=True)
    result = {"machine": machine(), "shape": args.shape, "window": args.window, "tokens_per_step": tokens,
              "step_tokens_per_s": spread(whole), "forward_backward_tokens_per_s": spread(passes),
              "optimizer_step_ms": spread(update, 2)}
    if args.baseline:
        result["vs_baseline"] = {"step": spread([v / args.baseline for v in whole], 3),
                                 "forward_backward_only": spread([v / args.baseline for v in passes], 3)}
    print(json.dumps(result))


class HostMark:
    """A host clock reading where there is no CUDA device (a CPU runs each op before the next is queued)."""

    def __init__(self) -> None:
        self.at = time.perf_counter()

    def elapsed_time(self, end: HostMark) -> float:
        return (end.at - self.at) * 1e3


if __name__ == "__main__":
    main()
