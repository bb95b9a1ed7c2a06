"""Streaming a local Hugging Face checkpoint into a model that ZeRO-3 has partitioned.

`from_pretrained` under ZeRO-3 reads every shard of the checkpoint into one state dict on every rank.
Here the model is built partitioned (`nitp_ds.models.partitioned.construction`) and each of its tensors is
read from the safetensors shards on its own: rank 0 reads it (a memory-mapped read of that one tensor),
copies it into the gathered parameter, and DeepSpeed hands every rank its partition. Shards are opened in
order and closed after the last tensor that needs them, so a rank holds at most about one shard's mapped
pages plus one parameter (and, for fused experts, the per-expert tensors it is made of).

Names are the model's own `state_dict` names. A checkpoint saved in another layout (per-expert tensors
`mlp.experts.N.gate_proj.weight`, written by transformers 4 and by most checkpoints on the Hub; Mixtral's
`block_sparse_moe.experts.N.w1`) is converted with transformers' own conversion table for the model
(`get_model_conversion_mapping`, the one `from_pretrained` applies): experts are stacked and gate/up
concatenated into `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I].

`plan_load` checks everything before anything is read: every shard the index names exists and is a
whole safetensors file, every model tensor has a source, and every shape matches (fused shapes are
computed on meta tensors).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from nitp_ds.errors import NITPError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    file: str
    shape: tuple[int, ...]
    dtype: str


@dataclass
class Load:
    """One tensor of the model and where its value comes from: one checkpoint tensor, or several converted."""

    target: str
    sources: list[tuple[str, str]]  # (converter source pattern or "", checkpoint key), in the converter's order
    converter: Any = None  # a transformers WeightConverter, or None for a plain copy
    files: list[str] = field(default_factory=list)


@dataclass
class LoadPlan:
    directory: Path
    loads: list[Load]
    unexpected: list[str]  # checkpoint tensors that are not part of the model (transformers skips them too)


def read_checkpoint_index(directory: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of a safetensors checkpoint directory: its shard, shape and dtype (headers only)."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    where = f"model.pretrained {directory}"
    if (directory / INDEX).is_file():
        try:
            weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise NITPError(f"{where}: {INDEX} is not a valid index ({exc}); copy the checkpoint again") from None
        named: dict[str, list[str]] = {}
        for key, file in weight_map.items():
            named.setdefault(file, []).append(key)
    elif (directory / SINGLE).is_file():
        named = {SINGLE: []}
    else:
        raise NITPError(f"{where} has no safetensors weights ({SINGLE} or {INDEX}); write it with save_pretrained "
                        "(safetensors is its default) or `nitp export`")
    missing = [file for file in named if not (directory / file).is_file()]
    if missing:
        raise NITPError(f"{where}: {INDEX} names {len(missing)} shard(s) that are missing (e.g. {missing[0]}); "
                        "copy the complete checkpoint")
    tensors: dict[str, TensorInfo] = {}
    for file, keys in sorted(named.items()):
        try:
            with safe_open(str(directory / file), framework="pt") as handle:
                present = set(handle.keys())
                for key in present:
                    view = handle.get_slice(key)
                    tensors[key] = TensorInfo(file, tuple(view.get_shape()), view.get_dtype())
        except (SafetensorError, OSError) as exc:
            raise NITPError(f"{where}: shard {file} is truncated or not a safetensors file ({exc}); "
                            "copy it again") from None
        absent = [key for key in keys if key not in present]
        if absent:
            raise NITPError(f"{where}: {INDEX} puts {absent[0]} in {file}, which does not hold it; "
                            "the index and the shards are from different checkpoints — copy the checkpoint again")
    return tensors


def expected_tensors(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The tensors a checkpoint must provide: parameters (each shared one once) and persistent buffers, with
    their full shapes (a ZeRO-3 partitioned parameter keeps its full shape in `ds_shape`)."""
    expected = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in model.named_parameters()}
    for module_name, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                expected[f"{module_name}.{name}" if module_name else name] = tuple(buffer.shape)
    return expected


def plan_load(model, directory: str | Path) -> LoadPlan:
    """Which checkpoint tensors make each tensor of `model`, checked against names and shapes; reads headers only."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, dot_natural_key, rename_source_key

    directory = Path(directory)
    where = f"model.pretrained {directory}"
    tensors = read_checkpoint_index(directory)
    expected = expected_tensors(model)
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    loads: dict[str, Load] = {}
    unexpected = []
    for key in sorted(tensors, key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters, base_model_prefix=model.base_model_prefix,
                                            meta_state_dict=expected)
        if target not in expected:
            unexpected.append(key)
            continue
        load = loads.setdefault(target, Load(target, []))
        if pattern is None:
            if load.sources:
                raise NITPError(f"{where} holds two tensors for the model's {target} ({load.sources[0][1]} and "
                                f"{key}); remove one")
        else:
            converter = next(c for c in converters if pattern in c.source_patterns)
            load.converter = converter
        load.sources.append((pattern or "", key))
    missing = [name for name in expected if name not in loads]
    if missing:
        raise NITPError(f"{where} lacks {len(missing)} of the model's tensors (e.g. {missing[0]}); the weights do not "
                        "match its config.json — copy the complete checkpoint")
    for load in loads.values():
        load.files = sorted({tensors[key].file for _, key in load.sources})
        shape = tuple(read_value(load, lambda key: torch.empty(tensors[key].shape, device="meta"), model).shape)
        if shape != expected[load.target]:
            raise NITPError(f"{where}: {load.target} has shape {list(shape)} in the checkpoint but "
                            f"{list(expected[load.target])} in the model that its config.json describes; the weights "
                            "and the config are from different models")
    order = {name: i for i, name in enumerate(expected)}
    files = sorted({t.file for t in tensors.values()})
    ordered = sorted(loads.values(), key=lambda l: (files.index(l.files[0]), order[l.target]))
    return LoadPlan(directory, ordered, unexpected)


def read_value(load: Load, read: Callable[[str], torch.Tensor], model) -> torch.Tensor:
    """The value of one model tensor from its checkpoint tensors (`read(key)`), converted if it needs to be."""
    if load.converter is None:
        return read(load.sources[0][1])
    from transformers.core_model_loading import WeightConverter

    template = load.converter  # shared by every layer: a fresh one collects this tensor's sources
    converter = WeightConverter(source_patterns=template.source_patterns, target_patterns=template.target_patterns,
                                operations=template.operations)
    for pattern, key in load.sources:
        converter.add_tensor(load.target, key, pattern, lambda key=key: read(key))
    values = converter.convert(load.target, model=model, config=model.config)
    value = values.get(load.target, next(iter(values.values())))
    return value[0] if isinstance(value, list) else value


class ShardReader:
    """Reads tensors shard by shard; a shard is closed (its mapped pages released) after its last planned read."""

    def __init__(self, plan: LoadPlan):
        self.directory = plan.directory
        self.last_use: dict[str, int] = {}
        for i, load in enumerate(plan.loads):
            for file in load.files:
                self.last_use[file] = i
        self.open: dict[str, contextlib.ExitStack] = {}
        self.handles: dict[str, Any] = {}
        self.index: dict[str, str] = {}

    def read(self, key: str, file: str) -> torch.Tensor:
        from safetensors import safe_open

        if file not in self.handles:
            stack = contextlib.ExitStack()
            self.handles[file] = stack.enter_context(safe_open(str(self.directory / file), framework="pt"))
            self.open[file] = stack
        return self.handles[file].get_tensor(key)

    def done(self, step: int) -> None:
        for file in [f for f in self.handles if self.last_use[f] <= step]:
            del self.handles[file]
            self.open.pop(file).close()

    def close(self) -> None:
        self.done(len(self.last_use) and max(self.last_use.values()))


def load_pretrained(model, directory: str | Path, plan: LoadPlan | None = None) -> LoadPlan:
    """Copy a checkpoint into `model` (partitioned by ZeRO-3 or not), one tensor at a time.

    Rank 0 reads each parameter and every rank receives its partition (DeepSpeed's GatheredParameters with
    modifier rank 0); a model that is not partitioned, and buffers, are read by every rank.
    """
    import torch.distributed as dist

    from nitp_ds.models.partitioned import gathered, is_partitioned, release_freed_memory

    plan = plan or plan_load(model, directory)
    rank = dist.get_rank() if dist.is_initialized() else 0
    tensors = read_checkpoint_index(plan.directory)
    reader = ShardReader(plan)
    params = dict(model.named_parameters())
    try:
        with torch.no_grad():
            for step, load in enumerate(plan.loads):
                def value() -> torch.Tensor:
                    return read_value(load, lambda key: reader.read(key, tensors[key].file), model)

                if load.target in params:
                    param = params[load.target]
                    with gathered([param], modifier_rank=0):
                        if rank == 0 or not is_partitioned(param):
                            param.data.copy_(value())
                else:
                    model.get_buffer(load.target).copy_(value())
                reader.done(step)
                release_freed_memory()
    finally:
        reader.close()
    return plan


def check_pretrained_weights(directory: str | Path, hf_config) -> LoadPlan:
    """The load plan of `directory` for the model its config describes, built on the meta device (no weights):
    bad shards, missing tensors and wrong shapes are refused before a run writes anything."""
    import copy

    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(hf_config))
    return plan_load(model, directory)
