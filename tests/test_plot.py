"""`plot_runs` writes readable PNGs for overlaid runs and refuses bad metrics files clearly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from nitp_ds.errors import NITPError
from nitp_ds.plot import band, plot_runs, read_metrics, run_groups, run_labels

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir, nitp: bool, geometry: bool):
    run_dir.mkdir(parents=True)
    lines = []
    for step in range(10, 210, 10):
        record = {"kind": "train", "step": step, "loss/ntp": 5.0 / math.log(step), "loss/aux": 1.01,
                  "loss/z": 0.0, "loss/total": 5.0 / math.log(step), "lr": 3e-4 * min(1.0, step / 50),
                  "grad_norm": 1.0 / step, "tokens_per_s": 1000.0 + step, "mfu": 0.3,
                  "moe/max_over_mean": 1.5, "moe/dead_experts": 0.0}
        if nitp:
            record["loss/nitp"] = 0.25 * math.exp(-step / 100)
        lines.append(json.dumps(record))
        if step % 50 == 0:
            evaluation = {"kind": "eval", "step": step, "val/loss_ntp": 4.0, "val/ppl": math.exp(4.0)}
            if nitp:
                evaluation["val/loss_nitp"] = 0.1
            if geometry:
                evaluation["geometry/effective_rank"] = 60.0 - step / 10
                evaluation["geometry/anisotropy"] = 0.35
            lines.append(json.dumps(evaluation))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_two_runs_overlaid_give_readable_pngs_and_skip_missing_metrics(tmp_path):
    import matplotlib.image

    write_run(tmp_path / "ntp", nitp=False, geometry=False)
    write_run(tmp_path / "nitp", nitp=True, geometry=True)
    written = plot_runs([tmp_path / "ntp", tmp_path / "nitp"], tmp_path / "plots")
    names = {p.stem for p in written}
    assert {"loss_ntp", "loss_nitp", "loss_aux", "loss_total", "lr", "tokens_per_s", "mfu", "expert_load",
            "validation", "geometry"} <= names
    for path in written:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 100 and image.shape[1] > 100

    write_run(tmp_path / "bare", nitp=False, geometry=False)
    only_ntp = {p.stem for p in plot_runs([tmp_path / "bare"], tmp_path / "bare_plots")}
    assert "loss_nitp" not in only_ntp and "geometry" not in only_ntp
    assert "loss_ntp" in only_ntp


def test_runs_with_the_same_name_are_told_apart_in_the_legend(tmp_path):
    assert run_labels([tmp_path / "a" / "run", tmp_path / "b" / "run"]) == ["a/run", "b/run"]
    assert run_labels([tmp_path / "x", tmp_path / "y"]) == ["x", "y"]


def test_missing_empty_and_malformed_metrics_name_the_file_line_and_fix(tmp_path):
    with pytest.raises(NITPError, match="has no metrics.jsonl; pass a run directory"):
        read_metrics(tmp_path)
    with pytest.raises(NITPError, match="does not exist"):
        plot_runs([tmp_path / "nowhere"], tmp_path / "plots")
    (tmp_path / "metrics.jsonl").write_text("\n")
    with pytest.raises(NITPError, match="metrics.jsonl is empty"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss/ntp": 2.0}\n{"step": 2, "loss/n\n')
    with pytest.raises(NITPError, match=r"metrics.jsonl:2 is not valid JSON.*fix or delete that line"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"loss/ntp": 2.0}\n')
    with pytest.raises(NITPError, match=r"metrics.jsonl:1 is not a metrics record"):
        read_metrics(tmp_path)
    with pytest.raises(NITPError, match="no run directories"):
        plot_runs([], tmp_path / "plots")


def test_band_is_the_mean_and_spread_over_runs_at_their_common_steps():
    curves = [([10, 20, 30], [1.0, 2.0, 3.0]), ([10, 20, 30], [3.0, 2.0, 5.0]), ([10, 20], [2.0, 5.0])]
    steps, mean, low, high = band(curves)
    assert steps == [10, 20]
    assert mean == pytest.approx([2.0, 3.0]) and low == [1.0, 2.0] and high == [3.0, 5.0]
    steps, mean, low, high = band(curves, "std")
    # sample standard deviation by hand: step 10 values 1, 3, 2 -> 1.0; step 20 values 2, 2, 5 -> sqrt(3)
    assert low == pytest.approx([1.0, 3.0 - math.sqrt(3)]) and high == pytest.approx([3.0, 3.0 + math.sqrt(3)])
    # a resumed run that logged a step twice counts its last value
    assert band([([10, 10], [9.0, 1.0]), ([10], [3.0])])[1] == [2.0]


def test_seeds_of_an_arm_are_one_group_with_a_band(tmp_path, monkeypatch):
    import matplotlib.image

    for seed in range(3):
        write_run(tmp_path / "ntp" / f"seed{seed}", nitp=False, geometry=False)
        write_run(tmp_path / "nitp" / f"seed{seed}", nitp=True, geometry=True)
    monkeypatch.chdir(tmp_path)
    groups = run_groups(["ntp=ntp/seed*", "nitp=nitp/seed0,nitp/seed2", "nitp/seed1"])
    assert groups == [("ntp", [Path("ntp/seed0"), Path("ntp/seed1"), Path("ntp/seed2")]),
                      ("nitp", [Path("nitp/seed0"), Path("nitp/seed2")]), (None, [Path("nitp/seed1")])]
    written = plot_runs(["ntp=ntp/seed*", "nitp=nitp/seed*"], tmp_path / "plots", band_kind="std")
    assert {"loss_ntp", "loss_nitp", "validation", "geometry"} <= {p.stem for p in written}
    for path in written:
        assert matplotlib.image.imread(path).shape[0] > 100
    with pytest.raises(NITPError, match="'ablation/seed\\*' in 'x=ablation/seed\\*' matches no run directory"):
        run_groups(["x=ablation/seed*"])
    with pytest.raises(NITPError, match="--band 'iqr' is not one of minmax, std"):
        plot_runs(["ntp=ntp/seed*"], tmp_path / "p", band_kind="iqr")
