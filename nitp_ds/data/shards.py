"""Writing one (split, source) stream of tokens: numbered shard files, their sha256, and docs.npy.

`TokenShardWriter` appends documents (flat tokens + lengths) and rolls over to a new shard file every
`shard_tokens` tokens; `recut` moves the boundary between two streams of one source (the
token-level val split), streaming their tokens back from disk through memory maps.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

COPY_TOKENS = 16 << 20  # tokens per read while re-cutting: bounded memory whatever the stream's size


class TokenShardWriter:
    """Appends documents to numbered shard files, hashing as it goes, and records document lengths."""

    def __init__(self, directory: Path, dtype, shard_tokens: int):
        self.directory, self.dtype, self.shard_tokens = directory, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.doc_lengths: list[np.ndarray] = []
        self.tokens = 0
        self._file = None

    @property
    def documents(self) -> int:
        return sum(len(lengths) for lengths in self.doc_lengths)

    def write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        self.doc_lengths.append(lengths)
        self._write_tokens(tokens)

    def _write_tokens(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part, tokens = tokens[:room], tokens[room:]
            data = part.tobytes()
            self._file.write(data)
            self._hash.update(data)
            self.shards[-1]["tokens"] += len(part)
            self.tokens += len(part)

    def _open_next(self) -> None:
        self._finish_shard()
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{len(self.shards):05d}.bin"
        self._file = open(self.directory / name, "wb")
        self._hash = hashlib.sha256()
        self.shards.append({"file": name, "tokens": 0})

    def _finish_shard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self.shards[-1]["bytes"] = self.shards[-1]["tokens"] * np.dtype(self.dtype).itemsize
            self.shards[-1]["sha256"] = self._hash.hexdigest()

    def lengths(self) -> np.ndarray:
        return np.concatenate(self.doc_lengths) if self.doc_lengths else np.zeros(0, dtype=np.int64)

    def read_chunks(self):
        """This stream's tokens, in order, in pieces of at most COPY_TOKENS (the writer must be finished)."""
        self._finish_shard()
        for shard in self.shards:
            tokens = np.memmap(self.directory / shard["file"], dtype=self.dtype, mode="r", shape=(shard["tokens"],))
            for start in range(0, len(tokens), COPY_TOKENS):
                yield np.asarray(tokens[start:start + COPY_TOKENS])

    def close(self, root: Path) -> dict[str, Any]:
        """Finish the last shard, write docs.npy; returns this stream's entry for the manifest."""
        self._finish_shard()
        lengths = self.lengths()
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.directory.mkdir(parents=True, exist_ok=True)
        np.save(self.directory / "docs.npy", offsets)
        rel = self.directory.relative_to(root).as_posix()
        return {"tokens": self.tokens, "documents": int(len(lengths)), "dir": rel,
                "doc_index": f"{rel}/docs.npy", "shards": self.shards}


def append_documents(writer: TokenShardWriter, tokens: np.ndarray, lengths: np.ndarray, keep: np.ndarray) -> None:
    """Append the documents of (tokens, lengths) that `keep` marks."""
    if not keep.any():
        return
    if keep.all():
        writer.write(tokens, lengths)
        return
    ends = np.cumsum(lengths)
    starts = ends - lengths
    picked = np.concatenate([tokens[s:e] for s, e in zip(starts[keep], ends[keep])])
    writer.write(picked, lengths[keep])


def recut(first: TokenShardWriter, second: TokenShardWriter,
          cut: int) -> tuple[TokenShardWriter, TokenShardWriter]:
    """The stream `first` then `second`, cut again at token `cut`: two new writers in the same directories.

    The document that straddles `cut` becomes two documents: its head (without EOS) ends the first
    stream, its tail starts the second. The old shard files are replaced.
    """
    lengths = np.concatenate([first.lengths(), second.lengths()]).astype(np.int64)
    ends = np.cumsum(lengths)
    whole = int(np.searchsorted(ends, cut, side="right"))  # documents that end at or before the cut
    head = cut - (int(ends[whole - 1]) if whole else 0)
    first_lengths = np.concatenate([lengths[:whole], [head] if head else []]).astype(np.int64)
    tail = [int(lengths[whole]) - head] if head else []
    second_lengths = np.concatenate([tail, lengths[whole + 1 if head else whole:]])

    new = [TokenShardWriter(w.directory.with_name(w.directory.name + ".recut"), w.dtype, w.shard_tokens)
           for w in (first, second)]
    new[0].doc_lengths, new[1].doc_lengths = [first_lengths], [second_lengths.astype(np.int64)]
    position = 0
    for old in (first, second):
        for chunk in old.read_chunks():
            split = min(max(cut - position, 0), len(chunk))
            new[0]._write_tokens(chunk[:split])
            new[1]._write_tokens(chunk[split:])
            position += len(chunk)
    for old, writer in zip((first, second), new):
        writer._finish_shard()
        shutil.rmtree(old.directory, ignore_errors=True)
        if writer.directory.exists():
            os.rename(writer.directory, old.directory)
        writer.directory = old.directory
    return new[0], new[1]
