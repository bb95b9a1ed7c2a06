"""Sharded safetensors written one tensor at a time, the way `save_pretrained` names them.

A safetensors file is an 8-byte little-endian header length, a JSON header (each tensor's dtype, shape and byte
range) and the raw bytes in that order. With every name and shape known up front, the header of a shard can be
written first and each tensor appended as it arrives, so a shard of any size costs one tensor of memory; the
`safetensors` package would need the whole shard in a dict. Shards are cut greedily in the given order
(a new shard when the next tensor would pass `max_bytes`); more than one shard gets an HF-style index.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import BinaryIO

import torch

from nitp_ds.errors import NITPError

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


class SafetensorsShards:
    """Writes the planned tensors `[(name, shape)]` in order as `prefix*.safetensors` in `directory`."""

    def __init__(self, directory: Path, prefix: str, plan: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                 max_bytes: int):
        self.directory, self.prefix, self.dtype = directory, prefix, dtype
        self.element_size = torch.empty((), dtype=dtype).element_size()
        self.shards: list[list[tuple[str, tuple[int, ...]]]] = []
        size = 0
        for name, shape in plan:
            nbytes = math.prod(shape) * self.element_size
            if not self.shards or (self.shards[-1] and size + nbytes > max_bytes):
                self.shards.append([])
                size = 0
            self.shards[-1].append((name, tuple(shape)))
            size += nbytes
        self.total_bytes = sum(math.prod(s) for _, s in plan) * self.element_size
        self.file_names = self._file_names()
        self._pending = [entry for shard in self.shards for entry in shard]
        self._shard_of = [i for i, shard in enumerate(self.shards) for _ in shard]
        self._next = 0
        self._shard = -1
        self._handle: BinaryIO | None = None

    def _file_names(self) -> list[str]:
        n = len(self.shards)
        if n <= 1:
            return [f"{self.prefix}.safetensors"]
        return [f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Appends `tensor` (cast to the shards' dtype); names must come in the planned order."""
        if self._next >= len(self._pending) or self._pending[self._next][0] != name:
            expected = self._pending[self._next][0] if self._next < len(self._pending) else "nothing"
            raise NITPError(f"internal error: tensor '{name}' written out of order (expected {expected})")
        if tuple(tensor.shape) != self._pending[self._next][1]:
            raise NITPError(f"tensor '{name}' has shape {tuple(tensor.shape)}, planned {self._pending[self._next][1]}")
        shard = self._shard_of[self._next]
        if shard != self._shard:
            self._open(shard)
        data = tensor.detach().to(self.dtype).contiguous().reshape(-1)
        self._handle.write(memoryview(data.view(torch.uint8).numpy()))
        self._next += 1

    def _open(self, shard: int) -> None:
        if self._handle is not None:
            self._handle.close()
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape in self.shards[shard]:
            nbytes = math.prod(shape) * self.element_size
            header[name] = {"dtype": SAFETENSORS_DTYPES[self.dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as the safetensors writer does
        self._handle = open(self.directory / self.file_names[shard], "wb")
        self._handle.write(struct.pack("<Q", len(encoded)) + encoded)
        self._shard = shard

    def close(self) -> list[str]:
        """Finishes the last shard and writes the index; returns the files written."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._next != len(self._pending):
            raise NITPError(f"internal error: {len(self._pending) - self._next} planned tensor(s) never written, "
                            f"e.g. '{self._pending[self._next][0]}'")
        if len(self.shards) <= 1:
            return self.file_names if self.shards else []
        weight_map = {name: self.file_names[i] for i, shard in enumerate(self.shards) for name, _ in shard}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        index_name = f"{self.prefix}.safetensors.index.json"
        (self.directory / index_name).write_text(json.dumps(index, indent=2) + "\n")
        return [*self.file_names, index_name]

    @property
    def num_tensors(self) -> int:
        return len(self._pending)
