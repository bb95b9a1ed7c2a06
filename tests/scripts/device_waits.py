"""Count DeepSpeed's device synchronizations inside training steps, for each ds_config given.

argv: RECIPE STEPS DS_CONFIG[,DS_CONFIG...] KEY=VALUE...; one process builds a trainer per ds_config and runs
STEPS steps; prints one JSON object: per ds_config, how many times `get_accelerator().synchronize()` ran
inside `Trainer.train_step` (the accelerator's own method, counted and then called).
"""

import json
import sys

from deepspeed.accelerator import get_accelerator

from nitp_ds.config import load_config
from nitp_ds.distributed import ensure_dist_env
from nitp_ds.trainer import Trainer

recipe, steps, ds_paths, *overrides = sys.argv[1:]
ensure_dist_env()
accelerator = get_accelerator()
synchronize = accelerator.synchronize
count = {"inside_step": False, "waits": 0}


def counted(*args, **kwargs):
    count["waits"] += count["inside_step"]
    return synchronize(*args, **kwargs)


accelerator.synchronize = counted
waits = {}
for ds_path in ds_paths.split(","):
    trainer = Trainer(load_config(recipe, overrides), ds_path, force=True)
    trainer.build()
    count["waits"] = 0
    for _ in range(int(steps)):
        count["inside_step"] = True
        result = trainer.train_step()
        count["inside_step"] = False
        assert result.parts is not None
    waits[ds_path] = count["waits"]
    trainer.engine.destroy()
print(json.dumps(waits), flush=True)
