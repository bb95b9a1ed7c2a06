"""Partitioned construction (nitp_ds/models/partitioned.py) and the partitioned pretrained load, on 2 CPU ranks.

- Every family (and tied embeddings) built under zero.Init has, bit for bit, the weights of an ordinary whole
  build with the same seed, the NITP head included; so does every pretrained layout streamed into the
  partitions (per-expert tensors as save_pretrained writes them, sharded; the model's own fused names;
  Mixtral's block_sparse_moe w1/w2/w3) against transformers' own `from_pretrained`.
- A rank's resident memory at the end of the build is its half of the weights plus a constant: at most 0.6x
  the 1-process figure, and the peak at most the half plus two copies of the largest module and a constant.
- Through `nitp train`: the first step's losses equal those of the unpartitioned model on the same batches,
  at 1 and 2 ranks, with AutoEP and without.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import runs

FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v2", "deepseek_v3"]
INIT_CASES = [f"init/{family}" for family in FAMILIES] + ["init/qwen3_moe/tied"]
NO_AUTOEP = runs.REPO / "ds_configs" / "zero3_moe_1gpu.json"  # ZeRO-3 with the model's own experts


def launch(script: str, *args: str, nproc: int, timeout: float = 400) -> str:
    """stdout of a tests/scripts/ script run on nproc CPU ranks through the deepspeed launcher (on a free port,
    its shared-memory buffers removed afterwards, as `nitp train` does)."""
    from nitp_ds.distributed import free_port, remove_shm_buffers

    path = str(runs.REPO / "tests" / "scripts" / script)
    port = free_port()
    command = ["deepspeed", "--num_gpus", str(nproc), "--master_port", str(port), "--no_local_rank", path, *args]
    if nproc == 1:
        command = [sys.executable, path, *args]
    try:
        result = subprocess.run(command, env=runs.child_env(), cwd=runs.REPO, capture_output=True, text=True,
                                timeout=timeout)
    finally:
        remove_shm_buffers(port)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def tiny(family: str, **extra):
    import torch

    from nitp_ds.config import ModelConfig
    from nitp_ds.models import build_model

    torch.manual_seed(11)
    shape = ModelConfig(family=family, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4,
                        experts_per_token=2, moe_intermediate_size=16, intermediate_size=48, max_seq_len=64,
                        init_std=0.2, **extra)
    return build_model(shape, 100)


def save_in_own_names(model, directory):
    """The model's own state_dict names (fused experts), one file: what transformers 5 checkpoints may hold."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    model.config.save_pretrained(directory)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    return directory


def save_mixtral_original(model, directory):
    """Mixtral as its original checkpoints name it: block_sparse_moe.experts.N.w1/w3/w2, two shards + index."""
    from safetensors.torch import save_file

    tensors = {}
    for key, value in model.state_dict().items():
        key = key.replace(".mlp.", ".block_sparse_moe.")
        if key.endswith("experts.gate_up_proj"):
            half = value.shape[1] // 2
            for e in range(value.shape[0]):
                tensors[key.replace("gate_up_proj", f"{e}.w1.weight")] = value[e, :half].clone()
                tensors[key.replace("gate_up_proj", f"{e}.w3.weight")] = value[e, half:].clone()
        elif key.endswith("experts.down_proj"):
            for e in range(value.shape[0]):
                tensors[key.replace("down_proj", f"{e}.w2.weight")] = value[e].clone()
        else:
            tensors[key] = value.contiguous()
    directory.mkdir(parents=True)
    model.config.save_pretrained(directory)
    keys = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


@pytest.fixture(scope="module")
def pretrained_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    dirs = {}
    for family, extra in (("qwen3_moe", {"tie_embeddings": True}), ("deepseek_v3", {})):
        model = tiny(family, **extra)
        model.save_pretrained(root / family, max_shard_size="20KB")  # transformers 5 writes per-expert tensors
        dirs[f"{family}-save_pretrained-sharded"] = root / family
    dirs["qwen2_moe-own-names"] = save_in_own_names(tiny("qwen2_moe"), root / "qwen2_moe")
    dirs["mixtral-original-names"] = save_mixtral_original(tiny("mixtral"), root / "mixtral")
    return dirs


@pytest.fixture(scope="module")
def compared_on_2_ranks(pretrained_dirs):
    out = launch("partitioned_weights.py", str(runs.DS_CONFIG), *map(str, pretrained_dirs.values()), nproc=2)
    results = json.loads(out.split("RESULTS ", 1)[1].splitlines()[0])
    assert results["world_size"] == 2
    return results["cases"]


@pytest.mark.parametrize("case", INIT_CASES)
def test_partitioned_build_has_the_weights_of_an_ordinary_build(compared_on_2_ranks, case):
    assert compared_on_2_ranks[case] == []


@pytest.mark.parametrize("layout", ["qwen3_moe-save_pretrained-sharded", "deepseek_v3-save_pretrained-sharded",
                                    "qwen2_moe-own-names", "mixtral-original-names"])
def test_pretrained_load_into_partitions_equals_from_pretrained(compared_on_2_ranks, pretrained_dirs, layout):
    assert compared_on_2_ranks[f"pretrained/{pretrained_dirs[layout]}"] == []


def test_pretrained_layouts_are_what_they_claim(pretrained_dirs):
    # The comparison above is only worth something if the layouts really differ from the model's names.
    from nitp_ds.models.pretrained import read_checkpoint_index

    keys = {name: set(read_checkpoint_index(d)) for name, d in pretrained_dirs.items()}
    assert any(".experts.0.gate_proj.weight" in k for k in keys["qwen3_moe-save_pretrained-sharded"])
    assert "lm_head.weight" not in keys["qwen3_moe-save_pretrained-sharded"]  # tied: stored once
    assert len({info.file for info in read_checkpoint_index(pretrained_dirs["qwen3_moe-save_pretrained-sharded"])
                .values()}) > 2
    assert "model.layers.0.mlp.experts.gate_up_proj" in keys["qwen2_moe-own-names"]
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in keys["mixtral-original-names"]


# -- memory ------------------------------------------------------------------------------------------------

# Parameters dominate the fixed costs: 215M parameters (820 MB in fp32); the largest module, one layer's
# experts, 12.6M (48 MB). While one module is gathered, DeepSpeed's all-gather on CPU (gloo) holds up to two
# copies of it.
MEMORY_SHAPE = ["model.hidden_size=512", "model.num_layers=16", "model.num_heads=8", "model.num_kv_heads=2",
                "model.num_experts=16", "model.moe_intermediate_size=512", "model.intermediate_size=1024",
                "nitp.head=none"]
EXPERTS_MB = 16 * 3 * 512 * 512 * 4 / 2**20
CONSTANT_MB = 64


def build_figures(nproc: int) -> dict:
    out = launch("build_memory.py", "partitioned-build", str(runs.DS_CONFIG), "model.vocab_size=4096", *MEMORY_SHAPE,
                 nproc=nproc)
    return json.loads(out.split("FIGURES ", 1)[1].splitlines()[0])


def test_each_rank_holds_its_share_of_the_model_at_the_end_of_the_build():
    one, two = build_figures(1), build_figures(2)
    print(json.dumps({"1 rank": one["ranks"], "2 ranks": two["ranks"]}))  # the figures, with pytest -s
    weights = one["fp32_weights_mb"]
    alone = one["build_end_mb"] - one["before_mb"]
    assert alone >= weights  # one process holds every weight
    for rank in two["ranks"]:
        held = rank["build_end_mb"] - rank["before_mb"]
        assert held <= 0.6 * alone, (held, alone)
        assert held <= weights / 2 + CONSTANT_MB, (held, weights)
        assert rank["build_peak_mb"] - rank["before_mb"] <= weights / 2 + 2 * EXPERTS_MB + CONSTANT_MB, rank


# -- through nitp train: the first step ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return runs.prepare_data(tmp_path_factory.mktemp("partitioned-data"))


def unpartitioned_first_step(data, nproc: int) -> dict[str, float]:
    """The losses of step 1 computed by the whole model, built as before (seed, from_config, NITPModel), on the
    first micro-batch of each of nproc ranks, averaged as the trainer logs them."""
    import torch

    from nitp_ds.build import seed_everything
    from nitp_ds.config import load_config
    from nitp_ds.data.dataset import TokenLoader, open_data
    from nitp_ds.models import build_model
    from nitp_ds.nitp import NITPModel
    from nitp_ds.resolve import resolve_target_layer

    overrides = [f"{k}={v}" for k, v in {**runs.TINY, "data.path": data}.items()]
    cfg = load_config(runs.REPO / "recipes" / "debug.yaml", overrides)
    opened = open_data(data)
    seed_everything(cfg.train.seed)
    lm = build_model(cfg.model, opened.vocab_size)
    model = NITPModel(lm, head=cfg.nitp.head, head_mult=cfg.nitp.head_mult,
                      target_layer=resolve_target_layer(cfg, lm.config.num_hidden_layers),
                      ce_chunk_tokens=cfg.train.ce_chunk_tokens)
    totals = {"loss/ntp": 0.0, "loss/nitp": 0.0, "loss/aux": 0.0}
    with torch.no_grad():
        for rank in range(nproc):
            batch = TokenLoader(opened, "train", cfg.data.seq_len, cfg.train.micro_batch_size, dp_rank=rank,
                                dp_world_size=nproc, seed=cfg.train.seed).batch(0)
            parts = model(batch["input_ids"], batch["labels"])
            for key in totals:
                totals[key] += parts[key.split("/")[1]].item() / nproc
    return totals


@pytest.mark.parametrize("nproc, ds_config", [(1, runs.DS_CONFIG), (2, runs.DS_CONFIG), (2, NO_AUTOEP)],
                         ids=["1-rank-autoep", "2-ranks-autoep", "2-ranks-no-autoep"])
def test_first_step_losses_equal_the_unpartitioned_model(data, tmp_path, nproc, ds_config):
    result = runs.train(data, tmp_path / "run", nproc=nproc, ds_config=ds_config,
                        **{"train.steps": 1, "checkpoint.every": 0})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    first = runs.records(tmp_path / "run")[0]
    expected = unpartitioned_first_step(data, nproc)
    for key, value in expected.items():
        assert first[key] == pytest.approx(value, rel=2e-5, abs=1e-6), key


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
def test_initial_draws_come_from_the_device_or_with_on_host_from_the_cpu_generator():
    """A bf16 parameter on the GPU is drawn in float32 by the GPU's generator, or with on_host by the CPU's,
    whose draws are those of an ordinary build on the host; either way it is then rounded into the parameter."""
    import torch

    from nitp_ds.models.partitioned import float32_values

    param = torch.nn.Parameter(torch.zeros(64, 1000, device="cuda", dtype=torch.bfloat16))
    expected = {}
    for on_host, device in ((True, "cpu"), (False, "cuda")):
        torch.manual_seed(5)
        expected[on_host] = torch.empty(64, 1000, device=device).normal_(0, 0.02).to("cuda", torch.bfloat16)
        torch.manual_seed(5)
        with torch.no_grad(), float32_values([param], on_host=on_host):
            assert param.dtype == torch.float32 and param.device.type == device
            param.normal_(0, 0.02)
        assert param.dtype == torch.bfloat16 and torch.equal(param, expected[on_host])
    assert not torch.equal(expected[True], expected[False])
