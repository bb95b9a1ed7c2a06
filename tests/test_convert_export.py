"""Checkpoint conversion and export, proven by numbers against the live training model.

Every multi-process run goes through `run_tiny` (the `deepspeed` launcher on CPU with gloo) and
`tests/helpers/train_tiny.py`, which trains a tiny model under ZeRO-3 + AutoEP, saves a checkpoint like
the trainer (plus nitp_meta.json) and stores the logits of a fixed batch computed by the engine.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nitp_ds.checkpoint.convert import convert_checkpoint
from nitp_ds.checkpoint.export import export_checkpoint
from nitp_ds.errors import NITPError

HELPER = Path(__file__).parent / "helpers" / "train_tiny.py"
FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_tiny(run_dir: Path, *args: str, processes: int = 2) -> None:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", str(processes), "--master_port", str(_free_port()), str(HELPER),
           "--run-dir", str(run_dir), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request, tmp_path_factory) -> tuple[str, Path]:
    run_dir = tmp_path_factory.mktemp(f"run_{request.param}")
    run_tiny(run_dir, "--family", request.param, "--steps", "3")
    return request.param, run_dir


def _hf_logits(directory: Path, input_ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids).logits


def test_export_reproduces_training_logits(trained, tmp_path):
    family, run_dir = trained
    result = export_checkpoint(run_dir, tmp_path / "hf", dtype="fp32", verify=True, show_progress=False)
    assert result.max_abs_diff <= 1e-4 and result.step == 3
    reference = torch.load(run_dir / "reference.pt")
    diff = (_hf_logits(result.out, reference["input_ids"]) - reference["logits"]).abs().max().item()
    print(f"{family}: max |exported − training logits| = {diff:.3g}")
    assert diff <= 1e-4
    config = json.loads((result.out / "config.json").read_text())
    assert config["use_cache"] is True and config["output_router_logits"] is False
    assert config["architectures"] and (result.out / "generation_config.json").is_file()
    assert not any("nitp_head" in p.name for p in result.out.iterdir())


def test_bf16_export_verifies_against_fp32(trained, tmp_path):
    family, run_dir = trained
    if family != "qwen3_moe":
        pytest.skip("one family is enough for the bf16 path")
    result = export_checkpoint(run_dir, tmp_path / "hf", dtype="bf16", verify=True, show_progress=False)
    assert result.max_abs_diff == 0.0 and result.max_abs_drift <= result.drift_tolerance
    from safetensors import safe_open

    with safe_open(str(result.out / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())


def test_convert_writes_sharded_index_and_head_apart(trained, tmp_path):
    family, run_dir = trained
    if family != "deepseek_v3":
        pytest.skip("deepseek_v3 has every kind of tensor: dense layer, shared experts, bias buffer")
    result = convert_checkpoint(run_dir / "checkpoints", tmp_path / "st", max_shard_size=100_000,
                                show_progress=False)
    index = json.loads((result.out / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    assert "model.layers.1.mlp.experts.gate_up_proj" in names
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in names
    assert "model.layers.1.mlp.shared_experts.down_proj.weight" in names
    assert "model.layers.0.mlp.gate_proj.weight" in names  # dense first layer
    assert not any(n.startswith(("lm.", "nitp_head")) for n in names)
    from safetensors.torch import load_file

    head = load_file(result.out / "nitp_head.safetensors")
    assert sorted(head) == ["down.weight", "gate.weight", "up.weight"] and head["gate.weight"].shape == (256, 64)
    assert result.peak_rss_mib > 0
    assert not list(tmp_path.glob(".st.tmp-*"))


def test_round_trip_from_hf_is_bit_identical(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from nitp_ds.config import ModelConfig
    from nitp_ds.models import build_hf_config

    m = ModelConfig(family="qwen3_moe", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4,
                    experts_per_token=2, moe_intermediate_size=32, intermediate_size=96, max_seq_len=64)
    torch.manual_seed(7)
    source = AutoModelForCausalLM.from_config(build_hf_config(m, vocab_size=128))
    source.save_pretrained(tmp_path / "source")
    run_tiny(tmp_path / "run", "--family", "qwen3_moe", "--pretrained", str(tmp_path / "source"),
             "--steps", "1", "--lr", "0")
    result = export_checkpoint(tmp_path / "run", tmp_path / "exported", dtype="fp32", show_progress=False)
    before, after = load_file(tmp_path / "source" / "model.safetensors"), load_file(result.out / "model.safetensors")
    assert sorted(before) == sorted(after)
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_universal_checkpoint_resumes_at_one_process(trained, tmp_path):
    family, run_dir = trained
    if family != "qwen3_moe":
        pytest.skip("one family is enough for the universal path")
    univ = convert_checkpoint(run_dir, tmp_path / "univ", to="universal").out
    assert (univ / "latest").read_text() == "global_step3"
    run_tiny(tmp_path / "resumed", "--family", family, "--resume-universal", str(univ / "global_step3"),
             "--result", str(tmp_path / "resumed.pt"), processes=1)
    two, one = torch.load(run_dir / "reference.pt"), torch.load(tmp_path / "resumed.pt")
    assert (one["world"], two["world"]) == (1, 2)
    assert (one["logits"] - two["logits"]).abs().max() <= 1e-5
    assert one["loss_before"] == pytest.approx(two["loss_before"], abs=1e-5)
    # the next step (same global batch, restored Adam state) only differs by reduction order
    assert one["loss_after"] == pytest.approx(two["loss_after"], abs=5e-3)
    assert one["loss_after"] != pytest.approx(one["loss_before"], abs=1e-3)


# -- bad inputs: each one line naming the problem ---------------------------------------------------

@pytest.fixture
def ckpt_copy(trained, tmp_path) -> Path:
    family, run_dir = trained
    if family != "qwen3_moe":
        pytest.skip("bad inputs are family-independent")
    copy = tmp_path / "copy"
    shutil.copytree(run_dir / "checkpoints" / "global_step3", copy)
    return copy


def _error(src, out, **kw) -> str:
    with pytest.raises(NITPError) as info:
        convert_checkpoint(src, out, show_progress=False, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_rejects_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "is not a DeepSpeed checkpoint" in _error(tmp_path / "empty", tmp_path / "o")


def test_rejects_a_truncated_shard(ckpt_copy, tmp_path):
    shard = ckpt_copy / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt is truncated or corrupt" in _error(ckpt_copy, tmp_path / "o")


def test_rejects_a_missing_shard(ckpt_copy, tmp_path):
    (ckpt_copy / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert "missing the optim states of rank(s) [1]" in _error(ckpt_copy, tmp_path / "o")


def test_rejects_files_from_mixed_world_sizes(ckpt_copy, tmp_path):
    for kind in ("model", "optim"):
        shutil.copy(ckpt_copy / f"zero_pp_rank_1_mp_rank_00_{kind}_states.pt",
                    ckpt_copy / f"zero_pp_rank_2_mp_rank_00_{kind}_states.pt")
    assert "mixes files from different world sizes" in _error(ckpt_copy, tmp_path / "o")


def test_rejects_an_unknown_model_family(ckpt_copy, tmp_path):
    meta_path = ckpt_copy / "nitp_meta.json"
    meta = json.loads(meta_path.read_text())
    meta["model_type"] = meta["hf_config"]["model_type"] = "llama"
    meta_path.write_text(json.dumps(meta))
    assert "model family 'llama' is not supported" in _error(ckpt_copy, tmp_path / "o")


def test_refuses_an_existing_output_without_force(ckpt_copy, tmp_path):
    (tmp_path / "o").mkdir()
    assert "already exists" in _error(ckpt_copy, tmp_path / "o")
    with pytest.raises(NITPError, match="already exists"):
        export_checkpoint(ckpt_copy, tmp_path / "o", show_progress=False)
