"""Benchmark `prepare_data`: a >= 200 MB word-like corpus, a 32k byte-level BPE, tokens per second.

    python bench/prepare_data.py [--mb 200] [--vocab 32000] [--workers N]

The corpus is JSONL of documents made of sentences whose words are drawn with Zipf frequencies from
a synthetic vocabulary of pronounceable words, so the BPE has realistic merges to learn.
"""

from __future__ import annotations

import argparse
import json
import os
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--tokenizer-train-mb", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        started = time.perf_counter()
        size = write_corpus(corpus, args.mb)
        print(f"corpus: {size / 1e6:.0f} MB in {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        manifest = prepare_data([f"bench={corpus}"], Path(tmp) / "out", train_vocab_size=args.vocab,
                                num_workers=args.workers, tokenizer_train_bytes=args.tokenizer_train_mb << 20,
                                progress=False)
        total = time.perf_counter() - started
        timing = manifest["timing"]
        tokens = manifest["splits"]["train"]["tokens"] + manifest["splits"]["val"]["tokens"]
        print(f"cores: {os.cpu_count()}, workers: {args.workers or os.cpu_count()}, vocab: {manifest['vocab_size']}")
        print(f"tokens: {tokens:,} ({size / tokens:.2f} bytes/token)")
        print(f"tokenizer training ({args.tokenizer_train_mb} MB sample) + setup: {total - timing['tokenize_seconds']:.1f} s")
        print(f"tokenize + write: {timing['tokenize_seconds']:.1f} s = {timing['tokens_per_second'] / 1e6:.2f} M tokens/s")
        print(f"end to end: {total:.1f} s = {tokens / total / 1e6:.2f} M tokens/s")


if __name__ == "__main__":
    main()
