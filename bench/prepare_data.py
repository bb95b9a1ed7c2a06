"""Benchmark `prepare_data`: a >= 200 MB word-like corpus, a 32k byte-level BPE, tokens per second.

    python bench/prepare_data.py [--mb 200] [--vocab 32000] [--workers N]
                                 [--encoder cache|rust|both] [--repeats 1]

The corpus is JSONL of documents made of sentences whose words are drawn with Zipf frequencies from
a synthetic vocabulary of pronounceable words, so the BPE has realistic merges to learn. Each run
is a whole `prepare_data` (tokenizer training included). `--encoder both` alternates runs with the
word cache and with the Rust encoder alone, prints min and median of each, and checks that both
wrote the same shards (sha256).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from nitp_ds.data.prepare import prepare_data


def make_words(rng: np.random.Generator, count: int) -> list[str]:
    onsets = "b c d f g h j k l m n p r s t v w z br ch cl dr fl gr pl pr sh st th tr".split()
    vowels = "a e i o u ai ea ee io ou".split()
    words = set()
    while len(words) < count:
        syllables = rng.integers(1, 4)
        words.add("".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(syllables)))
    return sorted(words)


def write_corpus(path: Path, megabytes: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    words = np.array(make_words(rng, 20_000), dtype=object)
    ranks = np.arange(1, len(words) + 1)
    probs = 1.0 / ranks**1.1
    probs /= probs.sum()
    written = 0
    with open(path, "w") as handle:
        while written < megabytes << 20:
            picks = words[rng.choice(len(words), size=200_000, p=probs)]
            lengths = rng.integers(6, 20, size=len(picks) // 6)
            sentences, start = [], 0
            for length in lengths:
                if start + length > len(picks):
                    break
                sentence = " ".join(picks[start:start + length])
                sentences.append(sentence[0].upper() + sentence[1:] + ".")
                start += length
            for doc_start in range(0, len(sentences), 40):
                line = json.dumps({"text": " ".join(sentences[doc_start:doc_start + 40])}) + "\n"
                handle.write(line)
                written += len(line)
    return written


def run_once(corpus: Path, out: Path, args, word_cache: bool) -> dict:
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    manifest = prepare_data([f"bench={corpus}"], out, train_vocab_size=args.vocab, num_workers=args.workers,
                            tokenizer_train_bytes=args.tokenizer_train_mb << 20, progress=False, force=True,
                            word_cache=word_cache)
    total = time.perf_counter() - started
    tokens = manifest["splits"]["train"]["tokens"] + manifest["splits"]["val"]["tokens"]
    shards = [s["sha256"] for split in manifest["splits"].values() for src in split["sources"].values()
              for s in src["shards"]]
    return {"encoder": manifest["timing"]["encoder"], "tokens": tokens, "vocab": manifest["vocab_size"],
            "tokenize_s": manifest["timing"]["tokenize_seconds"], "total_s": total,
            "load": (load_before, os.getloadavg()[0]), "output": (manifest["tokenizer"]["sha256"], shards)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--tokenizer-train-mb", type=int, default=32)
    parser.add_argument("--encoder", choices=("cache", "rust", "both"), default="cache")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    variants = {"cache": [True], "rust": [False], "both": [False, True]}[args.encoder]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        started = time.perf_counter()
        size = write_corpus(corpus, args.mb)
        print(f"corpus: {size / 1e6:.0f} MB in {time.perf_counter() - started:.1f} s; cores: {os.cpu_count()}, "
              f"workers: {args.workers or os.cpu_count()}")
        runs = []
        for repeat in range(args.repeats):
            for word_cache in variants:
                run = run_once(corpus, Path(tmp) / "out", args, word_cache)
                runs.append(run)
                print(f"run {repeat + 1} {run['encoder']}: tokenize + write {run['tokenize_s']:.1f} s = "
                      f"{run['tokens'] / run['tokenize_s'] / 1e6:.2f} M tokens/s; end to end {run['total_s']:.1f} s "
                      f"= {run['tokens'] / run['total_s'] / 1e6:.2f} M tokens/s; load {run['load'][0]:.1f} -> "
                      f"{run['load'][1]:.1f}", flush=True)
    first = runs[0]
    print(f"tokens: {first['tokens']:,} ({size / first['tokens']:.2f} bytes/token), vocab {first['vocab']}, "
          f"tokenizer training sample {args.tokenizer_train_mb} MB")
    for encoder in dict.fromkeys(run["encoder"] for run in runs):
        mine = [run for run in runs if run["encoder"] == encoder]
        rates = [run["tokens"] / run["tokenize_s"] / 1e6 for run in mine]
        ends = [run["tokens"] / run["total_s"] / 1e6 for run in mine]
        print(f"{encoder}, {len(mine)} runs, M tokens/s (min / median / max): tokenize + write "
              f"{min(rates):.2f} / {statistics.median(rates):.2f} / {max(rates):.2f}; end to end "
              f"{min(ends):.2f} / {statistics.median(ends):.2f} / {max(ends):.2f}")
    if len(runs) > 1:
        same = all(run["output"] == first["output"] for run in runs)
        print(f"all runs wrote the same tokenizer and shards (sha256): {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
