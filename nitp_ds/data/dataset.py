"""Reading a prepared data directory during training: `open_data`, `TokenLoader`, `check_vocab`.

Samples. Each (split, source) stream of tokens (documents back to back, EOS after each) is cut
into windows of T+1 tokens with stride T: window w covers tokens [w*T, w*T + T + 1). A sample is
one window; inputs are its first T tokens, labels its last T (no -100 anywhere: there is no
padding). Within a source, windows are visited in a permutation drawn from (seed, source, epoch);
a source that runs out starts its next epoch with a new permutation (val is not shuffled).

Blending. Global sample g comes from the source given by a fixed schedule of period
BLEND_PERIOD: source s appears round(w_s * BLEND_PERIOD) times per period, spread evenly (smooth
weighted round robin), so any prefix of the sample sequence realizes the weights to within about
one sample per period: token proportions match the weights to ~1e-4. Everything is a pure function
of g, so the loader's whole position is one integer.

Data parallelism. Rank r of W takes global samples r, r+W, r+2W, ...; its micro-batch j holds its
samples j*B .. j*B+B-1. Step j of all ranks together covers global samples [j*B*W, (j+1)*B*W):
the same tokens whatever W is, and `load_state_dict` can resume at another world size when the
consumed sample count divides.

Checks. `open_data` always checks the manifest, and that every shard exists with the size the
manifest gives (cheap); `verify=True` also re-hashes every shard with sha256 (about 1 GB/s).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nitp_ds.data.prepare import FORMAT_VERSION, MANIFEST
from nitp_ds.errors import NITPError

BLEND_PERIOD = 10_000
STATE_VERSION = 1


# ---------------------------------------------------------------------------------------------
# The directory
# ---------------------------------------------------------------------------------------------


class DataDir:
    """A validated data directory written by `nitp prepare-data`."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest
        self.vocab_size = int(manifest["vocab_size"])
        self.eos_token_id = int(manifest["eos_token_id"])
        self.dtype = np.dtype(manifest["dtype"])
        tokenizer_dir = path / manifest.get("tokenizer", {}).get("dir", "tokenizer")
        self.tokenizer_dir: Path | None = tokenizer_dir if (tokenizer_dir / "tokenizer.json").is_file() else None
        self.source_names: list[str] = [s["name"] for s in manifest["sources"]]
        self.default_weights: dict[str, float] = {s["name"]: float(s["weight"]) for s in manifest["sources"]}
        self._streams: dict[tuple[str, str], TokenStream] = {}

    def num_tokens(self, split: str) -> int:
        return int(self._split(split)["tokens"])

    def num_documents(self, split: str) -> int:
        return int(self._split(split)["documents"])

    def source_tokens(self, split: str, source: str) -> int:
        return int(self._split(split)["sources"][source]["tokens"])

    def stream(self, split: str, source: str) -> "TokenStream":
        key = (split, source)
        if key not in self._streams:
            entry = self._split(split)["sources"][source]
            self._streams[key] = TokenStream(self.path / entry["dir"], entry["shards"], self.dtype)
        return self._streams[key]

    def document_offsets(self, split: str, source: str) -> np.ndarray:
        """Start offset of every document in that stream, plus the stream's length."""
        return np.load(self.path / self._split(split)["sources"][source]["doc_index"])

    def shard_paths(self):
        for split, entry in self.manifest["splits"].items():
            for source in entry["sources"].values():
                for shard in source["shards"]:
                    yield self.path / source["dir"] / shard["file"], shard

    def verify_sizes(self) -> None:
        for file, shard in self.shard_paths():
            if not file.is_file():
                raise NITPError(f"shard {file} is missing; re-run nitp prepare-data for {self.path}")
            if file.stat().st_size != shard["bytes"]:
                raise NITPError(f"shard {file} has {file.stat().st_size} bytes, the manifest says {shard['bytes']}; "
                                f"the data is truncated or changed, re-run nitp prepare-data for {self.path}")

    def verify_checksums(self) -> None:
        """Re-hash every shard; NITPError naming the first whose sha256 differs from the manifest."""
        self.verify_sizes()
        for file, shard in self.shard_paths():
            digest = hashlib.sha256()
            with open(file, "rb") as handle:
                while chunk := handle.read(16 << 20):
                    digest.update(chunk)
            if digest.hexdigest() != shard["sha256"]:
                raise NITPError(f"shard {file} fails its sha256 checksum (the manifest says {shard['sha256'][:12]}…); "
                                f"the data is corrupted, re-run nitp prepare-data for {self.path}")

    def _split(self, split: str) -> dict[str, Any]:
        if split not in self.manifest["splits"]:
            raise NITPError(f"split {split!r} is not in {self.path} (splits: {list(self.manifest['splits'])})")
        return self.manifest["splits"][split]


def open_data(path: str | Path, verify: bool = False) -> DataDir:
    """Open and validate a data directory; `verify=True` also re-hashes every shard."""
    path = Path(path)
    if path.is_file():
        raise NITPError(f"{path} is a file, not a data directory; pass the directory that `nitp prepare-data --out` "
                        "wrote (it holds manifest.json)")
    if not path.is_dir():
        raise NITPError(f"data directory {path} does not exist; run `nitp prepare-data --out {path} ...` "
                        "or set data.path to a prepared directory")
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise NITPError(f"{path} is not a prepared data directory (no {MANIFEST}); "
                        f"run `nitp prepare-data --out {path} ...` (an interrupted run leaves no manifest)")
    try:
        manifest = json.loads(manifest_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NITPError(f"{manifest_file} is not valid JSON ({exc}); re-run nitp prepare-data for {path}") from None
    _check_manifest(manifest, manifest_file)
    data = DataDir(path, manifest)
    data.verify_checksums() if verify else data.verify_sizes()
    return data


def _check_manifest(manifest: Any, where: Path) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != "nitp-ds-tokens":
        raise NITPError(f"{where} is not a nitp-ds data manifest; re-run nitp prepare-data")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise NITPError(f"{where} has format_version {version!r}, this nitp-ds reads {FORMAT_VERSION}; "
                        "re-run nitp prepare-data with this version")
    for key in ("vocab_size", "eos_token_id", "dtype", "sources", "splits"):
        if key not in manifest:
            raise NITPError(f"{where} lacks {key!r}; the manifest is damaged, re-run nitp prepare-data")
    if manifest["dtype"] not in ("uint16", "uint32"):
        raise NITPError(f"{where}: dtype {manifest['dtype']!r} is not uint16 or uint32; re-run nitp prepare-data")


class TokenStream:
    """The concatenated shards of one (split, source), read through memory maps."""

    def __init__(self, directory: Path, shards: list[dict[str, Any]], dtype: np.dtype):
        self.maps = [np.memmap(directory / s["file"], dtype=dtype, mode="r", shape=(s["tokens"],))
                     for s in shards if s["tokens"] > 0]
        self.starts = np.cumsum([0] + [len(m) for m in self.maps])
        self.num_tokens = int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while filled < length:
            offset = start + filled - int(self.starts[shard])
            part = self.maps[shard][offset:offset + length - filled]
            out[filled:filled + len(part)] = part
            filled += len(part)
            shard += 1
        return out


def check_vocab(data: DataDir, model_vocab_size: int) -> int:
    """The vocabulary size to build the model with; NITPError if the model's is too small for the data."""
    if model_vocab_size == 0:
        return data.vocab_size
    if data.vocab_size > model_vocab_size:
        raise NITPError(f"model.vocab_size {model_vocab_size} is smaller than the data's vocabulary "
                        f"({data.vocab_size} tokens in {data.path}); set model.vocab_size to at least "
                        f"{data.vocab_size} (or 0 to take the data's)")
    return model_vocab_size


# ---------------------------------------------------------------------------------------------
# The blend schedule: global sample -> (source, how many samples of that source came before)
# ---------------------------------------------------------------------------------------------


def blend_schedule(weights: list[float], period: int = BLEND_PERIOD) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-period counts, and for each position of the period its source and its rank among that source's."""
    total = sum(weights)
    quotas = [w / total * period for w in weights]
    counts = [max(1, int(q)) for q in quotas]
    for i in sorted(range(len(weights)), key=lambda i: quotas[i] - int(quotas[i]), reverse=True):
        if sum(counts) >= period:
            break
        counts[i] += 1
    period = sum(counts)
    current = [0] * len(weights)
    source_at = np.empty(period, dtype=np.int64)
    rank_at = np.empty(period, dtype=np.int64)
    seen = [0] * len(weights)
    for position in range(period):  # smooth weighted round robin: every prefix is close to the weights
        for i, c in enumerate(counts):
            current[i] += c
        pick = max(range(len(weights)), key=lambda i: current[i])
        current[pick] -= period
        source_at[position], rank_at[position] = pick, seen[pick]
        seen[pick] += 1
    return np.array(counts, dtype=np.int64), source_at, rank_at


# ---------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------


class TokenLoader:
    """Micro-batches {"input_ids", "labels"} (LongTensor [B, T]) of one split, for one data-parallel rank."""

    def __init__(self, data: DataDir, split: str, seq_len: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_world_size: int = 1, seed: int = 0, weights: dict[str, float] | None = None):
        if seq_len < 1 or micro_batch_size < 1:
            raise NITPError(f"seq_len {seq_len} and micro_batch_size {micro_batch_size} must be positive")
        if not 0 <= dp_rank < dp_world_size:
            raise NITPError(f"dp_rank {dp_rank} is outside [0, {dp_world_size}); check the launcher's world size")
        data._split(split)
        self.data, self.split, self.seq_len = data, split, seq_len
        self.micro_batch_size, self.dp_rank, self.dp_world_size, self.seed = micro_batch_size, dp_rank, dp_world_size, seed
        self.shuffle = split == "train"
        self.weights = self._resolve_weights(weights)
        self.sources = [name for name, w in self.weights.items() if w > 0]
        self.source_index = {name: data.source_names.index(name) for name in self.sources}
        self.num_windows = self._count_windows()
        self.counts, self.source_at, self.rank_at = blend_schedule([self.weights[s] for s in self.sources])
        self.period = len(self.source_at)
        self.step = 0  # micro-batches this rank has produced
        self._permutations: dict[tuple[int, int], np.ndarray] = {}

    def _resolve_weights(self, weights: dict[str, float] | None) -> dict[str, float]:
        if not weights:
            return dict(self.data.default_weights)
        unknown = sorted(set(weights) - set(self.data.source_names))
        if unknown:
            raise NITPError(f"data.weights names source {unknown[0]!r}, which {self.data.path} does not have; "
                            f"use the names {self.data.source_names}")
        if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
            raise NITPError(f"data.weights {weights} must be non-negative with at least one positive")
        return {name: float(weights.get(name, 0.0)) for name in self.data.source_names}

    def _count_windows(self) -> dict[str, int]:
        windows = {}
        for name in list(self.sources):
            tokens = self.data.source_tokens(self.split, name)
            count = (tokens - 1) // self.seq_len if tokens > 0 else 0
            if count >= 1:
                windows[name] = count
            elif self.split == "train":
                raise NITPError(f"source {name!r} has {tokens} {self.split} tokens, fewer than one window of "
                                f"data.seq_len + 1 = {self.seq_len + 1}; lower data.seq_len or add data")
            else:  # a small source may have too little val data; evaluate on the others
                self.sources.remove(name)
        if not windows:
            raise NITPError(f"the {self.split} split of {self.data.path} has {self.data.num_tokens(self.split)} tokens, "
                            f"fewer than one window of data.seq_len + 1 = {self.seq_len + 1} per source; "
                            "lower data.seq_len or add data (or a larger --val-fraction)")
        return windows

    # -- samples ------------------------------------------------------------------------------

    def sample(self, g: int) -> np.ndarray:
        """The T+1 tokens of global sample g."""
        cycle, position = divmod(g, self.period)
        which = int(self.source_at[position])
        name = self.sources[which]
        nth = cycle * int(self.counts[which]) + int(self.rank_at[position])
        epoch, index = divmod(nth, self.num_windows[name])
        window = int(self._permutation(which, epoch)[index]) if self.shuffle else index
        return self.data.stream(self.split, name).read(window * self.seq_len, self.seq_len + 1)

    def _permutation(self, which: int, epoch: int) -> np.ndarray:
        key = (which, epoch)
        if key not in self._permutations:
            if len(self._permutations) > 2 * len(self.sources):
                self._permutations.clear()
            name = self.sources[which]
            rng = np.random.default_rng([self.seed, self.source_index[name], epoch])
            self._permutations[key] = rng.permutation(self.num_windows[name])
        return self._permutations[key]

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """This rank's micro-batch number `step` (pure: does not move the loader)."""
        first = step * self.micro_batch_size
        rows = np.stack([self.sample((first + i) * self.dp_world_size + self.dp_rank)
                         for i in range(self.micro_batch_size)])
        tokens = torch.from_numpy(rows)
        return {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}

    def __iter__(self) -> "TokenLoader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = self.batch(self.step)
        self.step += 1
        return batch

    def val_batches(self, n: int) -> list[dict[str, torch.Tensor]]:
        """The first n micro-batches of this rank, the same on every call (cycles if the split is smaller)."""
        return [self.batch(step) for step in range(n)]

    # -- position -----------------------------------------------------------------------------

    @property
    def global_samples(self) -> int:
        """Samples consumed by all ranks together."""
        return self.step * self.micro_batch_size * self.dp_world_size

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "split": self.split, "seed": self.seed, "seq_len": self.seq_len,
                "weights": {s: self.weights[s] for s in self.sources}, "global_samples": self.global_samples,
                "micro_batch_size": self.micro_batch_size, "dp_world_size": self.dp_world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("split", "seed", "seq_len", "weights"):
            if state.get(key) != mine[key]:
                raise NITPError(f"the saved data position has {key}={state.get(key)!r} but this run has {mine[key]!r}; "
                                f"resume with the same data.{key} (or start without resuming the data position)")
        per_step = self.micro_batch_size * self.dp_world_size
        consumed = int(state["global_samples"])
        if consumed % per_step:
            raise NITPError(f"the saved data position ({consumed} samples) is not a whole number of steps of "
                            f"{per_step} samples (micro_batch_size x world size); resume with a micro batch and "
                            "world size whose product divides it")
        self.step = consumed // per_step
