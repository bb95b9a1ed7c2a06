"""What reaches the console: nitp-ds's own output, and third-party noise only under `--debug`.

Normal output is rank 0's rich output and the errors. The libraries underneath add their own:
torch's FutureWarnings (`all_gather_into_tensor`, `reduce_scatter_tensor`) and C++ log lines,
DeepSpeed's `[INFO]` / `[WARNING]` records (from the launcher and from every rank), transformers'
and datasets' log records and progress bars ("Loading weights", "Writing model shards"), and a
`print` of DeepSpeed's CPU communication op. `quiet_third_parties` hides them, by where they come
from, never by what they say:

- Python warnings whose module (the one `warnings.warn` attributes them to) is one of THIRD_PARTIES;
  a warning attributed to nitp_ds, or to any module not listed, still shows;
- DeepSpeed's logger below ERROR (a filter: DeepSpeed resets the logger's level when it is imported);
- transformers' and datasets' loggers below ERROR, their progress bars, and torch's C++ log below
  ERROR, through the environment variables those libraries read at import (QUIET_ENV); being in the
  environment, they also reach every process that nitp starts (the launcher's ranks, the demo's run).

The `deepspeed` launcher itself runs with `--log_level error` (launch.py). `NITP_DEBUG` (set by
`nitp --debug`, inherited by the ranks) turns all of this off. Every process that runs the CLI calls
`quiet_third_parties` before any command imports torch.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings

THIRD_PARTIES = ("torch", "torchgen", "functorch", "triton", "deepspeed", "transformers", "datasets",
                 "huggingface_hub", "accelerate", "safetensors", "tokenizers", "tensorboard", "google.protobuf",
                 "pyarrow", "fsspec", "multiprocess", "dill", "wandb")
THIRD_PARTY_MODULES = "(?:" + "|".join(re.escape(name) for name in THIRD_PARTIES) + r")(?:\.|$)"
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DATASETS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' bars follow huggingface_hub's switch
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TORCH_CPP_LOG_LEVEL": "ERROR",
    "WANDB_SILENT": "true",  # W&B's "wandb: ..." lines
}


def debug_enabled() -> bool:
    return bool(os.environ.get("NITP_DEBUG"))


def quiet_third_parties() -> None:
    """Hide third-party warnings, log records below ERROR and progress bars (not under NITP_DEBUG)."""
    if debug_enabled():
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)  # a value the user set is theirs
    warnings.filterwarnings("ignore", module=THIRD_PARTY_MODULES)
    deepspeed_logger = logging.getLogger("DeepSpeed")
    if _errors_only not in deepspeed_logger.filters:
        deepspeed_logger.addFilter(_errors_only)
    if "transformers" in sys.modules:  # imported before the environment was set (in-process callers)
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


@contextlib.contextmanager
def third_party_prints_hidden():
    """Drop what third-party code `print`s inside the block (DeepSpeed announces its CPU comm op so)."""
    if debug_enabled():
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield
