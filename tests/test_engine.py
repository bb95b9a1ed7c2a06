"""The engine forms L = L_NTP + λ(step)·L_NITP + α·L_aux + β·L_z, with λ's warm-up read from DeepSpeed's step."""

import json

import pytest
import torch

from nitp_ds.engine import nitp_weight_at
from runs import prepare_data, train


def test_lambda_ramps_linearly_then_stays():
    assert [nitp_weight_at(step, 0.8, 4) for step in range(7)] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 0.8, 0.8])
    assert nitp_weight_at(0, 0.8, 0) == 0.8  # off: the configured λ itself, from the first step


def test_total_loss_uses_the_ramped_lambda_across_a_resume(tmp_path):
    """Step s (1-based) runs after s-1 optimizer steps, so λ = min(1, (s-1)/4); the second run resumes at step 3
    and must continue the ramp from DeepSpeed's restored step count, not restart it."""
    data = prepare_data(tmp_path)
    run = tmp_path / "run"
    sets = {"nitp.weight_warmup_steps": 4, "moe.aux_loss_weight": 0.01, "moe.z_loss_weight": 0.0}
    first = train(data, run, **sets, **{"train.steps": 3, "checkpoint.every": 3})
    assert first.returncode == 0, first.stderr[-3000:]
    second = train(data, run, **sets, **{"train.steps": 6, "checkpoint.every": 3})
    assert second.returncode == 0, second.stderr[-3000:]
    logged = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("kind") == "train"]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    for record in logged:
        lam = min(1.0, (record["step"] - 1) / 4)
        expected = record["loss/ntp"] + lam * record["loss/nitp"] + 0.01 * record["loss/aux"]
        assert record["loss/total"] == pytest.approx(expected, rel=1e-6), record["step"]
        assert record["loss/nitp"] > 0.01  # λ·L_NITP is not trivially zero: the ramp is visible in the total
    # the checkpoint records the NITP settings, for `nitp eval` to score the NITP loss as trained
    meta = json.loads((run / "checkpoints" / "global_step6" / "nitp_meta.json").read_text())
    assert {k: meta["nitp"][k] for k in ("loss", "offset", "stop_grad", "weight_warmup_steps")} == {
        "loss": "cosine", "offset": 1, "stop_grad": True, "weight_warmup_steps": 4}


def test_defragment_on_device_matches_deepspeeds_flat_buffer():
    from deepspeed.runtime.zero.utils import defragment

    from nitp_ds.engine import defragment_on_device

    def partitions():
        g = torch.Generator().manual_seed(0)
        return [torch.randn(n, generator=g).to(torch.bfloat16) for n in (7, 1, 300, 64)]

    ours, theirs = partitions(), partitions()
    flat, expected = defragment_on_device(ours), defragment(theirs)
    assert torch.equal(flat, expected) and flat.dtype == torch.bfloat16
    offset = 0
    for a, b in zip(ours, theirs):  # every partition now a view of the flat buffer, where DeepSpeed puts it
        assert a.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
        assert a.storage_offset() == offset and torch.equal(a, b)
        offset += a.numel()
    assert offset == flat.numel()
