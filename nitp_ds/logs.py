"""Where metrics go: the console (rich), `metrics.jsonl`, TensorBoard and Weights & Biases — on global
rank 0 only.

W&B (`logging.wandb.project` set; the optional extra `nitp-ds[wandb]`) gets every numeric key of each
metrics.jsonl record, `step` included and declared as the x axis of all the others. The W&B run id is
kept in the run directory (WANDB_RUN); a run resumed from a checkpoint continues that W&B run
(resume="allow"), and a fresh start (step 0, `--force`) begins a new one. Steps between the checkpoint
and where the interrupted run had got to are logged again: W&B keeps both (charts against `step`
overlay them), as metrics.jsonl keeps only the new. If W&B cannot start (no network in online mode,
say), training goes on without it after one warning line.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from rich.console import Console

WANDB_RUN = "wandb_run.json"


class MetricsLogger:
    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, resume_step: int = 0,
                 wandb_config=None, run_config: dict[str, Any] | None = None):
        self.enabled = enabled
        self.console = Console(highlight=False)
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        self.wandb_run = None
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
        if wandb_config is not None and wandb_config.project is not None and wandb_config.mode != "disabled":
            self.wandb_run = self._start_wandb(run_dir, wandb_config, resume_step, run_config or {})

    def _start_wandb(self, run_dir: Path, settings, resume_step: int, run_config: dict[str, Any]):
        saved = run_dir / WANDB_RUN
        previous = json.loads(saved.read_text()) if saved.exists() else {}
        resuming = resume_step > 0 and previous.get("project") == settings.project
        run_id = previous["id"] if resuming else None  # None: W&B makes a new one
        try:
            import wandb  # present: the config's validation checked; a broken install lands below

            run = wandb.init(project=settings.project, name=settings.name or run_dir.resolve().name,
                             mode=settings.mode, id=run_id, resume="allow", config=run_config,
                             dir=os.environ.get("WANDB_DIR", str(run_dir)))
        except Exception as exc:  # W&B's own errors (CommError, UsageError, ...): training goes on without it
            self.console.print(f"warning: Weights & Biases did not start ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}); logging to metrics.jsonl only",
                               markup=False)
            return None
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
        tmp = saved.with_suffix(".tmp")
        tmp.write_text(json.dumps({"id": run.id, "project": settings.project}) + "\n")
        os.replace(tmp, saved)
        return run

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
        if self.wandb_run is not None:
            self.wandb_run.log({key: value for key, value in record.items()
                                if isinstance(value, (int, float)) and not isinstance(value, bool)})

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


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
