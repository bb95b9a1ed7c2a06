"""The weights of a DeepSpeed ZeRO-3 (+ AutoEP) checkpoint, read one parameter at a time from the rank files.

Layout (DeepSpeed 0.19.8, the one its `ds_to_universal` reads in `extract_zero_shards_stage3` and
`_consolidate_zero3_autoep_expert_states`): each rank's `zero_pp_rank_R_mp_rank_00_optim_states.pt` holds flat fp32
buffers, one per parameter sub-group (`fp32_flat_groups`; the Adam moments beside them in the optimizer state);
the rank's `*_model_states.pt` lists the parameters of each sub-group in order with their shapes (`param_shapes`).
A sub-group is cut over `partition_count` ranks: a parameter of n elements takes ceil(n / count) slots on every
rank, of which the rank at `partition_rank` p holds elements [p * slots, (p + 1) * slots) (the tail is padding).
An AutoEP expert parameter (`...mlp.experts.w1/w2/w3`) is one EP rank's [local experts, ...] shard, cut in the
same way over its expert-data-parallel group; DeepSpeed's placement map (`autoep_metadata_to_affine_map`) puts
the EP ranks' shards back in global expert order. Buffers (DeepSeek-V3's routing bias) sit in rank 0's `module`.

Memory: the optim files are memory-mapped (`torch.load(mmap=True)`), so a read touches only the pages of the
parameter it reads; once copied out, those pages are handed back (`madvise(MADV_DONTNEED)`: they are clean file
pages, read again from the file if ever touched), and `release()` unmaps the files. A read costs the parameter's
own memory and little else. The moments are never read unless asked for.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nitp_ds.errors import NITPError

MODEL_STATES_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
OPTIM_STATES_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
STATES = ("fp32", "exp_avg", "exp_avg_sq")


def rank_files(ckpt: Path, pattern: re.Pattern) -> dict[int, Path]:
    return {int(m.group(1)): p for p in ckpt.iterdir() if (m := pattern.match(p.name))}


def load_mapped(path: Path) -> dict[str, Any]:
    """A torch.save file with its tensors memory-mapped: nothing is read until a tensor is touched."""
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


@dataclass(frozen=True)
class Fragment:
    """Elements [offset, offset + numel) of one sub-group's flat buffer in one rank's file."""
    rank: int
    sub_group: int
    offset: int
    numel: int
    partition_rank: int


@dataclass
class ExpertShards:
    """An AutoEP expert parameter: per EP rank, its shard shape and fragments; the layer's AutoEP metadata."""
    layer_info: dict[str, Any]
    shard_shape: dict[int, tuple[int, ...]] = field(default_factory=dict)
    fragments: dict[int, list[Fragment]] = field(default_factory=dict)


class ZeroCheckpoint:
    """Index of a ZeRO-3 checkpoint directory: names, shapes, and where every parameter's pieces are."""

    def __init__(self, ckpt: Path, world: int):
        self.ckpt = ckpt
        model_files = rank_files(ckpt, MODEL_STATES_RE)
        self.optim_files = rank_files(ckpt, OPTIM_STATES_RE)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dense: dict[str, list[Fragment]] = {}
        self.experts: dict[str, ExpertShards] = {}
        self.buffers: dict[str, torch.Tensor] = {}
        self._mapped: dict[int, dict[str, Any]] = {}
        for rank in range(world):
            state = load_mapped(model_files[rank])
            if rank == 0:
                self.ds_config = state.get("ds_config") or {}
                self.step = state.get("global_steps")
                module = state.get("module") or {}
                self.buffers = {n: module[n].clone() for n in state.get("buffer_names") or [] if n in module}
            groups = self._partition_groups(rank, world)
            self._index_rank(rank, state.get("param_shapes") or [], groups, _expert_layers(state))
            del state
        self._check_complete()

    def _partition_groups(self, rank: int, world: int) -> list[tuple[int, int]]:
        optim = load_mapped(self.optim_files[rank])["optimizer_state_dict"]
        groups = optim.get("ds_zero_partition_groups") or [{} for _ in optim["fp32_flat_groups"]]
        return [(g.get("partition_count", world), g.get("partition_rank", rank)) for g in groups]

    def _index_rank(self, rank: int, param_shapes: list[dict], groups: list[tuple[int, int]],
                    expert_layers: dict[str, dict[str, Any]]) -> None:
        for sub_group, names in enumerate(param_shapes):
            count, partition_rank = groups[sub_group]
            offset = 0
            for name, shape in names.items():
                shape = tuple(int(d) for d in shape)
                numel = math.prod(shape)
                slots = math.ceil(numel / count)
                held = max(0, min(slots, numel - partition_rank * slots))
                piece = Fragment(rank, sub_group, offset, held, partition_rank)
                offset += slots
                layer_info = expert_layers.get(name)
                if layer_info is None:
                    self.shapes.setdefault(name, shape)
                    if all(f.partition_rank != partition_rank for f in self.dense.setdefault(name, [])):
                        self.dense[name].append(piece)
                    continue
                shards = self.experts.setdefault(name, ExpertShards(layer_info))
                ep_rank = layer_info["ep_rank"]
                shards.shard_shape[ep_rank] = shape
                shards.fragments.setdefault(ep_rank, []).append(piece)
                self.shapes[name] = (int(layer_info["num_experts"]), *shape[1:])

    def _check_complete(self) -> None:
        for name, pieces in self.dense.items():
            pieces.sort(key=lambda f: f.partition_rank)
            if sum(f.numel for f in pieces) != math.prod(self.shapes[name]):
                raise NITPError(f"{self.ckpt}: the partitions of '{name}' do not add up to its shape "
                                f"{self.shapes[name]}; the checkpoint is incomplete or mixes runs")
        for name, shards in self.experts.items():
            for ep_rank, pieces in shards.fragments.items():
                pieces.sort(key=lambda f: f.partition_rank)
                if sum(f.numel for f in pieces) != math.prod(shards.shard_shape[ep_rank]):
                    raise NITPError(f"{self.ckpt}: the expert-data-parallel pieces of '{name}' on EP rank {ep_rank} "
                                    "are incomplete; copy every rank's files of the checkpoint")

    def names(self) -> list[str]:
        return [*self.shapes, *(n for n in self.buffers if n not in self.shapes)]

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.shapes:
            return self.shapes[name]
        return tuple(self.buffers[name].shape)

    def is_expert(self, name: str) -> bool:
        return name in self.experts

    # -- reading ---------------------------------------------------------------------------------

    def read(self, name: str, state: str = "fp32") -> torch.Tensor:
        """The whole parameter `name` (fp32, its full shape), in memory of its own."""
        if name in self.buffers and name not in self.shapes:
            return self.buffers[name]
        if name in self.experts:
            return self._read_expert(name, state)
        out = torch.empty(math.prod(self.shapes[name]), dtype=torch.float32)
        position = 0
        for piece in self.dense[name]:
            source = self._slice(piece, state)
            out[position:position + piece.numel].copy_(source)
            drop_pages(source)
            position += piece.numel
        return out.view(self.shapes[name])

    def _read_expert(self, name: str, state: str) -> torch.Tensor:
        from deepspeed.checkpoint.autoep_affine import autoep_metadata_to_affine_map

        shards = self.experts[name]
        per_ep_rank = {}
        for ep_rank, pieces in shards.fragments.items():
            parts = [self._slice(piece, state) for piece in pieces]
            flat = parts[0] if len(parts) == 1 else torch.cat(parts)
            per_ep_rank[ep_rank] = flat.view(shards.shard_shape[ep_rank])
        if shards.layer_info.get("expert_placement") is None:  # DeepSpeed's fallback: EP ranks in order
            full = torch.cat([per_ep_rank[r] for r in sorted(per_ep_rank)], dim=0)
        else:
            affine_map = autoep_metadata_to_affine_map(shards.layer_info, self.shapes[name])
            try:
                full = affine_map.rebuild(per_ep_rank)
            except ValueError as exc:
                raise NITPError(f"{self.ckpt}: cannot put the experts of '{name}' back in order ({exc}); copy "
                                "every rank's files of the checkpoint") from None
        for shard in per_ep_rank.values():
            drop_pages(shard)
        return full

    def _slice(self, piece: Fragment, state: str) -> torch.Tensor:
        optim = self._mapped.get(piece.rank)
        if optim is None:
            optim = self._mapped[piece.rank] = load_mapped(self.optim_files[piece.rank])["optimizer_state_dict"]
        if state == "fp32":
            flat = optim["fp32_flat_groups"][piece.sub_group]
        else:
            flat = optim["optimizer_state_dict"]["state"][piece.sub_group][state]
        return flat.detach().narrow(0, piece.offset, piece.numel)  # saved as leaves that require grad

    def release(self) -> None:
        """Unmaps the rank files: the pages read so far leave this process's resident memory."""
        self._mapped.clear()


def _expert_layers(model_state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{expert parameter name: its layer's AutoEP metadata on this rank} for the ZeRO-3 partitioned format."""
    from deepspeed.checkpoint.autoep_zero3_metadata import (is_autoep_zero3_partitioned_entry,
                                                            validate_autoep_zero3_partitioned_metadata)

    layers = model_state.get("ds_autoep_layers")
    if layers is None:
        return {}
    try:
        validate_autoep_zero3_partitioned_metadata(layers, require_partitioned=False, version_context="nitp convert")
    except RuntimeError as exc:
        raise NITPError(f"the checkpoint's AutoEP metadata is not readable ({exc})") from None
    if not all(is_autoep_zero3_partitioned_entry(entry) for entry in layers):
        raise NITPError("the checkpoint's AutoEP experts are not in DeepSpeed's ZeRO-3 partitioned format "
                        "(saved by an older DeepSpeed?); re-save it with deepspeed 0.19.8")
    return {f"{entry['expert_key_prefix']}.{w}": entry for entry in layers for w in ("w1", "w2", "w3")}


_LIBC = ctypes.CDLL(None, use_errno=True)
_MADV_DONTNEED = 4  # Linux


def drop_pages(view: torch.Tensor) -> None:
    """Hands the resident pages under `view`, a slice of a read-only memory-mapped file, back to the kernel.

    Without this every page read stays in this process's resident set until the file is unmapped, so reading
    a whole checkpoint would end at its full fp32 size. Pages shared with a neighbouring tensor are dropped too,
    which costs at most a re-read from the page cache. A no-op where madvise is unavailable."""
    if view.numel() == 0:
        return
    start = view.data_ptr()
    first = start - start % mmap.PAGESIZE
    length = start + view.numel() * view.element_size() - first
    try:
        _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(length), _MADV_DONTNEED)
    except AttributeError:
        pass
