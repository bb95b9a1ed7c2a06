"""ZeRO-Offload with the toolkit (nitp_ds/offload.py): the bundled ds_configs/zero3_moe_offload.json trains on
2 CPU ranks with ZeRO-3 + AutoEP, its optimizer and parameters offloaded, and resumes to the same losses; the
streamlined ZeRO-3 step says in one line that it is off. The refusals (NVMe, a missing cpu_adam op) are rows
of tests/test_bad_inputs.py."""

from __future__ import annotations

import json
import shutil

import pytest

import runs
from nitp_ds.config import load_config
from nitp_ds.errors import NITPError
from nitp_ds.offload import check_offload, fast_zero_step_notice, offload_devices, uses_cpu_adam

BUNDLED = json.loads((runs.REPO / "ds_configs" / "zero3_moe_offload.json").read_text())


def test_the_bundled_config_offloads_optimizer_and_parameters_to_cpu_adam():
    assert offload_devices(BUNDLED) == ("cpu", "cpu")
    assert uses_cpu_adam(BUNDLED)  # DeepSpeed's default: the fast compiled CPU AdamW
    assert not uses_cpu_adam({**BUNDLED, "zero_force_ds_cpu_optimizer": False})
    assert offload_devices({"zero_optimization": {"offload_param": {"device": "none"}}}) == (None, None)


def test_fast_zero_step_notice_only_where_deepspeeds_offloaded_step_runs():
    on, off = load_config(), load_config(None, ["train.fast_zero_step=false"])
    assert "train.fast_zero_step does not apply with offload_optimizer" in fast_zero_step_notice(on, BUNDLED)
    assert fast_zero_step_notice(off, BUNDLED) is None
    assert fast_zero_step_notice(on, {"zero_optimization": {"stage": 3}}) is None


def test_offload_outside_zero3_is_refused():
    with pytest.raises(NITPError, match=r"offloads with zero_optimization.stage 2; .*set \"stage\": 3"):
        check_offload({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}})


@pytest.fixture(scope="module")
def offloaded(tmp_path_factory):
    """The bundled offload config with torch's AdamW as the CPU step (no compiled op on a bare CI machine)."""
    tmp = tmp_path_factory.mktemp("offload")
    ds = tmp / "offload.json"
    ds.write_text(json.dumps({**BUNDLED, "zero_force_ds_cpu_optimizer": False}))
    data = runs.prepare_data(tmp)
    run_dir = tmp / "run"
    result = runs.train(data, run_dir, nproc=2, ds_config=ds)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return data, ds, run_dir, result


def test_offloaded_run_trains_on_two_ranks_and_says_fast_zero_step_is_off(offloaded):
    data, ds, run_dir, result = offloaded
    assert result.stdout.count("notice: train.fast_zero_step does not apply with offload_optimizer") == 1
    curve = runs.curve(run_dir)
    assert [step for step, *_ in curve] == [1, 2, 3, 4, 5, 6]
    assert curve[-1][2] < curve[0][2]  # the next-token loss falls
    tag = run_dir / "checkpoints" / "global_step6"
    assert len(list(tag.glob("*optim_states.pt"))) == 2  # the offloaded optimizer is checkpointed per rank
    assert json.loads((run_dir / "ds_config.json").read_text())["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_offloaded_run_resumes_to_the_same_losses(offloaded, tmp_path):
    data, ds, reference, _ = offloaded
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "global_step6")
    (run_dir / "checkpoints" / "latest").write_text("global_step3")
    result = runs.train(data, run_dir, nproc=2, ds_config=ds)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resumed from" in result.stdout and "global_step3" in result.stdout
    assert runs.curve(run_dir) == runs.curve(reference)  # bitwise: weights, moments, schedule and data position
