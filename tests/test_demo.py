"""`nitp demo --quick`: the README's main job, end to end."""

import json
import math
import subprocess
import sys

from runs import REPO, child_env, third_party_noise


def test_demo_quick_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "nitp_ds.cli", "demo", "--quick", "--out", str(out)],
                            env=child_env(), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nitp demo: summary" in result.stdout
    # A quiet console: train (launcher + 2 ranks), export, eval and generate add no third-party lines.
    assert third_party_noise(result.stdout + result.stderr) == []
    assert (out / "hf" / "config.json").is_file() and (out / "hf" / "model.safetensors.index.json").exists() or \
        any((out / "hf").glob("*.safetensors"))
    assert not any("nitp_head" in p.name for p in (out / "hf").iterdir())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "hf", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out / "hf", local_files_only=True)
    assert model.config.vocab_size >= len(tokenizer)
    assert (out / "eval.json").is_file()

    # What README's demo paragraph promises of the quick run: its five stages, a training run that lowers the
    # next-token loss, and a summary with the train loss first -> last, the validation loss and perplexity,
    # effective rank and anisotropy, tokens/s, where each output is and the time of each stage.
    for stage in ("1/5 corpus", "2/5 tokenizer + prepare-data", "3/5 train", "4/5 export", "5/5 load"):
        assert stage in result.stdout
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 12  # --quick: 12 steps
    assert summary["loss/ntp"] < summary["first_loss_ntp"]
    assert f"{summary['first_loss_ntp']:.3f} → {summary['loss/ntp']:.3f}" in result.stdout
    metrics = json.loads((out / "eval.json").read_text())
    assert all(math.isfinite(metrics[key]) for key in ("val/loss_ntp", "val/ppl", "geometry/effective_rank",
                                                        "geometry/anisotropy"))
    assert f"{metrics['val/loss_ntp']:.3f} / {metrics['val/ppl']:.1f}" in result.stdout
    for row in ("effective rank / anisotropy", "tokens/s", "export verified: KL, top-1", "corpus", "time"):
        assert row in result.stdout
    assert (out / "corpus.jsonl").is_file() and (out / "data").is_dir() and (out / "run" / "checkpoints").is_dir()
    assert f"nitp plot {out / 'run'}" in result.stdout  # the next commands to try


def test_demo_refuses_an_existing_output(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = subprocess.run([sys.executable, "-m", "nitp_ds.cli", "demo", "--quick", "--out", str(out)],
                            env=child_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "already exists; pass --force" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_corpus_walks_submodules_and_is_identical_across_processes(tmp_path):
    # Each build in its own interpreter (it imports the whole standard library) with its own hash seed:
    # the order must come from sorting, not from sets or from what happened to be imported first.
    paths = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for seed, path in zip(("1", "2"), paths):
        code = f"from pathlib import Path; from nitp_ds.demo import build_corpus; build_corpus(Path({str(path)!r}))"
        subprocess.run([sys.executable, "-c", code], env=child_env(PYTHONHASHSEED=seed), cwd=REPO, check=True,
                       timeout=120)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    text = paths[0].read_text()
    # top-level modules alone gave 850-1050 documents (~0.6 MB); submodules and the reference topics add more
    assert len(text.splitlines()) > 1300 and len(text) > 1_000_000
    assert "Lightweight XML support for Python" in text  # xml.etree.ElementTree, a submodule
    assert "Assert statements are a convenient way" in text  # pydoc_data.topics["assert"]
