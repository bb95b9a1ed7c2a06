"""The NITP study: NTP vs NITP on real text, same seed, data order and tokens; geometry and loss report.

Stages (each a subcommand; `all` runs them in order):
  corpus   the Python source files installed with the toolkit (the standard library and the packages of the
           environment: code, docstrings and comments; PSF/BSD/Apache/MIT licences), one JSONL document per
           file, sampled deterministically to about --corpus-mb megabytes
  prepare  `nitp prepare-data` with a byte-level BPE trained on the corpus (--vocab)
  train    both arms with `nitp train` (one process each; on one GPU the two arms share it and run at
           the same time): `ntp` = λ 0 without head, `nitp` = the recipe's default SwiGLU head, λ 1.
           Re-running continues from each arm's latest checkpoint up to --steps.
  report   `nitp eval` on each arm's latest checkpoint (val loss, perplexity, geometry per layer) and
           `nitp plot`, then a markdown table in OUT/report.md
Everything lands under --out (default runs/study). The exact commands and results are in docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import sysconfig
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "study_qwen3_moe.yaml"
ARMS = {"ntp": ["nitp.head=none", "nitp.weight=0"], "nitp": []}


def build_corpus(path: Path, megabytes: float) -> dict:
    """Every .py file under the stdlib and site-packages, kept when crc32(relative path) falls under a
    threshold chosen to hit the size: deterministic for a given environment, and spread over packages."""
    roots = sorted({sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]})
    files = []
    for root in roots:
        for d, dirs, names in os.walk(root):
            dirs[:] = sorted(x for x in dirs if x not in ("__pycache__", "test", "tests", "idle_test"))
            for name in sorted(names):
                if name.endswith(".py"):
                    full = Path(d) / name
                    size = full.stat().st_size
                    if 200 <= size <= 400_000:
                        files.append((zlib.crc32(str(full.relative_to(root)).encode()) / 2**32, size, full))
    total = sum(size for _, size, _ in files)
    keep = min(1.0, megabytes * 1e6 / max(total, 1))
    written = documents = 0
    with path.open("w") as out:
        for key, size, full in files:
            if key >= keep:
                continue
            text = full.read_text(encoding="utf-8", errors="replace")
            out.write(json.dumps({"text": text}) + "\n")
            written += size
            documents += 1
    return {"documents": documents, "bytes": written, "candidates": len(files), "fraction": keep}


def nitp(*args: str, env: dict | None = None) -> None:
    cmd = [sys.executable, "-c", "from nitp_ds.cli.main import main; main()", *args]
    print("$ nitp " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, **(env or {})})


def train_arms(args) -> None:
    """Both arms at once (each one process on the same GPU), or one after the other with --sequential."""
    procs = []
    for arm, sets in ARMS.items():
        if args.arms and arm not in args.arms:
            continue
        cmd = [sys.executable, "-c", "from nitp_ds.cli.main import main; main()", "train", "--config", str(RECIPE),
               "--ds-config", args.ds_config, "--set", f"data.path={args.out / 'data'}",
               "--set", f"train.out_dir={args.out / arm}", "--set", f"train.steps={args.steps}"]
        for s in sets + args.set:
            cmd += ["--set", s]
        print("$ nitp " + " ".join(cmd[3:]), flush=True)
        log = open(args.out / f"{arm}.log", "a")
        procs.append((arm, subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)))
        if args.sequential:
            procs[-1][1].wait()
    # A stop (SIGTERM, e.g. from `timeout`) is passed on: each arm saves a checkpoint and exits 0,
    # and the next `train` continues from it.
    signal.signal(signal.SIGTERM, lambda *_: [p.send_signal(signal.SIGTERM) for _, p in procs if p.poll() is None])
    failed = [arm for arm, p in procs if p.wait() != 0]
    for arm, _ in procs:
        tail = (args.out / f"{arm}.log").read_text().splitlines()[-4:]
        print(f"--- {arm}.log (tail)\n" + "\n".join(tail), flush=True)
    if failed:
        raise SystemExit(f"arms failed: {failed}")


def report(args) -> None:
    rows = {}
    for arm in ARMS:
        run = args.out / arm
        if not (run / "checkpoints" / "latest").exists():
            continue
        nitp("convert", str(run), "--out", str(args.out / f"converted_{arm}"), "--force")
        nitp("eval", str(args.out / f"converted_{arm}"), "--data", str(args.out / "data"), "--tokens",
             str(args.eval_tokens), "--seq-len", str(args.seq_len), "--per-layer", "--out",
             str(args.out / f"eval_{arm}.json"))
        if not args.no_plot:
            nitp("plot", str(run), "--out", str(args.out / f"plots_{arm}"))
        rows[arm] = json.loads((args.out / f"eval_{arm}.json").read_text())
        summary = run / "summary.json"
        if summary.exists():
            rows[arm]["summary"] = json.loads(summary.read_text())
    if len(rows) == 2 and not args.no_plot:
        nitp("plot", str(args.out / "ntp"), str(args.out / "nitp"), "--out", str(args.out / "plots_compare"))
    lines = ["| arm | val NTP loss | val ppl | eff. rank (last) | anisotropy (last) | tokens |", "|---|---|---|---|---|---|"]
    for arm, r in rows.items():
        lines.append(f"| {arm} | {r.get('val/loss_ntp', float('nan')):.4f} | {r.get('val/ppl', float('nan')):.2f} | "
                     f"{r.get('geometry/effective_rank', float('nan')):.1f} | {r.get('geometry/anisotropy', float('nan')):.3f} | "
                     f"{r.get('summary', {}).get('consumed_tokens', 0):,} |")
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["corpus", "prepare", "train", "report", "all"])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "study")
    parser.add_argument("--corpus-mb", type=float, default=45.0)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--ds-config", default="ds_configs/zero3_moe.json")
    parser.add_argument("--arms", nargs="*", default=[])
    parser.add_argument("--sequential", action="store_true")
    parser.add_argument("--eval-tokens", type=int, default=1_000_000, help="cap on scored val tokens")
    parser.add_argument("--seq-len", type=int, default=1024, help="eval sequence length (the recipe's)")
    parser.add_argument("--no-plot", action="store_true", help="skip `nitp plot` (e.g. where matplotlib is absent)")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage in ("corpus", "all"):
        print(json.dumps(build_corpus(args.out / "corpus.jsonl", args.corpus_mb)), flush=True)
    if args.stage in ("prepare", "all"):
        nitp("prepare-data", "--source", f"python={args.out / 'corpus.jsonl'}", "--out", str(args.out / "data"),
             "--train-tokenizer", str(args.vocab), "--val-fraction", "0.01", "--force", "--no-progress")
    if args.stage in ("train", "all"):
        train_arms(args)
    if args.stage in ("report", "all"):
        report(args)


if __name__ == "__main__":
    main()
