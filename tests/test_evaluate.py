"""The one validation loss (`validation_loss`) and `nitp eval`, on real prepared data and tiny real models.

The trainer-side agreement (the trainer's final evaluation on 2 ZeRO-3 ranks = `nitp eval` of its checkpoint and
of its export) is `test_trainer_and_nitp_eval_agree_on_checkpoint_and_export` at the end.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from nitp_ds.config import ModelConfig
from nitp_ds.errors import NITPError
from nitp_ds.evaluate import (SUMS, ValidationLoss, batch_sums, evaluate, rank_batches, read_window,
                              validation_loss, validation_windows)
from nitp_ds.models import build_model
from nitp_ds.nitp import NITPModel

SEQ = 16
WORDS = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta", "lorem", "ipsum"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two sources of random-word documents, a fifth of each in val (about 1,900 val tokens)."""
    from nitp_ds.data.dataset import open_data
    from nitp_ds.data.prepare import prepare_data

    root = tmp_path_factory.mktemp("eval-data")
    rng = random.Random(0)
    for name, docs in (("a", 60), ("b", 30)):
        lines = [json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(60))}) for _ in range(docs)]
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    prepare_data([f"a={root / 'a.jsonl'}", f"b={root / 'b.jsonl'}"], root / "data", train_vocab_size=300,
                 val_fraction=0.2, num_workers=1, progress=False)
    return open_data(root / "data")


def tiny_lm(vocab=300, seed=0):
    torch.manual_seed(seed)
    m = ModelConfig(family="qwen3_moe", hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, num_experts=4,
                    experts_per_token=2, moe_intermediate_size=16, intermediate_size=64, max_seq_len=64)
    return build_model(m, vocab_size=vocab)


def global_index(data, window) -> int:
    """A window's position among all val windows of the split, sources one after another."""
    source, start = window
    before = sum((data.source_tokens("val", s) - 1) // SEQ for s in data.source_names[:data.source_names.index(source)])
    return before + start // SEQ


def test_the_sample_spans_the_whole_split_evenly_up_to_the_cap(data):
    total = sum((data.source_tokens("val", s) - 1) // SEQ for s in data.source_names)
    assert total > 60
    everything = validation_windows(data, SEQ, max_tokens=10**9)
    assert [global_index(data, w) for w in everything] == list(range(total))  # under the cap: the whole split

    capped = validation_windows(data, SEQ, max_tokens=20 * SEQ + SEQ - 1)
    positions = [global_index(data, w) for w in capped]
    assert len(positions) == 20 and positions == sorted(set(positions))
    assert positions[0] < total / 20 and positions[-1] >= total - total / 20  # from the start to the end
    assert sum(p < total / 2 for p in positions) == 10  # both halves, evenly
    gaps = [b - a for a, b in zip(positions, positions[1:])]
    assert max(gaps) - min(gaps) <= 1
    sources = [s for s, _ in capped]  # each source in proportion to its val windows
    share_a = ((data.source_tokens("val", "a") - 1) // SEQ) / total
    assert abs(sources.count("a") / 20 - share_a) <= 1 / 20
    assert validation_windows(data, SEQ, max_tokens=20 * SEQ) == capped  # a function of the data and cap only


def test_the_loss_is_token_weighted_with_a_standard_error_over_windows(data):
    """Against an independent computation: full logits and F.cross_entropy, one window at a time."""
    lm = tiny_lm()
    model = NITPModel(lm, head="swiglu", head_mult=2, target_layer=1).eval()
    result = validation_loss(model, data, seq_len=SEQ, max_tokens=30 * SEQ, batch_size=4)
    per_window, nitp = [], []
    with torch.no_grad():
        for window in validation_windows(data, SEQ, 30 * SEQ):
            tokens = torch.from_numpy(read_window(data, window, SEQ))[None]
            logits = lm(tokens[:, :-1]).logits
            per_window.append(float(F.cross_entropy(logits[0].double(), tokens[0, 1:])))
            with torch.enable_grad():  # the training path of the loss: chunked cross-entropy, with gradients
                nitp.append(float(model(tokens[:, :-1], tokens[:, 1:])["nitp"].detach()))
    n = len(per_window)
    mean = sum(per_window) / n
    stderr = math.sqrt(sum((x - mean) ** 2 for x in per_window) / (n - 1) / n)
    assert (result.windows, result.tokens, result.seq_len) == (30, 30 * SEQ, SEQ)
    assert result.loss == pytest.approx(mean, rel=1e-5)
    assert result.stderr == pytest.approx(stderr, rel=1e-4)
    assert result.nitp == pytest.approx(sum(nitp) / n, rel=1e-5)
    record = result.record()
    assert record["val/ppl"] == pytest.approx(math.exp(mean), rel=1e-5) and record["val/loss_ntp_se"] > 0
    again = validation_loss(model, data, seq_len=SEQ, max_tokens=30 * SEQ, batch_size=7)  # batch size: rounding only
    assert again.loss == pytest.approx(result.loss, abs=1e-6)


def test_ranks_split_the_sample_in_lockstep_and_their_sums_add_up_to_one_process(data):
    """What the all-reduce adds: each rank's sums over its share; together they equal one process's sums."""
    model = NITPModel(tiny_lm(), head="none", target_layer=0).eval()
    windows = validation_windows(data, SEQ, 23 * SEQ)  # 23 windows: not a multiple of 3 ranks x 2 rows

    def sums(rank, world, pad=False):
        batches = list(rank_batches(data, windows, SEQ, 2, rank, world, pad=pad))
        assert not pad or all(len(batch["input_ids"]) == 2 for batch in batches)
        total = torch.zeros(len(SUMS), dtype=torch.float64)
        with torch.no_grad():
            for batch in batches:
                total += batch_sums(model(batch["input_ids"], batch["labels"]), batch["labels"])
        return len(batches), total

    one_steps, one = sums(0, 1)
    three = [sums(rank, 3) for rank in range(3)]
    assert one_steps == 12 and {steps for steps, _ in three} == {4}  # every rank runs the same forward passes
    padded = [sums(rank, 3, pad=True) for rank in range(3)]  # one batch shape (compiled layers): filler rows
    counts = [SUMS.index(k) for k in ("tokens", "tokens_sq", "windows", "nitp_positions")]
    for split in (three, padded):
        total = sum(t for _, t in split)
        assert torch.equal(total[counts], one[counts])  # every window scored once, filler rows never
        # The row losses are fp32 and a row's rounding depends on the rows it shares a matmul with, so the
        # sums agree to a few fp32 ulps (1e-6 relative), not bitwise; one window missed or counted twice
        # would move them by about 1/23.
        assert torch.allclose(total, one, rtol=1e-6, atol=0)
    a = ValidationLoss.from_sums(one.tolist(), SEQ, has_head=False)
    b = ValidationLoss.from_sums(sum(t for _, t in three).tolist(), SEQ, has_head=False)
    assert (a.tokens, a.windows) == (b.tokens, b.windows) == (23 * SEQ, 23)
    assert b.loss == pytest.approx(a.loss, abs=1e-6) and b.stderr == pytest.approx(a.stderr, rel=1e-5)


def test_nitp_eval_of_a_hugging_face_directory(tmp_path, data):
    tiny_lm().save_pretrained(tmp_path / "hf")
    out = tmp_path / "eval.json"
    results = evaluate(tmp_path / "hf", data.path, max_tokens=12 * 64, batch_size=5, sample_tokens=64, out_json=out)
    # no training length recorded: the model's context (max_position_embeddings 64), said so
    assert results["val/seq_len"] == 64 and "max_position_embeddings" in results["seq_len_from"]
    assert results["val/tokens"] == 12 * 64 and results["val/windows"] == 12
    assert results["val/ppl"] == pytest.approx(math.exp(results["val/loss_ntp"]))
    assert abs(results["val/loss_ntp"] - math.log(300)) < 0.5  # a random model is near uniform
    assert 0 < results["val/loss_ntp_se"] < 0.5
    assert "val/loss_nitp" not in results
    assert results["geometry/tokens"] == 64
    assert 1.0 <= results["geometry/effective_rank"] <= 32.0
    assert -1.0 <= results["geometry/anisotropy"] <= 1.0
    assert results["val/moe/max_over_mean"] >= 1.0
    assert json.loads(out.read_text())["val/loss_ntp"] == pytest.approx(results["val/loss_ntp"])


def test_nitp_eval_of_convert_output_with_a_head_takes_its_training_length(tmp_path, data):
    """The layout `nitp convert` writes: model.safetensors, nitp_head.safetensors, nitp_meta.json, no config.json."""
    lm = tiny_lm()
    model = NITPModel(lm, head="swiglu", head_mult=2, target_layer=1)
    directory = tmp_path / "consolidated"
    lm.save_pretrained(directory)
    (directory / "config.json").unlink()
    save_file({k: v.contiguous() for k, v in model.nitp_head.state_dict().items()},
              str(directory / "nitp_head.safetensors"))
    meta = {"step": 10, "hf_config": lm.config.to_dict(), "model_type": "qwen3_moe", "seq_len": SEQ,
            "data_dir": str(data.path), "nitp": {"head": "swiglu", "head_mult": 2, "target_layer": 1, "weight": 1.0}}
    (directory / "nitp_meta.json").write_text(json.dumps(meta))
    results = evaluate(directory, max_tokens=20 * SEQ, sample_tokens=32, per_layer=True)  # data from the meta

    expected = validation_loss(model, data, seq_len=SEQ, max_tokens=20 * SEQ)
    assert results["val/seq_len"] == SEQ and results["seq_len_from"].endswith("nitp_meta.json")
    assert results["data"] == str(data.path)
    assert results["val/loss_ntp"] == pytest.approx(expected.loss, rel=1e-6)
    assert results["val/loss_nitp"] == pytest.approx(expected.nitp, rel=1e-6)
    assert results["nitp_head"] == "swiglu" and results["target_layer"] == 1
    for k in range(4):  # embedding output and the output of each of the 3 blocks
        assert f"geometry/layer{k}/effective_rank" in results
        assert f"geometry/layer{k}/anisotropy" in results


def test_bad_sources_and_settings_name_the_fix(tmp_path, data):
    with pytest.raises(NITPError, match="no config.json"):
        evaluate(tmp_path, data.path, seq_len=SEQ)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(NITPError, match="is not a checkpoint: .*pass a run directory"):
        evaluate(tmp_path / "run", data.path)
    tiny_lm().save_pretrained(tmp_path / "hf")
    with pytest.raises(NITPError, match="does not record the data it was trained on; pass --data"):
        evaluate(tmp_path / "hf")
    with pytest.raises(NITPError, match=r"cap \(15\) is below one sequence of 16 tokens; raise train.eval_tokens"):
        evaluate(tmp_path / "hf", data.path, seq_len=SEQ, max_tokens=15)
    with pytest.raises(NITPError, match=r"--seq-len 65 is outside the model's 1..64 positions"):
        evaluate(tmp_path / "hf", data.path, seq_len=65)
    with pytest.raises(NITPError, match="val split of .* fewer than one window .* --val-fraction"):
        validation_windows(data, 10**6)
    (tmp_path / "hf" / "nitp_head.safetensors").write_bytes(b"")
    with pytest.raises(NITPError, match="nitp_meta.json"):
        evaluate(tmp_path / "hf", data.path, seq_len=SEQ)


def test_eval_command_prints_the_loss_with_its_standard_error_and_tokens(tmp_path, data):
    from typer.testing import CliRunner

    import nitp_ds.cli.evaluate  # noqa: F401  (registers eval and plot)
    from nitp_ds.cli.main import app

    tiny_lm().save_pretrained(tmp_path / "hf")
    runner = CliRunner()
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", str(tmp_path / "hf"), "--data", str(data.path), "--tokens", "320",
                                 "--seq-len", str(SEQ), "--sample-tokens", "32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())
    assert results["val/tokens"] == 320
    line = next(line for line in result.output.splitlines() if line.startswith("val ntp"))
    assert f"{results['val/loss_ntp']:.4f} ± {results['val/loss_ntp_se']:.4f}" in line
    assert "SE over 20 sequences" in line and "320 tokens at seq_len 16" in line and "(seq_len: --seq-len)" in line

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": 10, **results}) + "\n")
    result = runner.invoke(app, ["plot", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "plots" / "validation.png").is_file() and (run / "plots" / "geometry.png").is_file()


# -- the trainer and `nitp eval`: one function, one number ---------------------------------------------------------

AGREEMENT_TOKENS = 24 * 32  # 24 of the split's ~59 windows of TINY's 32 tokens: the cap binds, the sample is spread


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A tiny NITP run on 2 ZeRO-3 + AutoEP ranks, evaluated by the trainer at its end."""
    import runs

    run_dir = tmp_path_factory.mktemp("eval-run") / "run"
    result = runs.train(data.path, run_dir, nproc=2, **{"train.steps": 2, "checkpoint.every": 0,
                                                         "train.eval_tokens": AGREEMENT_TOKENS})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir, result.stdout


def test_trainer_and_nitp_eval_agree_on_checkpoint_and_export(trained, data, tmp_path):
    """The trainer's final evaluation (2 ranks splitting the sample) = `nitp eval RUN` (its final checkpoint,
    consolidated, one process) = `nitp eval` of its `nitp export` (fp32), to 1e-4."""
    import runs
    from typer.testing import CliRunner

    import nitp_ds.cli.evaluate  # noqa: F401
    from nitp_ds.checkpoint.export import export_checkpoint
    from nitp_ds.cli.main import app

    run_dir, stdout = trained
    trainer = runs.records(run_dir, "eval")[-1]
    assert trainer["step"] == runs.summary(run_dir)["step"] == 2
    assert runs.summary(run_dir)["val/loss_ntp"] == trainer["val/loss_ntp"]
    assert trainer["val/tokens"] == AGREEMENT_TOKENS and trainer["val/seq_len"] == 32
    eval_line = next(line for line in stdout.splitlines() if line.startswith("eval  step"))
    assert f"± {trainer['val/loss_ntp_se']:.4f} (SE over 24 sequences)" in eval_line, eval_line

    out = tmp_path / "checkpoint.json"
    result = CliRunner().invoke(app, ["eval", str(run_dir), "--data", str(data.path), "--tokens",
                                      str(AGREEMENT_TOKENS), "--out", str(out)])
    assert result.exit_code == 0, result.output
    checkpoint = json.loads(out.read_text())
    assert checkpoint["seq_len_from"].endswith("global_step2/nitp_meta.json")  # the training length, recorded

    exported_dir = export_checkpoint(run_dir, tmp_path / "hf", dtype="fp32", show_progress=False).out
    exported = evaluate(exported_dir, data.path, max_tokens=AGREEMENT_TOKENS)  # the length the export keeps
    assert exported["seq_len_from"] == f"training length, from {exported_dir / 'nitp_export.json'}"
    print(f"val loss: trainer {trainer['val/loss_ntp']:.6f} ± {trainer['val/loss_ntp_se']:.4f}, nitp eval "
          f"checkpoint {checkpoint['val/loss_ntp']:.6f}, nitp eval export {exported['val/loss_ntp']:.6f}")
    for other in (checkpoint, exported):
        assert (other["val/tokens"], other["val/windows"], other["val/seq_len"]) == (AGREEMENT_TOKENS, 24, 32)
        assert other["val/loss_ntp"] == pytest.approx(trainer["val/loss_ntp"], abs=1e-4)
        assert other["val/loss_ntp_se"] == pytest.approx(trainer["val/loss_ntp_se"], abs=1e-4)
    assert checkpoint["val/loss_nitp"] == pytest.approx(trainer["val/loss_nitp"], abs=1e-4)
