"""`nitp demo --quick`: the README's main job, end to end."""

import subprocess
import sys

from runs import REPO, child_env


def test_demo_quick_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "nitp_ds.cli", "demo", "--quick", "--out", str(out)],
                            env=child_env(), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nitp demo: summary" in result.stdout
    assert (out / "hf" / "config.json").is_file() and (out / "hf" / "model.safetensors.index.json").exists() or \
        any((out / "hf").glob("*.safetensors"))
    assert not any("nitp_head" in p.name for p in (out / "hf").iterdir())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "hf", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out / "hf", local_files_only=True)
    assert model.config.vocab_size >= len(tokenizer)
    assert (out / "eval.json").is_file()


def test_demo_refuses_an_existing_output(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = subprocess.run([sys.executable, "-m", "nitp_ds.cli", "demo", "--quick", "--out", str(out)],
                            env=child_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "already exists; pass --force" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"
