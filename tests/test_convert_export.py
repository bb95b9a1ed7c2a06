"""Checkpoint conversion and export of real `nitp train` runs, proven by numbers.

Every run goes through `tests/runs.py`: a tiny model of each family trained by `nitp train --nproc 2` (ZeRO-3,
the experts split over both ranks by AutoEP). The trainer's last evaluation scores the final weights on the
first validation micro-batch of each rank; the exported and the converted model must give the same losses on
the same rows through `nitp_ds.evaluate`, which needs no DeepSpeed engine. The deepseek_v3 run starts from a
Hugging Face directory and does not move its weights, so its export must also give that directory back bit
for bit.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

import runs
from nitp_ds.checkpoint.convert import convert_checkpoint
from nitp_ds.checkpoint.export import export_checkpoint, verify_export
from nitp_ds.checkpoint.integrity import FILES_KEY, file_record
from nitp_ds.checkpoint.partitions import ZeroCheckpoint
from nitp_ds.checkpoint.state import META, resolve_checkpoint
from nitp_ds.checkpoint.verify import exported_tensor_files
from nitp_ds.errors import NITPError

FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3"]
ROUND_TRIP = "deepseek_v3"  # every kind of tensor: a dense first layer, shared experts, the routing bias buffer
NPROC = 2
# Weights of std 0.2 give logits far from uniform, so one expert's gate and up swapped changes the loss by ~1e-2
# (by ~1e-5 at the default 0.02, too close to LOSS_TOL); lr 1e-2 without warmup trains them 4 steps; checkpoints at
# steps 2 and 4; the balancing loss over both ranks makes the run equal to one rank holding the whole batch.
RUN = {"model.init_std": 0.2, "train.steps": 4, "checkpoint.every": 2, "optim.lr": 1e-2, "schedule.warmup_steps": 0,
       "moe.aux_loss_scope": "global"}
# optim.lr must be > 0: at 1e-30 a step moves no weight (each |w| here is far above 1e-22, where a change of 1e-30
# starts to survive float32 rounding), so every checkpoint holds the pretrained weights bit for bit.
STILL = {"optim.lr": 1e-30, "train.steps": 1}
LOSSES = ("loss/total", "loss/ntp", "loss/nitp", "loss/aux", "loss/z", "grad_norm", "lr", "consumed_tokens")
TOL = dict(rel=2e-6, abs=1e-7)  # float32 sums in another order (ranks, AutoEP shards), as in test_train_options
LOSS_TOL = 1e-5  # AutoEP's grouped experts against the stock Hugging Face modules: the logits differ by < 1e-6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return runs.prepare_data(tmp_path_factory.mktemp("convert-data"))


def save_pretrained_source(directory, family: str):
    """A Hugging Face directory as save_pretrained writes it, in the data's vocabulary, weights of std 0.2 (RUN)."""
    from nitp_ds.config import ModelConfig
    from nitp_ds.models import build_model

    torch.manual_seed(7)
    shape = ModelConfig(family=family, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4,
                        experts_per_token=2, moe_intermediate_size=32, intermediate_size=64, max_seq_len=64,
                        init_std=0.2)
    build_model(shape, vocab_size=400).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request, data, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"run_{family}")
    sets = {**RUN, "model.family": family}
    if family == ROUND_TRIP:
        sets.update(STILL, **{"model.pretrained": save_pretrained_source(root / "source", family)})
    result = runs.train(data, root / "run", nproc=NPROC, **sets)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return family, root / "run"


def final_eval(run_dir) -> dict:
    """The trainer's evaluation of its final weights, the ones in its last checkpoint."""
    record = runs.records(run_dir, "eval")[-1]
    assert record["step"] == runs.records(run_dir)[-1]["step"] == runs.summary(run_dir)["step"]
    return record


def evaluate_like_the_trainer(model_dir, data) -> dict:
    """`nitp eval` with the trainer's sequence length and token cap: the same sample, the same function."""
    from nitp_ds.evaluate import evaluate

    return evaluate(model_dir, data, max_tokens=runs.TINY["train.eval_tokens"], seq_len=runs.TINY["data.seq_len"],
                    device="cpu", dtype=torch.float32)


def test_export_reproduces_the_training_losses(trained, data, tmp_path):
    family, run_dir = trained
    result = export_checkpoint(run_dir, tmp_path / "hf", dtype="fp32", verify=True, show_progress=False)
    check = result.verification  # fp32: the same weights, so the same model to the last bit
    assert check.loss_export == check.loss_checkpoint and check.kl == 0 and check.top1_agreement == 1
    assert check.loaded_difference == 0
    assert "validation split" in check.data and check.tokens >= 4096
    assert result.step == runs.summary(run_dir)["step"]
    trainer, exported = final_eval(run_dir), evaluate_like_the_trainer(result.out, data)
    print(f"{family}: val ntp loss trainer {trainer['val/loss_ntp']:.7f}, exported {exported['val/loss_ntp']:.7f}")
    assert exported["val/loss_ntp"] == pytest.approx(trainer["val/loss_ntp"], abs=LOSS_TOL)
    config = json.loads((result.out / "config.json").read_text())
    assert config["model_type"] == family
    assert config["use_cache"] is True and config["output_router_logits"] is False
    assert config["architectures"] and (result.out / "generation_config.json").is_file()
    assert not any("nitp_head" in p.name for p in result.out.iterdir())


# -- export verification on a model with trained-size logits -------------------------------------------

def scale_parameter(tag_dir, name: str, factor: float) -> None:
    """Multiplies one parameter's fp32 master weights in every rank's optim file, where convert reads them."""
    partitions = ZeroCheckpoint(tag_dir, world=NPROC)
    for piece in partitions.dense[name]:
        path = partitions.optim_files[piece.rank]
        state = torch.load(path, map_location="cpu", weights_only=False)
        with torch.no_grad():  # the saved flat groups are leaf tensors that require grad
            state["optimizer_state_dict"]["fp32_flat_groups"][piece.sub_group][piece.offset:][:piece.numel] *= factor
        torch.save(state, path)
    meta = json.loads((tag_dir / META).read_text())  # the file's new size and CRC-32, as a save would record them
    meta[FILES_KEY].update({path.name: file_record(path) for path in partitions.optim_files.values()})
    (tag_dir / META).write_text(json.dumps(meta))


@pytest.fixture
def large_logits(trained, tmp_path):
    """The qwen3_moe checkpoint with its final norm's gain x4: logits spread like a trained model's (std ~4 over
    the vocabulary, max |logit| well above 10), where a bound on max |logit drift| failed bf16 exports."""
    family, run_dir = trained
    if family != "qwen3_moe":
        pytest.skip("one family is enough for the verification checks")
    tag = tmp_path / "ckpt" / "global_step4"
    shutil.copytree(run_dir / "checkpoints" / "global_step4", tag)
    scale_parameter(tag, "lm.model.norm.weight", 4.0)
    return tag


def test_bf16_export_of_a_model_with_trained_size_logits_verifies(large_logits, tmp_path):
    result = export_checkpoint(large_logits, tmp_path / "hf", dtype="bf16", verify=True, show_progress=False)
    check = result.verification
    print("\n".join(check.lines()))
    assert "validation split" in check.data and check.tensors == len(exported_tensor_files(result.out))
    assert check.loaded_difference == 0  # transformers loads exactly the rounded weights
    assert 0 < abs(check.loss_export - check.loss_checkpoint) <= check.loss_bound  # rounded, and within the bound
    assert check.kl > 0 and check.top1_agreement < 1  # bf16 moves the distributions: printed, not failed
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    with safe_open(str(result.out / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    model = AutoModelForCausalLM.from_pretrained(result.out, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.arange(64).view(2, 32) % 400).logits
    assert logits.std(-1).mean() > 3 and logits.abs().max() > 12  # logits of a trained model's size
    # Without the run's data: the same verdict on a fixed batch, said so.
    notices = []
    again = verify_export(large_logits, result.out, data_dir=tmp_path / "gone", warn=notices.append)
    assert len(notices) == 1 and "not available" in notices[0] and "FIXED RANDOM BATCH" in again.data


def _rewrite(file, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _verify_error(src, directory) -> str:
    with pytest.raises(NITPError) as info:
        verify_export(src, directory, warn=lambda line: None)
    message = str(info.value)
    assert "\n" not in message and message.startswith("export verification failed")
    return message


def test_a_corrupted_export_fails_naming_the_tensor(large_logits, tmp_path):
    clean = export_checkpoint(large_logits, tmp_path / "clean", dtype="bf16", show_progress=False).out
    file = "model.safetensors"

    perturbed = tmp_path / "perturbed"
    shutil.copytree(clean, perturbed)
    name = "model.layers.1.self_attn.q_proj.weight"
    _rewrite(perturbed / file, lambda t: t[name].view(-1)[7].add_(0.01))  # one element of one tensor
    assert f"tensor '{name}' in {file} is not the checkpoint's fp32 tensor rounded to bf16" in \
        _verify_error(large_logits, perturbed)

    swapped = tmp_path / "swapped"
    shutil.copytree(clean, swapped)

    def swap_experts(tensors):
        for kind in ("gate_proj", "up_proj", "down_proj"):
            one, two = (f"model.layers.0.mlp.experts.{e}.{kind}.weight" for e in (1, 2))
            tensors[one], tensors[two] = tensors[two], tensors[one]

    _rewrite(swapped / file, swap_experts)
    assert "tensor 'model.layers.0.mlp.experts.1.down_proj.weight'" in _verify_error(large_logits, swapped)

    # Right tensors, but a config.json that builds another model (one expert per token instead of two):
    # only the quality check can see it.
    other = tmp_path / "other-config"
    shutil.copytree(clean, other)
    config = json.loads((other / "config.json").read_text())
    config["num_experts_per_tok"] = 1
    (other / "config.json").write_text(json.dumps(config))
    message = _verify_error(large_logits, other)
    assert "the model transformers loads from the export is not the checkpoint's" in message


def test_convert_writes_sharded_index_and_head_that_reproduce_the_training_losses(trained, data, tmp_path):
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

    meta = json.loads((result.out / "nitp_meta.json").read_text())
    hidden, mult = meta["hf_config"]["hidden_size"], meta["nitp"]["head_mult"]
    head = load_file(result.out / "nitp_head.safetensors")
    assert sorted(head) == ["down.weight", "gate.weight", "up.weight"]
    assert head["gate.weight"].shape == (mult * hidden, hidden)
    assert result.peak_rss_mib > 0
    assert not list(tmp_path.glob(".st.tmp-*"))
    # The head and the sharded weights, read back by `nitp eval`, give the trainer's NTP and NITP losses.
    trainer, converted = final_eval(run_dir), evaluate_like_the_trainer(result.out, data)
    assert converted["val/loss_ntp"] == pytest.approx(trainer["val/loss_ntp"], abs=LOSS_TOL)
    assert converted["val/loss_nitp"] == pytest.approx(trainer["val/loss_nitp"], abs=LOSS_TOL)


def test_round_trip_from_hf_is_bit_identical(trained, tmp_path):
    family, run_dir = trained
    if family != ROUND_TRIP:
        pytest.skip(f"the {ROUND_TRIP} run starts from a Hugging Face directory and keeps its weights")
    from safetensors.torch import load_file

    result = export_checkpoint(run_dir, tmp_path / "exported", dtype="fp32", show_progress=False)
    before = load_file(run_dir.parent / "source" / "model.safetensors")
    after = load_file(result.out / "model.safetensors")
    assert sorted(before) == sorted(after)
    for name in before:
        assert torch.equal(before[name], after[name]), name


def assert_same(ours, theirs, where: str) -> None:
    """Equal contents of two loaded torch.save files: tensors (values, dtype, shape, requires_grad), containers,
    numpy arrays (RNG states), plain objects (DeepSpeed's loss scaler) by their fields."""
    import numpy as np

    assert type(ours) is type(theirs), where
    if torch.is_tensor(ours):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape and torch.equal(ours, theirs), where
        assert ours.requires_grad == theirs.requires_grad, where
    elif isinstance(ours, dict):
        assert list(ours) == list(theirs), where
        for key in ours:
            assert_same(ours[key], theirs[key], f"{where}/{key}")
    elif isinstance(ours, (list, tuple)):
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(ours, np.ndarray):
        assert np.array_equal(ours, theirs), where
    elif hasattr(ours, "__dict__"):
        assert_same(vars(ours), vars(theirs), where)
    else:
        assert ours == theirs, where


def test_universal_checkpoint_resumes_at_one_process(trained, data, tmp_path):
    family, run_dir = trained
    if family != "qwen3_moe":
        pytest.skip("one family is enough for the universal path")
    univ = convert_checkpoint(run_dir / "checkpoints" / "global_step2", tmp_path / "univ", to="universal").out
    assert (univ / "latest").read_text() == "global_step2"
    # What DeepSpeed's own ds_to_universal writes, file for file and tensor for tensor.
    theirs = tmp_path / "ds" / "global_step2"
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                    str(run_dir / "checkpoints" / "global_step2"), "--output_folder", str(theirs),
                    "--num_extract_workers", "1", "--num_merge_workers", "1"], env=runs.child_env(), check=True,
                   capture_output=True)
    ours = sorted(p.relative_to(univ) for p in univ.rglob("*") if p.is_file() and p.name not in ("latest", META))
    assert ours == sorted(p.relative_to(theirs.parent) for p in theirs.parent.rglob("*") if p.is_file())
    for relative in ours:
        if relative.suffix == ".pt":
            assert_same(torch.load(univ / relative, weights_only=False),
                        torch.load(theirs.parent / relative, weights_only=False), str(relative))
        else:
            assert (univ / relative).read_bytes() == (theirs.parent / relative).read_bytes()
    # One process holding both ranks' micro-batches: the same global batch per step, as in test_train_options.
    resumed = tmp_path / "resumed"
    result = runs.train(data, resumed, nproc=1, extra=["--resume", str(univ / "global_step2")],
                        **RUN, **{"train.micro_batch_size": NPROC * runs.TINY["train.micro_batch_size"]})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resumed from {univ / 'global_step2'} at step 2" in result.stdout
    one, two = runs.records(resumed), runs.records(run_dir)[2:]
    assert [r["step"] for r in one] == [r["step"] for r in two] == [3, 4]
    for key in LOSSES:
        assert [r[key] for r in one] == pytest.approx([r[key] for r in two], **TOL), key
    assert final_eval(resumed)["val/loss_ntp"] == pytest.approx(final_eval(run_dir)["val/loss_ntp"], **TOL)


def test_a_run_with_hugging_face_experts_exports_and_refuses_an_autoep_resume(data, tmp_path):
    """ds_configs/zero3_moe_1gpu.json trains without AutoEP (the model's own experts under ZeRO-3): its
    checkpoint carries Hugging Face names, exports with the same losses, and resuming it under AutoEP is
    refused with one line (the names differ), not a missing-file traceback."""
    from nitp_ds.evaluate import evaluate

    run_dir = tmp_path / "run"
    result = runs.train(data, run_dir, ds_config=runs.REPO / "ds_configs" / "zero3_moe_1gpu.json", **RUN)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    exported = export_checkpoint(run_dir, tmp_path / "hf", dtype="fp32", verify=True, show_progress=False)
    assert exported.verification.kl == 0 and exported.verification.loss_export == exported.verification.loss_checkpoint
    ours = evaluate(exported.out, data, max_tokens=runs.TINY["train.eval_tokens"], seq_len=runs.TINY["data.seq_len"],
                    device="cpu", dtype=torch.float32)
    assert ours["val/loss_ntp"] == pytest.approx(final_eval(run_dir)["val/loss_ntp"], abs=LOSS_TOL)

    resumed = tmp_path / "resumed"
    result = runs.train(data, resumed, nproc=2, extra=["--resume", str(run_dir / "checkpoints" / "global_step2")],
                        **RUN)
    assert result.returncode == 2
    assert result.stderr.count("trained with Hugging Face experts (expert_parallel disabled)") == 1
    assert "Traceback" not in result.stderr + result.stdout


def test_verify_refuses_data_of_another_vocabulary(data):
    from transformers import Qwen3MoeConfig

    from nitp_ds.checkpoint.verify import evaluation_batches

    with pytest.raises(NITPError, match="has a vocabulary of 400 tokens but the model has 100; pass the run's own"):
        evaluation_batches(Qwen3MoeConfig(vocab_size=100), data, warn=lambda line: None)


# -- memory: convert holds about one layer, whatever the model's size -------------------------------------

# 16 layers whose experts hold nearly all of ~100 MB of fp32 weights (4 experts of width 2048 at hidden 64): the
# weights dwarf one layer (6 MB) and are large against the noise of a process's resident memory.
MANY_LAYERS = {"model.hidden_size": 64, "model.num_layers": 16, "model.num_heads": 4, "model.num_kv_heads": 2,
               "model.num_experts": 4, "model.experts_per_token": 2, "model.moe_intermediate_size": 2048,
               "train.steps": 1, "checkpoint.every": 1}
CONVERT_IN_A_CHILD = r"""
import json, sys
from pathlib import Path
from nitp_ds.checkpoint.convert import convert_checkpoint
src, out = Path(sys.argv[1]), sys.argv[2]
def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) * 1024
# A first conversion runs every code path once: the library code it maps (more when other processes have those
# pages cached) is part of the fixed cost, not of what convert holds.
convert_checkpoint(src, out + "-first", show_progress=False)
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM, the peak resident set, to the current one
baseline = status("VmRSS")
result = convert_checkpoint(src, out, show_progress=False)
print(json.dumps({"baseline": baseline, "peak": status("VmHWM"), "weights": result.total_bytes}))
"""


def test_convert_peak_memory_is_one_layer_not_the_model(data, tmp_path):
    run_dir = tmp_path / "run"
    result = runs.train(data, run_dir, nproc=1, **MANY_LAYERS)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    tag = run_dir / "checkpoints" / "global_step1"
    # glibc's mmap threshold otherwise rises to 32 MiB and keeps freed blocks below it for reuse (+28-36 MiB here,
    # flat with depth, and varying): fixed, the peak is what convert holds.
    child = subprocess.run([sys.executable, "-c", CONVERT_IN_A_CHILD, str(tag), str(tmp_path / "st")],
                           capture_output=True, text=True, env=runs.child_env(MALLOC_MMAP_THRESHOLD_="131072"),
                           cwd=runs.REPO)
    assert child.returncode == 0, child.stderr[-3000:]
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    partitions = ZeroCheckpoint(tag, world=1)
    largest = max(4 * torch.Size(partitions.shape(n)).numel() for n in partitions.names()) * 2  # gate + up fused
    grown = measured["peak"] - measured["baseline"]
    print(f"convert: fp32 weights {measured['weights'] / 2**20:.0f} MiB, largest tensor {largest / 2**20:.1f} MiB, "
          f"baseline {measured['baseline'] / 2**20:.0f} MiB, peak {measured['peak'] / 2**20:.0f} MiB "
          f"(+{grown / 2**20:.1f} MiB)")
    assert measured["weights"] > 90 * 2**20
    assert grown < measured["weights"] / 4  # ds_to_universal's way took ~5.8x the weights
    # What it holds (measured +12 MiB): the fused expert tensor, a half being read, DeepSpeed's copy of that half in
    # its placement map, the half's pages, and a few MiB of bookkeeping.
    assert grown < 4 * largest + 8 * 2**20


# -- which checkpoint a path names: one resolution for resume, convert and export ------------------------

def test_a_run_directory_names_its_newest_complete_checkpoint(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    for step, complete in ((2, True), (4, True), (6, False)):  # step 6: a save that never finished
        (checkpoints / f"global_step{step}").mkdir(parents=True)
        if complete:
            (checkpoints / f"global_step{step}" / "nitp_meta.json").write_text('{"complete": true}')
    (checkpoints / "latest").write_text("global_step4")
    warnings: list[str] = []
    for path in (tmp_path / "run", checkpoints):
        assert resolve_checkpoint(path, warn=warnings.append) == checkpoints / "global_step4"
    assert len(warnings) == 2 and all("skipping incomplete checkpoint" in w and "global_step6" in w for w in warnings)
    with pytest.raises(NITPError, match="global_step6 is incomplete"):
        resolve_checkpoint(checkpoints / "global_step6")  # what --resume takes: nitp_meta.json is written last
    # Without nitp_meta.json, convert takes DeepSpeed's files as they are (a checkpoint of another loop) and
    # checks every rank's files itself; a nitp_meta.json that does not say complete is refused by all.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"")
    assert resolve_checkpoint(bare, require_meta=False) == bare
    with pytest.raises(NITPError, match="bare is incomplete"):
        resolve_checkpoint(bare)
    (bare / "nitp_meta.json").write_text('{"complete": false}')
    with pytest.raises(NITPError, match="bare is incomplete"):
        resolve_checkpoint(bare, require_meta=False)


# -- bad inputs: each one line naming the problem ---------------------------------------------------

@pytest.fixture
def ckpt_copy(trained, tmp_path):
    family, run_dir = trained
    if family != "qwen3_moe":
        pytest.skip("bad inputs are family-independent")
    copy = tmp_path / "copy"
    shutil.copytree(run_dir / "checkpoints" / "global_step2", copy)
    return copy


def _error(src, out, **kw) -> str:
    with pytest.raises(NITPError) as info:
        convert_checkpoint(src, out, show_progress=False, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_rejects_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "empty is not a checkpoint" in _error(tmp_path / "empty", tmp_path / "o")


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
