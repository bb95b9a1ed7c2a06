"""`prepare_data`: sources -> a tokenizer, flat token shards, document indexes and a manifest.

Steps, in order: parse the sources, refuse an existing output (unless `force`), load or train the
tokenizer, then stream each source's documents in batches through a pool of tokenizer processes
(`data.encode.DocumentEncoder`: a word cache for byte-level BPE, the Rust encoder otherwise),
append EOS to every document, send each document to train or val, and append it to that split's
shards. Everything is written into a hidden temporary directory beside the output, which is
renamed to the output only once the manifest is written: a killed run leaves no directory that
looks complete (only `.NAME.incomplete-PID`, which is safe to delete).

Output layout (see docs/data.md):
    manifest.json
    tokenizer/                      a Hugging Face fast tokenizer (tokenizer.json, ...)
    {train,val}/{source}/00000.bin  tokens, uint16 or uint32, documents back to back, each ending in EOS
    {train,val}/{source}/docs.npy   int64 document start offsets into that stream, plus its length

The val split takes whole documents, or tokens for a source with too few documents (data/split.py).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from nitp_ds.data.encode import DocumentEncoder
from nitp_ds.data.shards import TokenShardWriter, append_documents
from nitp_ds.data.sources import TXT_DOCUMENTS, ReadStats, SourceSpec, iter_documents, parse_source
from nitp_ds.data.split import DocumentSplitter, settle_split
from nitp_ds.data.tokenizer import (load_tokenizer, save_tokenizer, tokenizer_sha256, train_tokenizer,
                                    vocab_size_of)
from nitp_ds.errors import NITPError
from nitp_ds.files import replace_dir

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
BATCH_CHARS = 4 << 20  # text per tokenizer task: large enough to amortise the IPC, small enough to stream


def prepare_data(
    sources: list[str | SourceSpec],
    out_dir: str | Path,
    *,
    tokenizer: str | Path | None = None,
    train_vocab_size: int | None = None,
    text_key: str = "text",
    txt_documents: str = "paragraphs",
    val_fraction: float = 0.005,
    val_tokens: int | None = None,
    seed: int = 0,
    num_workers: int | None = None,
    dtype: str = "auto",
    shard_tokens: int = 1 << 30,
    tokenizer_train_bytes: int = 256 << 20,
    force: bool = False,
    progress: bool = True,
    word_cache: bool = True,
) -> dict[str, Any]:
    """Tokenize `sources` into a data directory at `out_dir`; returns its manifest.

    `txt_documents`: how `.txt` files become documents, "paragraphs" (cut at blank lines) or "files"
    (see data/sources.py). `word_cache=False` encodes with the Rust tokenizer alone (same ids,
    slower; see data/encode.py).
    """
    specs = [s if isinstance(s, SourceSpec) else parse_source(s) for s in sources]
    _check_arguments(specs, tokenizer, train_vocab_size, val_fraction, val_tokens, dtype, shard_tokens)
    if txt_documents not in TXT_DOCUMENTS:
        raise NITPError(f"--txt-documents {txt_documents!r} is not one of {', '.join(TXT_DOCUMENTS)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise NITPError(f"output {out_dir} already exists; pass --force to replace it (or choose another --out)")
    args = dict(sources=[asdict(s) for s in specs], out_dir=str(out_dir), tokenizer=str(tokenizer) if tokenizer else None,
                train_vocab_size=train_vocab_size, text_key=text_key, txt_documents=txt_documents,
                val_fraction=val_fraction, val_tokens=val_tokens, seed=seed, dtype=dtype, shard_tokens=shard_tokens)

    tmp_dir = out_dir.parent / f".{out_dir.name}.incomplete-{os.getpid()}"
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir()
    except OSError as exc:
        raise NITPError(f"cannot create the output {out_dir} ({exc.strerror}: {exc.filename}); "
                        "choose a writable --out") from None
    try:
        manifest = _prepare_into(tmp_dir, specs, args, text_key, num_workers, progress, tokenizer_train_bytes,
                                 word_cache)
        replace_dir(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return manifest


def _check_arguments(specs, tokenizer, train_vocab_size, val_fraction, val_tokens, dtype, shard_tokens) -> None:
    if not specs:
        raise NITPError("no --source given; pass at least one, e.g. --source data/corpus.jsonl")
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise NITPError(f"source name {duplicates[0]!r} is used twice; name them apart with --source NAME=INPUT")
    if (tokenizer is None) == (train_vocab_size is None):
        raise NITPError("pass exactly one of --tokenizer DIR (a local Hugging Face tokenizer) "
                        "and --train-tokenizer VOCAB_SIZE")
    if val_tokens is not None:
        if val_tokens < 0:
            raise NITPError(f"--val-tokens {val_tokens} is negative; pass 0 or more")
    elif not 0.0 <= val_fraction < 1.0:
        raise NITPError(f"--val-fraction {val_fraction} is outside [0, 1); pass e.g. 0.005")
    if dtype not in ("auto", *DTYPES):
        raise NITPError(f"--dtype {dtype!r} is not one of auto, uint16, uint32")
    if shard_tokens < 1:
        raise NITPError(f"shard_tokens {shard_tokens} must be positive")


def _prepare_into(tmp_dir: Path, specs: list[SourceSpec], args: dict, text_key: str, num_workers: int | None,
                  progress: bool, tokenizer_train_bytes: int, word_cache: bool) -> dict[str, Any]:
    started = time.perf_counter()
    tokenizer, tokenizer_source = _tokenizer_for(specs, args, text_key, tokenizer_train_bytes)
    tokenizer_dir = save_tokenizer(tokenizer, tmp_dir / "tokenizer")
    vocab_size = vocab_size_of(tokenizer)
    dtype = _choose_dtype(args["dtype"], vocab_size)
    eos_id = int(tokenizer.eos_token_id)
    del tokenizer  # workers load tokenizer.json themselves

    writers = {(split, s.name): TokenShardWriter(tmp_dir / split / s.name, dtype, args["shard_tokens"])
               for split in SPLITS for s in specs}
    read_stats = {s.name: ReadStats() for s in specs}
    split_by: dict[str, dict] = {}
    total_weight = sum(s.weight for s in specs)
    with _Encoder(tokenizer_dir / "tokenizer.json", eos_id, dtype, num_workers, word_cache) as encoder, \
            _Progress(progress) as bar:
        tokenize_started = time.perf_counter()
        for index, spec in enumerate(specs):
            bar.start_source(spec.name)
            splitter = DocumentSplitter(args, index, spec.weight / total_weight)
            documents = iter_documents(spec, text_key, read_stats[spec.name], args["txt_documents"])
            train, val = writers[("train", spec.name)], writers[("val", spec.name)]
            for tokens, lengths in encoder.encode(_text_batches(documents)):
                to_val = splitter.assign(lengths)
                append_documents(train, tokens, lengths, ~to_val)
                append_documents(val, tokens, lengths, to_val)
                bar.advance(len(lengths), len(tokens))
            _check_source(spec, read_stats[spec.name])
            train, val, split_by[spec.name] = settle_split(spec.name, splitter, train, val)
            writers[("train", spec.name)], writers[("val", spec.name)] = train, val
        tokenize_seconds = time.perf_counter() - tokenize_started

    splits = {}
    for split in SPLITS:
        per_source = {name: writers[(split, name)].close(tmp_dir) for name in [s.name for s in specs]}
        splits[split] = {"tokens": sum(p["tokens"] for p in per_source.values()),
                         "documents": sum(p["documents"] for p in per_source.values()),
                         "sources": per_source}
    total_tokens = splits["train"]["tokens"] + splits["val"]["tokens"]
    manifest = {
        "format": "nitp-ds-tokens",
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tokenizer": {"source": tokenizer_source, "dir": "tokenizer", "sha256": tokenizer_sha256(tokenizer_dir),
                      "vocab_size": vocab_size, "eos_token_id": eos_id},
        "vocab_size": vocab_size,
        "eos_token_id": eos_id,
        "dtype": np.dtype(dtype).name,
        "sources": [{**asdict(s), "read": asdict(read_stats[s.name]), "split": split_by[s.name]} for s in specs],
        "splits": splits,
        "args": args,
        "timing": {"seconds": round(time.perf_counter() - started, 3),
                   "tokenize_seconds": round(tokenize_seconds, 3),
                   "tokens_per_second": round(total_tokens / max(tokenize_seconds, 1e-9)),
                   "encoder": encoder.description},
    }
    (tmp_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _tokenizer_for(specs, args, text_key, train_bytes):
    if args["tokenizer"] is not None:
        return load_tokenizer(args["tokenizer"]), str(Path(args["tokenizer"]).resolve())
    budget = train_bytes // len(specs)  # every source gets its share of the training text

    def sample() -> Iterator[str]:
        for spec in specs:
            used = 0
            for text in iter_documents(spec, text_key, ReadStats(), args["txt_documents"]):
                yield text
                used += len(text)
                if used >= budget:
                    break

    vocab = args["train_vocab_size"]
    return train_tokenizer(sample(), vocab), f"trained byte-level BPE, vocab {vocab}"


def _choose_dtype(asked: str, vocab_size: int):
    if asked == "auto":
        return np.uint16 if vocab_size <= 1 << 16 else np.uint32
    limit = np.iinfo(DTYPES[asked]).max + 1
    if vocab_size > limit:
        raise NITPError(f"vocabulary of {vocab_size} tokens does not fit --dtype {asked} (at most {limit}); "
                        "use --dtype uint32 or auto")
    return DTYPES[asked]


def _check_source(spec: SourceSpec, stats: ReadStats) -> None:
    if stats.documents == 0:
        raise NITPError(f"source {spec.name!r} ({spec.input}) has no documents (empty corpus: files empty or blank); "
                        "add text or drop that --source")


# ---------------------------------------------------------------------------------------------
# Tokenizing: batches of text -> a pool of processes -> (flat tokens with EOS, document lengths)
# ---------------------------------------------------------------------------------------------


def _text_batches(documents: Iterator[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for text in documents:
        batch.append(text)
        chars += len(text)
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


_worker_state: dict[str, Any] = {}


def _worker_init(tokenizer_json: str, eos_id: int, dtype, word_cache: bool) -> None:
    _worker_state["encoder"] = DocumentEncoder(tokenizer_json, eos_id, dtype, word_cache)


def _encode_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _worker_state["encoder"].encode(texts)


class _Encoder:
    """A pool of tokenizer processes (in-process when num_workers <= 1), results in input order."""

    def __init__(self, tokenizer_json: Path, eos_id: int, dtype, num_workers: int | None, word_cache: bool):
        self.num_workers = (os.cpu_count() or 1) if num_workers is None else num_workers
        self.init_args = (str(tokenizer_json), eos_id, dtype, word_cache)
        self.pool = None

    def __enter__(self) -> "_Encoder":
        if self.num_workers > 1:
            # One process per core; each encodes sequentially, so the Rust thread pool stays off.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        _worker_init(*self.init_args)  # in this process too: it encodes when num_workers <= 1, and says how
        self.description = _worker_state["encoder"].description
        if self.num_workers > 1:
            self.pool = multiprocessing.get_context("fork").Pool(self.num_workers, _worker_init, self.init_args)
        return self

    def encode(self, batches: Iterator[list[str]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self.pool is None:
            return map(_encode_batch, batches)
        return self.pool.imap(_encode_batch, batches)

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


# ---------------------------------------------------------------------------------------------
# Progress: documents, tokens, tokens/s (rich)
# ---------------------------------------------------------------------------------------------


class _Progress:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.documents = self.tokens = 0

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"),
                                     TextColumn("{task.fields[documents]:,} docs"),
                                     TextColumn("{task.fields[tokens]:,} tokens"),
                                     TextColumn("{task.fields[rate]:.2f} M tokens/s"), TimeElapsedColumn())
            self.progress.__enter__()
            self.task = self.progress.add_task("tokenizing", documents=0, tokens=0, rate=0.0)
            self.started = time.perf_counter()
        return self

    def start_source(self, name: str) -> None:
        if self.enabled:
            self.progress.update(self.task, description=f"tokenizing {name}")

    def advance(self, documents: int, tokens: int) -> None:
        self.documents += documents
        self.tokens += tokens
        if self.enabled:
            rate = self.tokens / max(time.perf_counter() - self.started, 1e-9) / 1e6
            self.progress.update(self.task, documents=self.documents, tokens=self.tokens, rate=rate)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.progress.__exit__(*exc)
