"""`nitp demo`: the whole toolkit on a built-in corpus, with no download.

corpus (the installed Python standard library's docstrings and Language Reference topics) →
tokenizer + prepare-data → NITP training of a tiny Qwen3-MoE under ZeRO-3 + AutoEP with 2 processes
through the `deepspeed` launcher (GPUs if present, CPU gloo otherwise) → export to Hugging Face →
eval → load the export with transformers and generate a sample.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from nitp_ds.errors import NITPError
from nitp_ds.files import replace_dir

ROOT = Path(__file__).resolve().parent.parent
# Modules that are not documentation, or that act when imported (`this` prints, `antigravity` opens a browser,
# `rlcompleter` installs a readline completer, `__main__` modules run their program, `distutils` is
# replaced by setuptools' copy). Names starting with "_" are private or, like `__phello__`, print.
SKIP_MODULES = frozenset({"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "tests",
                          "idle_test", "lib2to3", "ensurepip", "venv", "pydoc_data", "distutils", "readline",
                          "rlcompleter", "xxsubtype", "xxlimited", "xxlimited_35", "__main__"})
MIN_DOC_CHARS = 200  # shorter docstrings are mostly one-line stubs


def build_corpus(path: Path, max_documents: int | None = None) -> int:
    """Write the demo corpus to `path` as JSONL, one `{"text": ...}` per document; returns the count.

    The documents, in a fixed order: the docstrings of every importable public standard-library module
    and submodule and of their public classes, methods and functions (each text once), then the
    Language Reference topics that `help()` shows (`pydoc_data.topics`). The same Python gives the
    same bytes.
    """
    return write_documents(path, stdlib_documents(), max_documents)


def write_documents(path: Path, texts: Iterable[str], max_documents: int | None = None) -> int:
    """Write `texts` to `path` as JSONL, one `{"text": ...}` per line, at most `max_documents`; returns the count."""
    written = 0
    with path.open("w") as out:
        for text in texts:
            out.write(json.dumps({"text": text}) + "\n")
            written += 1
            if max_documents is not None and written >= max_documents:
                break
    return written


def stdlib_documents() -> Iterator[str]:
    objects = (obj for module in _stdlib_modules() for obj in _documented_objects(module))
    yield from docstrings(objects, MIN_DOC_CHARS)
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name].strip()


def module_documents(names: Iterable[str], min_chars: int) -> Iterator[str]:
    """The docstrings of the public functions and classes defined or imported at the top of the named modules
    (no submodules, no methods): a small corpus, e.g. the tests' (tests/runs.py)."""
    def objects() -> Iterator[Any]:
        for name in names:
            for attr, obj in sorted(vars(importlib.import_module(name)).items()):
                if not attr.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj)):
                    yield obj

    yield from docstrings(objects(), min_chars)


def docstrings(objects: Iterable[Any], min_chars: int) -> Iterator[str]:
    """Each object's docstring of at least `min_chars` characters, each text once, in the objects' order."""
    seen: set[str] = set()
    for obj in objects:
        try:
            doc = inspect.getdoc(obj)
        except Exception:  # noqa: BLE001 - a few objects' __doc__ raise
            continue
        if doc and len(doc) >= min_chars and doc not in seen:
            seen.add(doc)
            yield doc


def _stdlib_modules() -> list[ModuleType]:
    modules: dict[str, ModuleType] = {}

    def add(name: str) -> None:
        # pkgutil.walk_packages would import the packages it skips (e.g. ctypes.test) to look inside them
        if any(part in SKIP_MODULES or part.startswith("_") for part in name.split(".")):
            return
        module = _import(name)
        if module is None:
            return
        modules[name] = module
        for info in pkgutil.iter_modules(getattr(module, "__path__", None) or [], name + "."):
            add(info.name)

    # The warnings are deprecations of old modules; stdout is caught in case some Python's module prints.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for top in sorted(sys.stdlib_module_names):
            add(top)
    return [modules[name] for name in sorted(modules)]


def _import(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except BaseException:  # noqa: BLE001 - some stdlib modules refuse to import on some platforms
        return None


def _documented_objects(module: ModuleType) -> Iterator[Any]:
    yield module
    for name in sorted(dir(module)):
        if name.startswith("_"):
            continue
        obj = getattr(module, name, None)
        yield obj
        if inspect.isclass(obj) and getattr(obj, "__module__", None) == module.__name__:
            # vars(), not getattr(): no descriptor runs; properties and classmethods carry their function's doc
            yield from (member for key, member in sorted(vars(obj).items()) if not key.startswith("_"))


def demo_recipe(out: Path, steps: int, quick: bool) -> dict[str, Any]:
    base = yaml.safe_load((ROOT / "recipes" / "debug.yaml").read_text())
    base["data"] = {"path": str(out / "data"), "seq_len": 64 if quick else 128}
    base["model"].update(hidden_size=64 if quick else 128, num_layers=4, num_heads=4, num_kv_heads=2,
                         num_experts=4, experts_per_token=2, moe_intermediate_size=64 if quick else 128,
                         intermediate_size=256, max_seq_len=256)
    base["train"].update(out_dir=str(out / "run"), steps=steps, micro_batch_size=4 if quick else 8,
                         eval_every=max(steps // 2, 1))
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
        empty = out.parent / f".{out.name}.new-{os.getpid()}"  # mkdir, not mkdtemp: the usual permissions
        empty.mkdir()
        replace_dir(empty, out)
    out.mkdir(parents=True, exist_ok=True)
    steps = steps if steps is not None else (12 if quick else 300)
    timings: dict[str, float] = {}
    gpu = torch.cuda.is_available()

    def stage(title: str):
        console.rule(f"[bold]{title}")
        return time.perf_counter()

    t = stage("1/5 corpus: the Python standard library's docstrings and reference topics")
    corpus = out / "corpus.jsonl"
    documents = build_corpus(corpus, max_documents=1000 if quick else None)
    corpus_size = f"{documents:,} documents, {corpus.stat().st_size / 1e6:.1f} MB"
    console.print(f"{corpus_size} → {corpus}")
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
        # Otherwise each process takes one thread per core: on 2 cores the quick run's steps were ~20x slower
        # (the deepspeed launcher, unlike torchrun, leaves OMP_NUM_THREADS unset).
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        env.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        raise NITPError(f"demo training failed with exit code {result.returncode}; see the output above")
    summary = json.loads((out / "run" / "summary.json").read_text())
    timings["train"] = time.perf_counter() - t

    t = stage("4/5 export to Hugging Face (head stripped, logits verified) + eval")
    from nitp_ds.checkpoint.export import export_checkpoint
    from nitp_ds.evaluate import evaluate

    exported = export_checkpoint(out / "run", out / "hf", dtype="fp32", verify=True, show_progress=not quick)
    metrics = evaluate(out / "hf", out / "data", seq_len=demo_recipe(out, steps, quick)["data"]["seq_len"],
                       sample_tokens=1024, out_json=out / "eval.json")
    timings["export+eval"] = time.perf_counter() - t

    t = stage("5/5 load with transformers and generate")
    sample = generate_sample(out / "hf", "The function returns")
    console.print(f"[bold]sample:[/] {sample}")
    timings["generate"] = time.perf_counter() - t

    table = Table(title="nitp demo: summary")
    table.add_column("what")
    table.add_column("value")
    table.add_row("train NTP loss, first → last", f"{summary.get('first_loss_ntp', float('nan')):.3f} → "
                  f"{summary.get('loss/ntp', float('nan')):.3f}")
    table.add_row("train NITP loss (last)", f"{summary.get('loss/nitp', float('nan')):.4f}")
    table.add_row("val NTP loss / perplexity", f"{metrics['val/loss_ntp']:.3f} / {metrics['val/ppl']:.1f}")
    table.add_row("effective rank / anisotropy", f"{metrics['geometry/effective_rank']:.1f} / "
                  f"{metrics['geometry/anisotropy']:.3f}")
    table.add_row(f"tokens/s ({nproc} processes, last)", f"{summary.get('tokens_per_s', 0):,.0f}")
    check = exported.verification
    table.add_row("export verified: KL, top-1", f"{check.kl:.1e} nats, {check.top1_agreement:.1%} same next token")
    table.add_row("corpus", f"{corpus}\n{corpus_size}")
    table.add_row("data, tokenizer", str(out / "data"))
    table.add_row("run (metrics, checkpoints)", str(out / "run"))
    table.add_row("Hugging Face export", str(out / "hf"))
    table.add_row("eval (JSON)", str(out / "eval.json"))
    table.add_row("time", ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
                  + f"; total {sum(timings.values()):.0f}s")
    console.print(table)
    console.print("next:\n"
                  f"  nitp plot {out / 'run'} --out {out / 'plots'}\n"
                  f"  nitp eval {out / 'run'}\n"
                  "  # the same run without NITP, then both runs' curves overlaid:\n"
                  f"  nitp train --config {recipe} --ds-config {ds_config} --nproc {nproc} "
                  f"--set nitp.weight=0 --set nitp.head=none --set train.out_dir={out / 'run-ntp'}\n"
                  f"  nitp plot {out / 'run'} {out / 'run-ntp'} --out {out / 'plots'}", soft_wrap=True)
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
