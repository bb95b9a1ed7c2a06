"""Child of bench/gpu_compare.py: one `nitp train` run in this process, optionally profiled.

argv: RECIPE DS_CONFIG KEY=VALUE...; NITP_BENCH_PROFILE=PATH profiles 3 steps after the 8th and writes
the top operators (CUDA time) to PATH. Checkpoint saves, the final one included, are disabled: this times
training, not I/O (a checkpoint of shape B is 35 GiB).
"""

import gc
import os
import sys

gc.disable()  # as `nitp train` does before its imports (nitp_ds.trainer.train turns it on for the loop)
import torch

from nitp_ds import trainer as t
from nitp_ds.config import load_config

cfg = load_config(sys.argv[1], sys.argv[3:])
cfg.train.eval_tokens = cfg.data.seq_len
from nitp_ds.checkpoint.manager import CheckpointManager

CheckpointManager.maybe_save = lambda self, *args, **kwargs: None
profile_path = os.environ.get("NITP_BENCH_PROFILE")
if profile_path:
    step_fn = t.Trainer.train_step
    state = {"n": 0, "prof": None}

    def profiled_step(self):
        state["n"] += 1
        if state["n"] == 9:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            state["prof"] = torch.profiler.profile(activities=activities)
            state["prof"].__enter__()
        out = step_fn(self)
        if state["n"] == 11 and state["prof"] is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            prof = state["prof"]
            prof.__exit__(None, None, None)
            with open(profile_path, "w") as f:
                f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70))
                f.write("\n\n")
                f.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=60, max_name_column_width=70))
                f.write("\n\n")
                f.write(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=70))
                f.write("\n\n")
                f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))
            state["prof"] = None
        return out

    t.Trainer.train_step = profiled_step
t.train(cfg, sys.argv[2], force=True)
