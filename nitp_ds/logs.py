"""Where metrics go: the console (rich), `metrics.jsonl` and TensorBoard — on global rank 0 only."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console


class MetricsLogger:
    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, resume_step: int = 0):
        self.enabled = enabled
        self.console = Console(highlight=False)
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step or None)
            except ImportError:
                self.console.print("[yellow]tensorboard is not installed; logging to metrics.jsonl only[/]")

    def _truncate_after(self, step: int) -> None:
        """On resume, records past the checkpoint's step are from the lost future: drop them."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self.writer.add_scalar(key, value, record["step"])
            self.writer.flush()

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def format_train_line(record: dict[str, Any], total_steps: int) -> str:
    parts = [f"step {record['step']:>6}/{total_steps}",
             f"loss {record['loss/total']:.4f}",
             f"ntp {record['loss/ntp']:.4f}",
             f"nitp {record['loss/nitp']:.4f}",
             f"aux {record['loss/aux']:.3f}",
             f"lr {record['lr']:.2e}",
             f"gnorm {record.get('grad_norm', float('nan')):.2f}",
             f"{record['tokens_per_s']:,.0f} tok/s"]
    if record.get("mfu") is not None:
        parts.append(f"mfu {100 * record['mfu']:.1f}%")
    if record.get("moe/max_over_mean") is not None:
        parts.append(f"load max/mean {record['moe/max_over_mean']:.2f}")
    return "  ".join(parts)
