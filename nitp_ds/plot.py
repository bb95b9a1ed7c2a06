"""`nitp plot`: PNG curves from the `metrics.jsonl` of one or more runs, overlaid.

Each run directory holds `metrics.jsonl`, one JSON object per line with a "step", a "kind"
("train" or "eval") and any of the keys in FIGURES. One PNG is written per figure that at least
one run has data for; a figure with several keys gets one panel per key. Runs are named after
their directory in the legend. Rendering is headless (matplotlib's Agg backend).

Seeds of one arm: an argument `NAME=RUN[,RUN...]` (each RUN may be a glob, e.g. `ntp=study/ntp/seed*`)
is one curve per panel, the mean over its runs at the steps they all logged, inside a band: their
minimum and maximum (`band="minmax"`) or the mean ± one standard deviation over runs (`band="std"`).
"""

from __future__ import annotations

import glob
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nitp_ds.errors import NITPError

METRICS_FILE = "metrics.jsonl"
BANDS = ("minmax", "std")


@dataclass(frozen=True)
class Figure:
    name: str  # the PNG's file name, without .png
    title: str
    keys: tuple[str, ...]  # one panel per key
    kind: str  # which records feed it: "train" or "eval" (records without a kind feed both)
    log_y: bool = False


FIGURES = (
    Figure("loss_ntp", "next-token loss (train)", ("loss/ntp",), "train"),
    Figure("loss_nitp", "NITP loss (train)", ("loss/nitp",), "train"),
    Figure("loss_aux", "router load-balancing loss (train)", ("loss/aux",), "train"),
    Figure("loss_z", "router z-loss (train)", ("loss/z",), "train"),
    Figure("loss_total", "total loss (train)", ("loss/total",), "train"),
    Figure("lr", "learning rate", ("lr",), "train"),
    Figure("grad_norm", "gradient norm (before clipping)", ("grad_norm",), "train", log_y=True),
    Figure("tokens_per_s", "throughput (tokens/s)", ("tokens_per_s",), "train"),
    Figure("mfu", "model FLOPs utilisation (active parameters)", ("mfu",), "train"),
    Figure("expert_load", "expert load", ("moe/max_over_mean", "moe/max_over_mean_max", "moe/dead_experts"),
           "train"),
    Figure("validation", "validation", ("val/loss_ntp", "val/loss_nitp", "val/ppl"), "eval"),
    Figure("geometry", "last-layer geometry", ("geometry/effective_rank", "geometry/anisotropy"), "eval"),
)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, in file order; NITPError naming the file and line if bad."""
    run = Path(run_dir)
    path = run / METRICS_FILE if run.is_dir() or run.suffix != ".jsonl" else run
    if not path.is_file():
        where = f"{run} does not exist" if not run.exists() else f"{run} has no {METRICS_FILE}"
        raise NITPError(f"{where}; pass a run directory written by `nitp train` (its out_dir)")
    records = []
    with path.open() as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise NITPError(f"{path}:{number} is not valid JSON ({exc.msg} column {exc.colno}); fix or delete "
                                "that line (a run killed while writing can leave a truncated last line)") from None
            if not isinstance(record, dict) or "step" not in record:
                raise NITPError(f"{path}:{number} is not a metrics record (a JSON object with a \"step\"); "
                                "fix or delete that line")
            records.append(record)
    if not records:
        raise NITPError(f"{path} is empty: the run has not logged yet; plot it after its first "
                        "logging.every steps")
    return records


def series(records: list[dict[str, Any]], key: str, kind: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key` in records of `kind` (or without a kind); non-numbers are skipped."""
    steps, values = [], []
    for record in records:
        if record.get("kind", kind) != kind:
            continue
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        steps.append(float(record["step"]))
        values.append(float(value))
    return steps, values


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Directory names, with as many parent folders as it takes to tell them apart."""
    resolved = [Path(p).resolve() for p in run_dirs]
    depth = 1
    while True:
        labels = ["/".join(p.parts[-depth:]) for p in resolved]
        if len(set(labels)) == len(labels) or depth >= max(len(p.parts) for p in resolved):
            return labels
        depth += 1


def run_groups(arguments: list[str | Path]) -> list[tuple[str | None, list[Path]]]:
    """(name, runs) per argument: a plain run directory is a group of one without a name; `NAME=RUN[,RUN...]`
    names a group of runs, each RUN a path or a glob (sorted matches)."""
    groups: list[tuple[str | None, list[Path]]] = []
    for argument in arguments:
        text = str(argument)
        name, sep, members = text.partition("=")
        if not sep or not name or "/" in name or Path(text).exists():
            groups.append((None, [Path(text)]))
            continue
        runs: list[Path] = []
        for pattern in filter(None, members.split(",")):
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            if not matches:
                raise NITPError(f"'{pattern}' in '{text}' matches no run directory; check the pattern "
                                "(NAME=RUN[,RUN...], quoted so the shell leaves the glob alone)")
            runs += [Path(m) for m in matches]
        if not runs:
            raise NITPError(f"'{text}' names no runs; write NAME=RUN[,RUN...], e.g. ntp=runs/ntp/seed*")
        groups.append((name, runs))
    return groups


def band(curves: list[tuple[list[float], list[float]]], kind: str = "minmax"
         ) -> tuple[list[float], list[float], list[float], list[float]]:
    """(steps, mean, low, high) over the runs' curves at the steps every run has (a step logged twice by a
    resumed run counts once, its last value)."""
    tables = [dict(zip(steps, values)) for steps, values in curves]
    common = sorted(set.intersection(*(set(t) for t in tables))) if tables else []
    means, lows, highs = [], [], []
    for step in common:
        values = [t[step] for t in tables]
        mean = statistics.fmean(values)
        if kind == "std":
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            low, high = mean - spread, mean + spread
        else:
            low, high = min(values), max(values)
        means.append(mean)
        lows.append(low)
        highs.append(high)
    return common, means, lows, highs


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path, band_kind: str = "minmax") -> list[Path]:
    """Write one PNG per figure in FIGURES that has data, runs (or groups of runs) overlaid; return their paths."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    if not run_dirs:
        raise NITPError("no run directories given; pass one or more run directories written by `nitp train`")
    if band_kind not in BANDS:
        raise NITPError(f"--band '{band_kind}' is not one of {', '.join(BANDS)}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NITPError(f"--out {out} is a file; pass a directory for the PNGs")
    groups = run_groups(run_dirs)
    data = [[read_metrics(run) for run in runs] for _, runs in groups]
    plain = run_labels([runs[0] for _, runs in groups])
    labels = [label if name is None else f"{name} (n={len(runs)})"
              for (name, runs), label in zip(groups, plain)]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NITPError(f"cannot create --out {out} ({exc.strerror}: {exc.filename}); "
                        "pass a writable directory") from None
    every_run = [records for group in data for records in group]
    written = []
    for figure in FIGURES:
        keys = [key for key in figure.keys if any(series(records, key, figure.kind)[0] for records in every_run)]
        if not keys:
            continue
        fig, axes = plt.subplots(len(keys), 1, figsize=(8, 3.2 * len(keys)), sharex=True, squeeze=False)
        for axis, key in zip(axes[:, 0], keys):
            for index, (group, label) in enumerate(zip(data, labels)):
                curves = [series(records, key, figure.kind) for records in group]
                curves = [c for c in curves if c[0]]
                if not curves:
                    continue
                # a run (or group) keeps its colour in every panel, even where another has no data
                color = f"C{index % 10}"
                if len(group) == 1:
                    steps, values = curves[0]
                else:
                    steps, values, low, high = band(curves, band_kind)
                    axis.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)
                marker = "o" if figure.kind == "eval" or len(steps) < 20 else None
                axis.plot(steps, values, label=label, color=color, marker=marker, markersize=3, linewidth=1.2)
            axis.set_ylabel(key)
            if figure.log_y and _all_positive(every_run, key, figure.kind):
                axis.set_yscale("log")
            axis.grid(True, alpha=0.3)
            axis.legend(fontsize=8)
        axes[-1, 0].set_xlabel("step")
        fig.suptitle(figure.title)
        fig.tight_layout()
        path = out / f"{figure.name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _all_positive(data: list[list[dict[str, Any]]], key: str, kind: str) -> bool:
    values = [v for records in data for v in series(records, key, kind)[1]]
    return bool(values) and all(v > 0 and math.isfinite(v) for v in values)
