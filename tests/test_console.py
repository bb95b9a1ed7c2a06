"""A quiet console (nitp_ds/console.py): third-party warnings, log lines and progress bars only under --debug."""

from __future__ import annotations

import json
import subprocess
import sys

import runs

# Runs in a fresh interpreter: what each kind of source shows after `quiet_third_parties`. A warning's module
# is the `__name__` of the code that calls warnings.warn, so running the same call in a namespace named
# after a module is what a warning raised in that module looks like to the filters.
PROBE = r"""
import json, logging, sys, warnings
from nitp_ds.console import quiet_third_parties
quiet_third_parties()
libraries = sys.argv[1] == "import"
if libraries:  # DeepSpeed sets its logger's level when imported; transformers reads the environment then
    import deepspeed.utils.logging
    import transformers
shown = []
warnings.showwarning = lambda message, category, *rest: shown.append(f"{category.__name__}: {message}")
for module in ("torch.distributed.c10d_logger", "deepspeed.runtime.zero.stage3", "transformers.modeling_utils",
               "nitp_ds.trainer", "nitp_ds.data.prepare", "__main__"):
    exec("warnings.warn('from ' + __name__, FutureWarning)", {"__name__": module, "warnings": warnings})
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(f"{record.name} {record.levelname}")
for name in ("DeepSpeed", "transformers"):
    logging.getLogger(name).addHandler(Keep())
logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU")
logging.getLogger("DeepSpeed").error("a real error")
logging.getLogger("transformers").warning("torch_dtype is deprecated")
bars = transformers.utils.logging.is_progress_bar_enabled() if libraries else None
print(json.dumps({"warnings": shown, "records": records, "bars": bars}))
"""


def probe(libraries: str, **env: str) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE, libraries], env=runs.child_env(**env), cwd=runs.REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_third_party_warnings_are_hidden_and_the_projects_own_still_show():
    quiet = probe("import")
    assert quiet["warnings"] == ["FutureWarning: from nitp_ds.trainer", "FutureWarning: from nitp_ds.data.prepare",
                                 "FutureWarning: from __main__"]
    assert quiet["records"] == ["DeepSpeed ERROR"] and quiet["bars"] is False

    loud = probe("no-import", NITP_DEBUG="1")  # what `nitp --debug` sets for itself and the processes it starts
    assert len(loud["warnings"]) == 6 and "FutureWarning: from torch.distributed.c10d_logger" in loud["warnings"]
    assert loud["records"] == ["DeepSpeed WARNING", "DeepSpeed ERROR", "transformers WARNING"]


def test_debug_shows_the_third_party_lines_that_a_normal_run_hides(tmp_path_factory):
    # The normal run's silence is asserted on the runs that other tests make anyway (test_demo: train on 2
    # ranks, export, eval, generate; test_train: `nitp train --nproc 2`); this is the other side.
    data = runs.prepare_data(tmp_path_factory.mktemp("console-data"))
    args = runs.train_args(data, tmp_path_factory.mktemp("console") / "run", nproc=2,
                           **{"train.steps": 1, "checkpoint.every": 0})
    args = [*runs.NITP, "--debug", *args[len(runs.NITP):]]  # `nitp --debug train ...`, through the launcher
    result = subprocess.run(args, env=runs.child_env(), cwd=runs.REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    noise = runs.third_party_noise(result.stdout + result.stderr)
    assert any("[INFO] [launch.py" in line for line in noise)  # the launcher's own log
    assert any("FutureWarning" in line for line in noise)  # torch.distributed on the ranks
    assert any("[WARNING]" in line for line in noise)  # DeepSpeed's logger on the ranks
