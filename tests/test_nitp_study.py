"""bench/nitp_study.py's statistics and report, on hand-made numbers and run directories (no training)."""

import importlib.util
import json
import math
import sys

import pytest

from runs import REPO

spec = importlib.util.spec_from_file_location("nitp_study", REPO / "bench" / "nitp_study.py")
study = importlib.util.module_from_spec(spec)
sys.modules["nitp_study"] = study  # dataclasses look their module up there
spec.loader.exec_module(study)

# Two-sided 95% critical values of Student's t from published tables.
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 10: 2.228, 29: 2.045, 30: 2.042}


@pytest.mark.parametrize("df,expected", T_TABLE.items())
def test_t_quantile_matches_the_published_table(df, expected):
    assert study.t_quantile(df) == pytest.approx(expected, abs=1e-3)


def test_t_distribution_against_its_closed_forms():
    # df 1 is Cauchy: P(|T| <= t) = 2 atan(t) / pi; df 2: t / sqrt(2 + t^2)
    for t in (0.3, 1.0, 4.0):
        assert study.t_two_sided_cdf(t, 1) == pytest.approx(2 * math.atan(t) / math.pi, rel=1e-12)
        assert study.t_two_sided_cdf(t, 2) == pytest.approx(t / math.sqrt(2 + t * t), rel=1e-12)
    assert study.t_quantile(1, 0.90) == pytest.approx(6.314, abs=1e-3)


def test_paired_difference_pairs_by_seed_and_gives_the_t_interval():
    ntp = {0: 3.50, 1: 3.60, 2: 3.40, 3: 3.55}
    nitp = {0: 3.49, 1: 3.58, 2: 3.37}  # seed 3 did not finish: dropped from the pairs
    diff = study.paired_difference(nitp, ntp)
    assert diff["seeds"] == [0, 1, 2] and diff["n"] == 3
    # differences -0.01, -0.02, -0.03: mean -0.02, sd 0.01, half-width t(2) * 0.01 / sqrt(3)
    assert diff["mean"] == pytest.approx(-0.02) and diff["std"] == pytest.approx(0.01)
    half = 4.303 * 0.01 / math.sqrt(3)
    assert diff["low"] == pytest.approx(-0.02 - half, abs=1e-5)
    assert diff["high"] == pytest.approx(-0.02 + half, abs=1e-5)
    # the seeds move both arms by 0.2 nats; unpaired, the spread would swamp a 0.02 effect
    assert study.mean_std(list(ntp.values()))["std"] > 5 * diff["std"]
    one = study.paired_difference({0: 1.0}, {0: 0.5})
    assert one["mean"] == 0.5 and one["low"] is None


def write_run(out, arm, seed, steps, val, rank, nitp_curve=None):
    run = study.run_dir(out, study.Run(arm, seed))
    run.mkdir(parents=True)
    records = [{"kind": "train", "step": s, "loss/ntp": 5.0 - s / 100,
                "loss/nitp": nitp_curve(s) if nitp_curve else 0.0} for s in range(5, steps + 1, 5)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (run / "summary.json").write_text(json.dumps({"status": "finished", "step": steps, "loss/ntp": 4.0}))
    evaluation = {"val/loss_ntp": val, "geometry/effective_rank": rank, "geometry/anisotropy": 0.1,
                  "geometry/layer0/effective_rank": 50.0, "geometry/layer1/effective_rank": rank - 1}
    study.eval_json(out, study.Run(arm, seed), steps).write_text(json.dumps(evaluation))


def test_report_gives_phases_means_and_paired_intervals(tmp_path):
    def curve(s):  # collapse to 0.02 at step 20, a 0.3 plateau at 100, 0.2 at the end
        return 0.02 if s == 20 else (0.3 if s == 100 else 0.2 if s == 200 else 0.25)

    for seed, (ntp_val, nitp_val) in enumerate([(3.50, 3.49), (3.60, 3.58), (3.40, 3.37)]):
        write_run(tmp_path, "ntp", seed, 200, ntp_val, 70.0 + seed)
        write_run(tmp_path, "nitp", seed, 200, nitp_val, 72.0 + seed, curve)
    write_run(tmp_path, "offset0", 0, 100, 3.9, 60.0, curve)  # stopped at step 100 of 200: not counted
    (study.run_dir(tmp_path, study.Run("offset0", 0)) / "summary.json").write_text(
        json.dumps({"status": "preempted", "step": 100}))
    report = study.build_report(tmp_path, ["ntp", "nitp", "offset0"], [0, 1, 2], 200, 50)
    nitp = report["runs"]["nitp"][1]
    assert (nitp["nitp_loss_min_early"], nitp["nitp_loss_max_late"], nitp["nitp_loss_final"]) == (0.02, 0.3, 0.2)
    assert "nitp_loss_final" not in report["runs"]["ntp"][0]  # no head, no phases
    assert report["runs"]["offset0"] == {}
    assert report["summary"]["nitp"]["effective_rank"]["mean"] == pytest.approx(73.0)
    paired = report["paired"]["nitp"]
    assert paired["val_loss_ntp"]["mean"] == pytest.approx(-0.02)
    assert paired["effective_rank"]["mean"] == pytest.approx(2.0) and paired["effective_rank"]["std"] == 0.0
    assert paired["layer1/effective_rank"]["mean"] == pytest.approx(2.0)
    markdown = study.report_markdown(report)
    assert "| val_loss_ntp | 3.5000 ± 0.1000 | 3.4800 ± 0.1054 | — |" in markdown
    assert "| val_loss_ntp | -0.0200 [-0.0448, +0.0048] within noise | — |" in markdown
    assert "| nitp − ntp | effective_rank | +0.0 [+0.0, +0.0] within noise | +2.0 [+2.0, +2.0] |" in markdown
