"""Child of bench/memory.py: one rank of a `nitp train` run, its peak memory measured phase by phase.

argv: RECIPE DS_CONFIG OUT_JSON KEY=VALUE... (NITP_MEMORY_SAVE=0: no save). Runs the trainer's own steps — start-up (process group,
imports), `build` (model, optimizer, DeepSpeed engine), the first `train_step`, `save` — and records for
each phase the peak resident set of this process (VmHWM, reset at the start of each phase through
/proc/self/clear_refs where the kernel allows it, else the peak since start) and the peak device memory
(torch.cuda.max_memory_allocated, reset likewise). Rank 0 writes every rank's records to OUT_JSON.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import torch


def status_kib(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) if match else 0


def reset_peaks() -> bool:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)
        return True
    except OSError:
        return False


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    recipe, ds_path, out_json, *sets = args
    records: dict[str, dict] = {}
    started = time.perf_counter()
    resettable = reset_peaks()

    def phase(name: str) -> None:
        nonlocal started
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        records[name] = {"host_peak_mib": status_kib("VmHWM") / 1024, "host_rss_mib": status_kib("VmRSS") / 1024,
                         "device_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available()
                         else None, "seconds": time.perf_counter() - started}
        reset_peaks()
        started = time.perf_counter()

    from nitp_ds import distributed
    from nitp_ds.config import load_config
    from nitp_ds.trainer import Trainer

    cfg = load_config(recipe, sets)
    distributed.ensure_dist_env()
    distributed.start_process_group()
    trainer = Trainer(cfg, ds_path, force=True)
    trainer.write_run_dir()
    distributed.barrier()
    phase("start")
    trainer.build()
    phase("build")
    trainer.step_or_skip()
    phase("first step")
    trainer.step_or_skip()
    phase("second step")
    if os.environ.get("NITP_MEMORY_SAVE", "1") != "0":  # --find-largest skips the save: its models are big
        trainer.checkpoints.save()
        phase("save")

    import torch.distributed as dist

    everyone = [None] * trainer.world_size
    dist.all_gather_object(everyone, {"rank": trainer.rank, "phases": records, "peaks_reset": resettable})
    if trainer.is_main:
        Path(out_json).write_text(json.dumps(everyone, indent=1))
    distributed.leave_process_group(barrier=True)
    distributed.exit_process(0)


if __name__ == "__main__":
    main()
