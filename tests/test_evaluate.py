"""`evaluate` on tiny saved models with a tiny validation set behind the data-loader API."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from nitp_ds.config import ModelConfig
from nitp_ds.errors import NITPError
from nitp_ds.evaluate import evaluate
from nitp_ds.models import build_model
from nitp_ds.nitp import NITPModel

VOCAB = 97
SEQ = 16


class FakeData:
    """Stands in for what `open_data` returns: a fixed random validation token stream."""

    def __init__(self, path):
        self.path = path
        self.vocab_size = VOCAB
        self.tokens = torch.randint(0, VOCAB, (4096,), generator=torch.Generator().manual_seed(7))


class FakeTokenLoader:
    """The TokenLoader API that `evaluate` is written against: val_batches(n) yields n batches."""

    calls: list = []

    def __init__(self, data, split, seq_len, micro_batch_size, seed=0):
        FakeTokenLoader.calls.append((split, seq_len, micro_batch_size, seed))
        self.data, self.seq_len, self.batch_size = data, seq_len, micro_batch_size

    def val_batches(self, n):
        span = self.seq_len + 1
        for b in range(n):
            rows = [self.data.tokens[(b * self.batch_size + r) * span:(b * self.batch_size + r + 1) * span]
                    for r in range(self.batch_size)]
            window = torch.stack(rows)
            yield {"input_ids": window[:, :-1].clone(), "labels": window[:, 1:].clone()}


@pytest.fixture
def fake_loader(monkeypatch):
    module = types.ModuleType("nitp_ds.data.dataset")
    module.open_data = FakeData
    module.TokenLoader = FakeTokenLoader
    monkeypatch.setitem(sys.modules, "nitp_ds.data.dataset", module)
    FakeTokenLoader.calls = []
    return FakeTokenLoader


def tiny_lm(vocab=VOCAB):
    torch.manual_seed(0)
    m = ModelConfig(family="qwen3_moe", hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, num_experts=4,
                    experts_per_token=2, moe_intermediate_size=16, intermediate_size=64, max_seq_len=64)
    return build_model(m, vocab_size=vocab)


def test_hf_directory_reports_ntp_loss_perplexity_and_geometry(tmp_path, fake_loader):
    tiny_lm().save_pretrained(tmp_path / "hf")
    out = tmp_path / "eval.json"
    results = evaluate(tmp_path / "hf", tmp_path / "data", batches=3, seq_len=SEQ, batch_size=2,
                       sample_tokens=64, out_json=out)
    assert fake_loader.calls == [("val", SEQ, 2, 0)]
    assert results["val/tokens"] == 3 * 2 * SEQ
    assert results["val/ppl"] == pytest.approx(math.exp(results["val/loss_ntp"]))
    assert abs(results["val/loss_ntp"] - math.log(VOCAB)) < 0.5  # a random model is near uniform
    assert "val/loss_nitp" not in results
    assert results["geometry/tokens"] == 64  # ceil(64/3) per batch, cut to the sample size
    assert 1.0 <= results["geometry/effective_rank"] <= 32.0
    assert -1.0 <= results["geometry/anisotropy"] <= 1.0
    assert results["val/moe/max_over_mean"] >= 1.0
    assert json.loads(out.read_text())["val/loss_ntp"] == pytest.approx(results["val/loss_ntp"])


def test_consolidated_checkpoint_with_head_reports_the_nitp_loss(tmp_path, fake_loader):
    """The layout `nitp convert` writes: model.safetensors, nitp_head.safetensors, nitp_meta.json, no config.json."""
    lm = tiny_lm()
    model = NITPModel(lm, head="swiglu", head_mult=2, target_layer=1)
    directory = tmp_path / "consolidated"
    lm.save_pretrained(directory)
    (directory / "config.json").unlink()
    save_file({k: v.contiguous() for k, v in model.nitp_head.state_dict().items()},
              str(directory / "nitp_head.safetensors"))
    meta = {"step": 10, "hf_config": lm.config.to_dict(), "model_type": "qwen3_moe",
            "nitp": {"head": "swiglu", "head_mult": 2, "target_layer": 1, "weight": 1.0}}
    (directory / "nitp_meta.json").write_text(json.dumps(meta))
    results = evaluate(directory, "data", batches=2, seq_len=SEQ, batch_size=2, sample_tokens=32, per_layer=True)

    batches = list(FakeTokenLoader(FakeData("data"), "val", SEQ, 2).val_batches(2))
    model.eval()
    with torch.no_grad():
        expected = [model(b["input_ids"], b["labels"]) for b in batches]
    assert results["val/loss_ntp"] == pytest.approx(sum(float(p["ntp"]) for p in expected) / 2, rel=1e-5)
    assert results["val/loss_nitp"] == pytest.approx(sum(float(p["nitp"]) for p in expected) / 2, rel=1e-5)
    assert results["nitp_head"] == "swiglu" and results["target_layer"] == 1
    for k in range(4):  # embedding output and the output of each of the 3 blocks
        assert f"geometry/layer{k}/effective_rank" in results
        assert f"geometry/layer{k}/anisotropy" in results


def test_bad_sources_name_the_fix(tmp_path, fake_loader):
    with pytest.raises(NITPError, match="no config.json"):
        evaluate(tmp_path, "data", batches=1, seq_len=SEQ)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(NITPError, match="DeepSpeed checkpoint.*run `nitp convert"):
        evaluate(tmp_path / "ckpt", "data", batches=1, seq_len=SEQ)
    tiny_lm().save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "nitp_head.safetensors").write_bytes(b"")
    with pytest.raises(NITPError, match="nitp_meta.json"):
        evaluate(tmp_path / "hf", "data", batches=1, seq_len=SEQ)


def test_token_ids_outside_the_vocabulary_are_refused(tmp_path, monkeypatch, fake_loader):
    import nitp_ds.evaluate as ev

    tiny_lm().save_pretrained(tmp_path / "hf")
    batch = {"input_ids": torch.full((1, SEQ), VOCAB + 5), "labels": torch.zeros(1, SEQ, dtype=torch.long)}
    monkeypatch.setattr(ev, "validation_batches", lambda *args: iter([batch]))
    with pytest.raises(NITPError, match="outside the model's vocabulary"):
        evaluate(tmp_path / "hf", "data", batches=1, seq_len=SEQ)


def test_eval_and_plot_commands_on_real_prepared_data(tmp_path):
    """End to end through `nitp prepare`'s data format, the real TokenLoader and the Typer commands."""
    from typer.testing import CliRunner

    import nitp_ds.cli.evaluate  # noqa: F401  (registers eval and plot)
    from nitp_ds.cli.main import app
    from nitp_ds.data.prepare import prepare_data

    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta"]
    gen = torch.Generator().manual_seed(3)
    docs = [" ".join(words[i] for i in torch.randint(0, 8, (60,), generator=gen).tolist()) for _ in range(40)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    manifest = prepare_data([str(tmp_path / "docs.jsonl")], tmp_path / "data", train_vocab_size=300,
                            val_fraction=0.2, num_workers=1, progress=False)
    assert manifest["vocab_size"] <= 300
    tiny_lm(vocab=300).save_pretrained(tmp_path / "hf")

    runner = CliRunner()
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", str(tmp_path / "hf"), "--data", str(tmp_path / "data"), "--batches", "2",
                                 "--seq-len", str(SEQ), "--batch-size", "2", "--sample-tokens", "32",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "val/loss_ntp" in result.output and "geometry/effective_rank" in result.output
    results = json.loads(out.read_text())
    assert results["val/tokens"] == 2 * 2 * SEQ

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": 10, **results}) + "\n")
    result = runner.invoke(app, ["plot", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "plots" / "validation.png").is_file() and (run / "plots" / "geometry.png").is_file()
