"""`nitp demo`: the whole toolkit on a built-in corpus, with no download.

corpus (docstrings of the installed Python standard library) → tokenizer + prepare-data →
NITP training of a tiny Qwen3-MoE under ZeRO-3 + AutoEP with 2 processes through the `deepspeed`
launcher (GPUs if present, CPU gloo otherwise) → export to Hugging Face → eval → load the export
with transformers and generate a sample.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from nitp_ds.errors import NITPError

ROOT = Path(__file__).resolve().parent.parent
SKIP_MODULES = ("antigravity", "this", "idlelib", "tkinter", "turtle", "test", "lib2to3", "ensurepip", "venv",
                "pydoc_data", "__main__", "xxsubtype", "_")


def build_corpus(path: Path, max_documents: int = 20_000) -> int:
    """Docstrings of the standard library's public modules, classes and functions, one JSONL document each."""
    seen: set[str] = set()
    written = 0
    names = sorted(m.name for m in pkgutil.iter_modules() if m.module_finder.path.startswith(sys.base_prefix)
                   and not m.name.startswith(SKIP_MODULES))
    with path.open("w") as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            try:
                module = importlib.import_module(name)
            except BaseException:  # noqa: BLE001 - some stdlib modules refuse to import on some platforms
                continue
            objects = [module] + [getattr(module, a, None) for a in sorted(dir(module)) if not a.startswith("_")]
            for obj in objects:
                try:
                    doc = inspect.getdoc(obj)
                except Exception:  # noqa: BLE001
                    continue
                if not doc or len(doc) < 200 or doc in seen:
                    continue
                seen.add(doc)
                out.write(json.dumps({"text": doc}) + "\n")
                written += 1
                if written >= max_documents:
                    return written
    return written


def demo_recipe(out: Path, steps: int, quick: bool) -> dict[str, Any]:
    base = yaml.safe_load((ROOT / "recipes" / "debug.yaml").read_text())
    base["data"] = {"path": str(out / "data"), "seq_len": 64 if quick else 128}
    base["model"].update(hidden_size=64 if quick else 128, num_layers=4, num_heads=4, num_kv_heads=2,
                         num_experts=4, experts_per_token=2, moe_intermediate_size=64 if quick else 128,
                         intermediate_size=256, max_seq_len=256)
    base["train"].update(out_dir=str(out / "run"), steps=steps, micro_batch_size=4 if quick else 8,
                         eval_every=max(steps // 2, 1), eval_batches=4)
    base["optim"].update(lr=3e-3)
    base["schedule"].update(kind="cosine", warmup_steps=max(steps // 10, 1))
    base["checkpoint"] = {"every": 0, "keep_last": 2, "resume": "never"}
    base["logging"] = {"every": max(steps // 20, 1), "tensorboard": not quick, "expert_load": True}
    return base


def run_demo(out: str | Path = "nitp-demo", *, steps: int | None = None, quick: bool = False,
             nproc: int = 2, force: bool = False) -> dict[str, Any]:
    import torch

    console = Console(highlight=False)
    out = Path(out)
    if nproc < 1:
        raise NITPError(f"--nproc {nproc} must be at least 1 (training processes)")
    if steps is not None and steps < 1:
        raise NITPError(f"--steps {steps} must be at least 1 (omit it for the default)")
    if out.exists() and not out.is_dir():
        raise NITPError(f"demo output {out} is a file; pass --out a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise NITPError(f"demo output {out} already exists; pass --force to replace it or --out another directory")
    if out.exists() and force:
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    steps = steps if steps is not None else (12 if quick else 300)
    timings: dict[str, float] = {}
    gpu = torch.cuda.is_available()

    def stage(title: str):
        console.rule(f"[bold]{title}")
        return time.perf_counter()

    t = stage("1/5 corpus: docstrings of the Python standard library")
    corpus = out / "corpus.jsonl"
    documents = build_corpus(corpus, max_documents=1500 if quick else 20_000)
    console.print(f"{documents:,} documents → {corpus}")
    timings["corpus"] = time.perf_counter() - t

    t = stage("2/5 tokenizer + prepare-data")
    from nitp_ds.data.prepare import prepare_data

    prepare_data([str(corpus)], out / "data", train_vocab_size=512 if quick else 2048,
                 val_fraction=0.02, seed=0, progress=not quick)
    timings["prepare"] = time.perf_counter() - t

    t = stage(f"3/5 train: NITP, ZeRO-3 + AutoEP, {nproc} processes ({'GPU' if gpu else 'CPU gloo'})")
    recipe = out / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(demo_recipe(out, steps, quick), sort_keys=False))
    ds_config = ROOT / "ds_configs" / ("zero3_moe.json" if gpu else "zero3_moe_cpu.json")
    cmd = [sys.executable, "-m", "nitp_ds.cli", "train", "--config", str(recipe), "--ds-config", str(ds_config),
           "--nproc", str(nproc)]
    console.print("$ nitp train --config " + f"{recipe} --ds-config {ds_config} --nproc {nproc}")
    env = dict(os.environ)
    if not gpu:
        env.setdefault("DS_ACCELERATOR", "cpu")
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        raise NITPError(f"demo training failed with exit code {result.returncode}; see the output above")
    summary = json.loads((out / "run" / "summary.json").read_text())
    timings["train"] = time.perf_counter() - t

    t = stage("4/5 export to Hugging Face (head stripped, logits verified) + eval")
    from nitp_ds.checkpoint.export import export_checkpoint
    from nitp_ds.evaluate import evaluate

    exported = export_checkpoint(out / "run", out / "hf", dtype="fp32", verify=True, show_progress=not quick)
    metrics = evaluate(out / "hf", out / "data", batches=4, seq_len=demo_recipe(out, steps, quick)["data"]["seq_len"],
                       sample_tokens=1024, out_json=out / "eval.json")
    timings["export+eval"] = time.perf_counter() - t

    t = stage("5/5 load with transformers and generate")
    sample = generate_sample(out / "hf", "The function returns")
    console.print(f"[bold]sample:[/] {sample}")
    timings["generate"] = time.perf_counter() - t

    table = Table(title="nitp demo: summary")
    table.add_column("what")
    table.add_column("value")
    table.add_row("train NTP loss, first → last logged", f"{summary.get('first_loss_ntp', float('nan')):.3f} → "
                  f"{summary.get('loss/ntp', float('nan')):.3f}")
    table.add_row("train NITP loss (last)", f"{summary.get('loss/nitp', float('nan')):.4f}")
    table.add_row("val NTP loss / perplexity", f"{metrics['val/loss_ntp']:.3f} / {metrics['val/ppl']:.1f}")
    table.add_row("effective rank / anisotropy", f"{metrics['geometry/effective_rank']:.1f} / "
                  f"{metrics['geometry/anisotropy']:.3f}")
    table.add_row("tokens/s (last interval)", f"{summary.get('tokens_per_s', 0):,.0f}")
    table.add_row("export logits max |Δ|", f"{exported.max_abs_diff:.2e} (tolerance {exported.tolerance:.0e})")
    table.add_row("data", str(out / "data"))
    table.add_row("run (metrics, checkpoints)", str(out / "run"))
    table.add_row("Hugging Face export", str(out / "hf"))
    table.add_row("time", ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    console.print(table)
    console.print("next: [bold]nitp plot " + f"{out / 'run'} --out {out / 'plots'}[/]  ·  "
                  f"[bold]nitp eval {out / 'hf'} --data {out / 'data'}[/]  ·  "
                  f"[bold]nitp train --config recipes/debug.yaml --set data.path={out / 'data'}[/]")
    return {"summary": summary, "eval": metrics, "export": exported, "sample": sample, "out": out}


def generate_sample(hf_dir: Path, prompt: str, new_tokens: int = 30) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True)
    model.eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                                pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(output[0], skip_special_tokens=True)
