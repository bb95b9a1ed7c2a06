"""What the partitioned pretrained load (nitp_ds/models/pretrained.py) refuses, and how.

A directory whose shards are missing, truncated or do not match its index, or whose tensors do not match
its config.json, is refused from the headers alone, before a model is built: through `nitp train`, one
`error:` line, exit 2, nothing written. (Loading itself is proven against from_pretrained and by the loss in
tests/test_models_partitioned.py and tests/test_train_options.py.)
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

import runs
from test_bad_inputs import check_refusal, snapshot


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A sharded Qwen3-MoE directory as save_pretrained writes it (per-expert tensors, an index)."""
    import torch

    from nitp_ds.config import ModelConfig
    from nitp_ds.models import build_model

    torch.manual_seed(3)
    shape = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4, experts_per_token=2,
                        moe_intermediate_size=16, intermediate_size=48, max_seq_len=64)
    directory = tmp_path_factory.mktemp("pretrained") / "good"
    build_model(shape, 400).save_pretrained(directory, max_shard_size="20KB")
    return directory


def index_of(directory):
    return json.loads((directory / "model.safetensors.index.json").read_text())


def broken(good, tmp_path, how: str):
    """A copy of `good` broken in one way."""
    directory = tmp_path / how
    shutil.copytree(good, directory)
    index = index_of(directory)
    shard = directory / sorted(set(index["weight_map"].values()))[1]
    if how == "missing-shard":
        shard.unlink()
    elif how == "truncated-shard":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif how == "index-names-a-tensor-the-shard-lacks":
        key = next(k for k, f in index["weight_map"].items() if f != shard.name)
        index["weight_map"][key] = shard.name
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    elif how == "tensor-missing":
        key = next(k for k in index["weight_map"] if "q_proj" in k)
        del index["weight_map"][key]
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
        from safetensors.torch import load_file, save_file

        path = directory / json.loads((good / "model.safetensors.index.json").read_text())["weight_map"][key]
        tensors = load_file(str(path))
        del tensors[key]
        save_file(tensors, str(path), metadata={"format": "pt"})
    elif how == "config-of-another-shape":
        config = json.loads((directory / "config.json").read_text())
        config["moe_intermediate_size"] = 24
        (directory / "config.json").write_text(json.dumps(config))
    elif how == "no-safetensors":
        for path in directory.glob("model*.safetensors*"):
            path.unlink()
    return directory


CASES = [
    ("missing-shard", ["names 1 shard(s) that are missing", "copy the complete checkpoint"]),
    ("truncated-shard", ["is truncated or not a safetensors file", "copy it again"]),
    ("index-names-a-tensor-the-shard-lacks", ["which does not hold it", "copy the checkpoint again"]),
    ("tensor-missing", ["lacks 1 of the model's tensors", "self_attn.q_proj.weight"]),
    ("config-of-another-shape", ["mlp.experts.", "in the checkpoint but", "that its config.json describes",
                                 "from different models"]),
    ("no-safetensors", ["has no safetensors weights", "save_pretrained"]),
]


@pytest.mark.parametrize("how, keywords", CASES, ids=[case[0] for case in CASES])
def test_a_bad_pretrained_directory_is_refused_from_its_headers(good, tmp_path, how, keywords):
    from nitp_ds.errors import NITPError
    from nitp_ds.models import load_pretrained_config
    from nitp_ds.models.pretrained import check_pretrained_weights

    directory = broken(good, tmp_path, how)
    with pytest.raises(NITPError) as refused:
        check_pretrained_weights(directory, load_pretrained_config(directory))
    message = str(refused.value)
    assert message.startswith(f"model.pretrained {directory}")
    for keyword in keywords:
        assert keyword in message, message


def test_the_good_directory_plans_every_tensor(good):
    # The refusals above are not a plan that refuses everything.
    from nitp_ds.models import load_pretrained_config
    from nitp_ds.models.pretrained import check_pretrained_weights

    plan = check_pretrained_weights(good, load_pretrained_config(good))
    assert plan.unexpected == []
    fused = [load for load in plan.loads if load.converter is not None]
    assert len(fused) == 4  # gate_up_proj and down_proj of 2 layers, each from 4 experts' tensors
    assert all(len(load.sources) in (4, 8) for load in fused)
    assert [load.files[0] for load in plan.loads] == sorted(load.files[0] for load in plan.loads)  # shard by shard


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return runs.prepare_data(tmp_path_factory.mktemp("pretrained-data"))


@pytest.mark.parametrize("how", ["missing-shard", "truncated-shard"])
def test_nitp_train_refuses_a_broken_checkpoint_before_writing_anything(good, data, tmp_path, how):
    directory = broken(good, tmp_path, how)
    before = snapshot(tmp_path)
    args = runs.train_args(data, tmp_path / "run", **{"model.pretrained": directory})
    result = subprocess.run(args, env=runs.child_env(), cwd=runs.REPO, capture_output=True, text=True, timeout=240)
    check_refusal(result.returncode, result.stdout, result.stderr, (f"model.pretrained {directory}",))
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()
