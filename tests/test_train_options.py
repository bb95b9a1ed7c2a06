"""Training options of `nitp train`, each proven against an independent computation on CPU.

- `model.pretrained`: the first step's loss is the Hugging Face model's own loss on that batch, at 1 and 2 ranks.
- `moe.aux_loss_scope=global` on 2 ranks reproduces, step for step, one rank holding the whole batch
  (whose micro-batch balancing loss is the global-batch one).
- `train.fast_zero_step` (the streamlined ZeRO-3 optimizer step, and on one rank the shortcuts of
  nitp_ds/one_rank.py) gives DeepSpeed's own losses, gradient norms and parameters, with AutoEP on 2 ranks,
  and on one with fused AdamW, clipping, gradient accumulation, AutoEP or compiled layers (resuming across
  it and DeepSpeed's own step: tests/test_reliability.py).
- `train.grad_accum=2` reproduces one micro-batch twice as large.
- `train.activation_checkpointing` gives the losses of a run without it (2 ranks, ZeRO-3 + AutoEP), and
  really recomputes the layers in backward.
- A non-finite loss in any micro-batch of an accumulation window skips the whole step cleanly: the steps
  after it equal a run resumed from before the skip with the data moved on by that window.

Runs are shared through module fixtures; each is a tiny model through `tests/runs.py`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

import runs

TOL = dict(rel=2e-6, abs=1e-7)  # float32 sums in another order (ranks, micro-batches, AutoEP shards)
LOSSES = ("loss/total", "loss/ntp", "loss/nitp", "loss/aux", "loss/z", "grad_norm", "lr")
SEED = 1234  # TINY's recipe (debug) seed, which picks the training data order


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return runs.prepare_data(tmp_path_factory.mktemp("options-data"))


def trained(data, run_dir, **kw):
    result = runs.train(data, run_dir, **kw)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return runs.records(run_dir)


def column(records, key):
    return [r[key] for r in records]


# -- moe.aux_loss_scope=global, 2 ranks, and the same global batch on one rank ------------------------

BALANCED = {"train.steps": 4, "checkpoint.every": 0, "moe.aux_loss_weight": 0.1}


@pytest.fixture(scope="module")
def one_rank_batch_4(data, tmp_path_factory):
    """One rank, micro-batch 4: its balancing loss is computed over the whole batch of each step."""
    return trained(data, tmp_path_factory.mktemp("r") / "run", **BALANCED, **{"train.micro_batch_size": 4})


@pytest.fixture(scope="module")
def two_ranks_global(data, tmp_path_factory):
    """Two ranks, micro-batch 2 each (the same 4 samples per step), balancing loss over both ranks."""
    return trained(data, tmp_path_factory.mktemp("g") / "run", nproc=2, **BALANCED,
                   **{"train.micro_batch_size": 2, "moe.aux_loss_scope": "global"})


def test_global_aux_loss_on_two_ranks_equals_one_rank_with_the_whole_batch(one_rank_batch_4, two_ranks_global):
    # The expert loads f are summed over ranks and the router probabilities P are averaged by the gradient
    # all-reduce, so the 2-rank loss, its gradient and hence every later step match the 1-rank run.
    assert column(two_ranks_global, "step") == column(one_rank_batch_4, "step") == [1, 2, 3, 4]
    for key in LOSSES:
        assert column(two_ranks_global, key) == pytest.approx(column(one_rank_batch_4, key), **TOL), key


def test_execution_options_give_the_default_losses_on_two_ranks(data, tmp_path, two_ranks_global):
    """Three options change how the step runs, not what it computes; all three switched away from their
    defaults in one 2-rank ZeRO-3 + AutoEP run give the default run's losses (any one of them off by more
    than the tolerance fails it):
    - `train.zero3_fetch=module`: DeepSpeed's per-module fetch hooks instead of one ZeRO-3 leaf per layer
      and one for the NITP head;
    - `train.fast_zero_step=false`: DeepSpeed's own ZeRO-3 step instead of the streamlined one (fp32 norms,
      gradients viewed in place), with expert gradients normed over the expert-parallel group;
    - `train.activation_checkpointing=true`: every layer recomputed in backward."""
    other = trained(data, tmp_path / "run", nproc=2, **BALANCED,
                    **{"train.micro_batch_size": 2, "moe.aux_loss_scope": "global", "train.zero3_fetch": "module",
                       "train.fast_zero_step": "false", "train.activation_checkpointing": "true"})
    assert column(other, "step") == [1, 2, 3, 4] and column(other, "grad_norm")[0] > 0
    for key in LOSSES:
        assert column(other, key) == pytest.approx(column(two_ranks_global, key), **TOL), key


def zero_step_arms(data, tmp, clips: str, sets: dict, ds_changes: dict) -> dict:
    """tests/scripts/zero_step.py: one process trains the same model with the streamlined and DeepSpeed's
    step, with fused AdamW, at each gradient clip, two micro-batches per step (the first copied into ZeRO-3's
    gradient buffer, the second added to it), every parameter resident as on one GPU."""
    script = runs.REPO / "tests" / "scripts" / "zero_step.py"
    sets = {**runs.TINY, "data.path": data, "train.out_dir": tmp / "run", "optim.fused": "true",
            "checkpoint.every": 0, "train.grad_accum": 2, **sets}
    ds_config = json.loads(runs.DS_CONFIG.read_text())
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = "auto"
    ds_config.update(ds_changes)
    (tmp / "ds.json").write_text(json.dumps(ds_config))
    result = subprocess.run([sys.executable, str(script), str(runs.REPO / "recipes" / "debug.yaml"),
                             str(tmp / "ds.json"), "4", clips, *[f"{k}={v}" for k, v in sets.items()]],
                            env=runs.child_env(), cwd=tmp, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith('{"clip"')]
    return {out["clip"]: out for out in map(json.loads, lines)}


@pytest.fixture(scope="module")
def autoep_arms(data, tmp_path_factory):
    """AutoEP's experts, a gradient clip always exceeded (0.05) and one never reached (100)."""
    return zero_step_arms(data, tmp_path_factory.mktemp("zero-step"), "0.05,100", {}, {})


@pytest.fixture(scope="module")
def compiled_arms(data, tmp_path_factory):
    """The decoder layers compiled as on a GPU (torch.compile, aot_eager backend), which read their parameters
    without ZeRO-3's getter; Hugging Face's experts (torch.compile refuses AutoEP's fp32 grouped GEMM on CPU)."""
    return zero_step_arms(data, tmp_path_factory.mktemp("zero-step-compiled"), "0.05",
                          {"train.compile_layers": "true"}, {"expert_parallel": {"enabled": False}})


def assert_same_training(out: dict, clip: float) -> None:
    fast, deepspeed = out["fast"], out["deepspeed"]
    assert fast["unscale_in_adam"] and fast["one_pass_adamw"]
    assert not deepspeed["streamlined"] and not deepspeed["one_pass_adamw"] and not deepspeed["one_rank"]
    assert fast["one_rank"] == ["hand_off_gradients", "remove_module_hooks", "keep_parameters_between_steps"]
    clipped = [norm > clip for norm in deepspeed["grad_norm"]]
    assert all(clipped) if clip < 1 else not any(clipped)
    assert fast["loss"] == pytest.approx(deepspeed["loss"], **TOL)
    assert fast["grad_norm"] == pytest.approx(deepspeed["grad_norm"], rel=1e-5)
    assert out["max_param_diff"] <= 1e-6 * out["param_scale"]


@pytest.mark.parametrize("clip", [0.05, 100.0], ids=["clipped", "unclipped"])
def test_streamlined_zero3_step_with_fused_adamw_matches_deepspeed(autoep_arms, clip):
    """With fused AdamW the clip scale, the gradients as they lie in ZeRO-3's buffer and the copy into the
    partition go into one pass of the optimizer (nitp_ds/one_pass_adamw.py; the scale computed on the device,
    1 when the norm is under the clip), and on one rank with every parameter resident (nitp_ds/one_rank.py)
    each gradient goes straight into ZeRO-3's gradient buffer, no module hooks run and the parameters stay gathered between steps: the
    same model trained both ways in one process ends with the same parameters."""
    assert_same_training(autoep_arms[clip], clip)


def test_one_rank_shortcuts_with_compiled_layers_match_deepspeed(compiled_arms):
    """Compiled layers read their parameters directly, not through ZeRO-3's getter: with the module hooks
    removed, every parameter must already be gathered when the first step starts (a compiled layer traced an
    empty weight before that was so)."""
    assert_same_training(compiled_arms[0.05], 0.05)


def layer_forward_calls(lm, input_ids) -> int:
    """Forward passes of the first layer's attention during one forward and backward."""
    calls = []
    handle = lm.model.layers[0].self_attn.register_forward_hook(lambda *args: calls.append(1))
    lm.model(input_ids=input_ids).last_hidden_state.float().pow(2).mean().backward()
    handle.remove()
    return len(calls)


@pytest.mark.parametrize("pretrained", [False, True], ids=["random-init", "pretrained"])
def test_activation_checkpointing_recomputes_layers_in_backward(tmp_path, pretrained):
    # A model loaded with from_pretrained starts in eval mode, where Hugging Face layers silently skip
    # checkpointing: the trainer's model must recompute either way.
    import torch

    from nitp_ds.config import from_dict
    from nitp_ds.build import build_lm

    model = {"hidden_size": 32, "num_layers": 2, "num_experts": 4, "moe_intermediate_size": 32,
             "intermediate_size": 64, "max_seq_len": 64}
    if pretrained:
        save_tiny_model(tmp_path / "hf", vocab_size=100)
        model = {"pretrained": str(tmp_path / "hf")}
    ids = torch.randint(0, 100, (2, 16))
    for enabled, expected in ((False, 1), (True, 2)):
        cfg = from_dict({"model": model, "train": {"activation_checkpointing": enabled}})
        lm = build_lm(cfg, 100)
        assert lm.training
        assert layer_forward_calls(lm, ids) == expected, f"activation_checkpointing={enabled}"


# -- train.grad_accum ----------------------------------------------------------------------------------

# No balancing loss in the objective: it is a function of each micro-batch, so accumulating two halves
# is not the same objective as one whole batch (it is still computed and logged).
ACCUM = {"train.steps": 6, "checkpoint.every": 2, "moe.aux_loss_weight": 0}


@pytest.fixture(scope="module")
def accum_2(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("a") / "run"
    records = trained(data, run_dir, **ACCUM, **{"train.micro_batch_size": 2, "train.grad_accum": 2})
    return run_dir, records


def test_grad_accum_2_equals_one_micro_batch_twice_as_large(data, tmp_path, accum_2, one_rank_batch_4):
    _, accumulated = accum_2
    whole = trained(data, tmp_path / "run", **ACCUM, **{"train.micro_batch_size": 4})
    assert column(accumulated, "step") == column(whole, "step") == [1, 2, 3, 4, 5, 6]
    for key in ("loss/total", "loss/ntp", "loss/nitp", "loss/z", "grad_norm", "lr", "consumed_tokens"):
        assert column(accumulated, key) == pytest.approx(column(whole, key), **TOL), key
    # The balancing loss of two half batches is not the whole batch's: the difference that the global
    # scope test above resolves, measured on the same first batch, is far above its tolerance.
    assert whole[0]["loss/aux"] == pytest.approx(one_rank_batch_4[0]["loss/aux"], **TOL)
    assert abs(accumulated[0]["loss/aux"] - whole[0]["loss/aux"]) > 100 * TOL["rel"] * whole[0]["loss/aux"]


def moved_on_copy(run_dir, dst, step: int, samples: int):
    """A copy of a run as it was at checkpoint `step`, with the data position moved on by `samples`."""
    import torch

    shutil.copytree(run_dir, dst)
    checkpoints = dst / "checkpoints"
    for later in checkpoints.glob("global_step*"):
        if int(later.name.removeprefix("global_step")) > step:
            shutil.rmtree(later)
    (checkpoints / "latest").write_text(f"global_step{step}")
    from nitp_ds.checkpoint.integrity import FILES_KEY, META, file_record

    tag_dir = checkpoints / f"global_step{step}"
    meta = json.loads((tag_dir / META).read_text())
    for states in tag_dir.glob("*model_states.pt"):
        saved = torch.load(states, weights_only=False)
        saved["loader"]["global_samples"] += samples
        torch.save(saved, states)
        if states.name in meta.get(FILES_KEY, {}):  # the edit is deliberate: record the file as it now is
            meta[FILES_KEY][states.name] = file_record(states)
    (tag_dir / META).write_text(json.dumps(meta))
    return dst


def test_nonfinite_micro_batch_skips_the_whole_accumulation_window(data, tmp_path, accum_2):
    accum_dir, clean = accum_2
    settings = {**ACCUM, "train.micro_batch_size": 2, "train.grad_accum": 2, "train.max_bad_steps": 2}
    run_dir = tmp_path / "run"
    # Attempt 3: NaN in its 2nd micro-batch only, after the 1st has put its gradients in the buffers.
    # Attempts 6 and 7: two bad steps in a row (in the 1st, then the 2nd micro-batch) stop the run.
    result = runs.train(data, run_dir, env={"NITP_FAULT_NAN_STEPS": "3:2,6:1,7:2"}, **settings)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning: step")]
    assert warnings == [
        "warning: step 3 has a non-finite loss (1 of 2 micro-batches); skipped (1/2 in a row)",
        "warning: step 5 has a non-finite loss (1 of 2 micro-batches); skipped (1/2 in a row)",
        "warning: step 5 has a non-finite loss (1 of 2 micro-batches); skipped (2/2 in a row)"]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "2 consecutive steps had a non-finite loss" in errors[0]
    assert "Traceback" not in result.stderr
    assert runs.latest(run_dir) == "global_step4" and not (run_dir / "checkpoints" / "global_step5").exists()

    skipped = runs.records(run_dir)
    assert column(skipped, "step") == [1, 2, 3, 4]
    assert column(skipped, "skipped_steps") == [0, 0, 1, 1]
    assert runs.curve(run_dir)[:2] == runs.curve(accum_dir)[:2]
    # Independent reference: the clean run's step-2 checkpoint, resumed with the data moved on by the
    # skipped window (2 micro-batches of 2 samples). Same weights, optimizer, schedule, data: bitwise.
    reference = moved_on_copy(accum_dir, tmp_path / "reference", step=2, samples=4)
    result = runs.train(data, reference, **settings)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert runs.curve(run_dir)[2:] == runs.curve(reference)[2:4]


# -- model.pretrained ------------------------------------------------------------------------------------


def save_tiny_model(directory, vocab_size: int, hidden_size: int = 48, seed: int = 7):
    """A Hugging Face Qwen3-MoE directory, as save_pretrained writes it; weights unlike any default init."""
    import torch

    from nitp_ds.config import ModelConfig
    from nitp_ds.models import build_model

    torch.manual_seed(seed)
    shape = ModelConfig(hidden_size=hidden_size, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4,
                        experts_per_token=2, moe_intermediate_size=32, intermediate_size=64, max_seq_len=64,
                        init_std=0.2)
    build_model(shape, vocab_size).save_pretrained(directory)
    return directory


def hf_loss(model_dir, data, micro_batch_size: int, nproc: int = 1) -> float:
    """The Hugging Face model's own next-token loss on the first training batch of each of nproc ranks, averaged
    over the ranks as the trainer logs it."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from nitp_ds.data.dataset import TokenLoader, open_data

    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    losses = []
    for rank in range(nproc):
        batch = TokenLoader(open_data(data), "train", runs.TINY["data.seq_len"], micro_batch_size, dp_rank=rank,
                            dp_world_size=nproc, seed=SEED).batch(0)
        with torch.no_grad():
            logits = lm(input_ids=batch["input_ids"]).logits
        losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["labels"].reshape(-1)).item())
    return sum(losses) / nproc


@pytest.mark.parametrize("nproc", [1, 2])
def test_training_starts_from_the_pretrained_weights_offline(data, tmp_path, nproc):
    # At 2 ranks the checkpoint is streamed into ZeRO-3 partitions (nitp_ds/models/pretrained.py), its
    # per-expert tensors (as save_pretrained writes them) fused into the model's experts on the way.
    import json

    model_dir = save_tiny_model(tmp_path / "hf", vocab_size=400)
    run_dir = tmp_path / "run"
    result = runs.train(data, run_dir, nproc=nproc, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
                        **{"model.pretrained": model_dir, "train.steps": 2, "checkpoint.every": 0})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    first = runs.records(run_dir)[0]
    expected = hf_loss(model_dir, data, runs.TINY["train.micro_batch_size"], nproc)
    assert abs(expected - 5.99) > 0.1  # far from a fresh model's ln(400): the weights are recognisable
    assert first["loss/ntp"] == pytest.approx(expected, rel=1e-5)
    meta = json.loads((run_dir / "checkpoints" / "global_step2" / "nitp_meta.json").read_text())
    assert meta["hf_config"]["hidden_size"] == 48  # the directory's shape, not the recipe's hidden_size 32


def test_pretrained_model_with_a_smaller_vocabulary_than_the_data_is_refused(data, tmp_path):
    model_dir = save_tiny_model(tmp_path / "hf", vocab_size=100)
    result = runs.train(data, tmp_path / "run", **{"model.pretrained": model_dir})
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "vocabulary of 100 tokens" in result.stderr and "Traceback" not in result.stderr
