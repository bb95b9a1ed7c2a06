"""The DeepSpeed JSON config: loaded as the user wrote it, completed from the recipe, checked against it.

The ds_config stays a plain DeepSpeed file that users can bring from elsewhere. nitp-ds fills the
fields it derives (batch sizes, clipping, precision "auto", the gradient accumulation dtype "auto", the
AutoEP pattern and preset; DeepSpeed's throughput timer off unless the file sets "timers") and refuses a
value that contradicts the recipe with a message naming both values and the fix.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from nitp_ds.config import Config
from nitp_ds.errors import NITPError
from nitp_ds.models.families import MOE_LAYER_PATTERN, family_of


BUNDLED = Path(__file__).resolve().parent.parent  # the checkout holding ds_configs/ (editable install)


def load_ds_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file() and not path.is_absolute() and (BUNDLED / path).is_file():
        path = BUNDLED / path  # the default `ds_configs/zero3_moe.json` works from any directory
    if not path.is_file():
        raise NITPError(f"ds_config {path} does not exist; pass --ds-config with a DeepSpeed JSON file "
                        "(e.g. ds_configs/zero3_moe.json)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise NITPError(f"ds_config {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                        "fix the syntax") from None
    if not isinstance(raw, dict):
        raise NITPError(f"ds_config {path} must be a JSON object")
    return raw


def accelerator_has_bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def derive_ds_config(raw: dict[str, Any], cfg: Config, *, world_size: int, num_experts: int,
                     model_type: str) -> dict[str, Any]:
    """Complete `raw` from the recipe and check it; returns a new dict for `build_engine`."""
    ds = copy.deepcopy(raw)
    t = cfg.train
    for key in ("optimizer", "scheduler"):
        if key in ds:
            section = "optim.*" if key == "optimizer" else "schedule.*"
            raise NITPError(f"ds_config has an '{key}' section; remove it: nitp-ds builds AdamW and the lr schedule "
                            f"from the recipe ({section})")
    if world_size < 1:
        raise NITPError(f"world size must be >= 1, got {world_size}")

    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, "train.micro_batch_size")
    _fill(ds, "gradient_accumulation_steps", t.grad_accum, "train.grad_accum")
    _fill(ds, "train_batch_size", t.micro_batch_size * t.grad_accum * world_size,
          f"train.micro_batch_size × train.grad_accum × world size ({t.micro_batch_size} × {t.grad_accum} × "
          f"{world_size})")
    _fill(ds, "gradient_clipping", cfg.optim.grad_clip, "optim.grad_clip")

    if ds.get("fp16", {}).get("enabled") in (True, "auto"):
        raise NITPError("ds_config enables fp16; MoE training here supports bf16 or fp32: set "
                        '"fp16": {"enabled": false} and use "bf16": {"enabled": "auto"}')
    bf16 = ds.setdefault("bf16", {})
    if bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = accelerator_has_bf16()
    elif bf16.get("enabled") is True and not accelerator_has_bf16():
        raise NITPError('ds_config enables bf16 but this accelerator has no bf16 support (CPU?); set '
                        '"bf16": {"enabled": "auto"} or use ds_configs/zero3_moe_cpu.json')

    types = ds.get("data_types")
    if isinstance(types, dict) and types.get("grad_accum_dtype") == "auto":
        # fp32 where gradients accumulate over micro-batches (bf16 sums drop the small ones); a single
        # micro-batch's gradient is the same either way, and DeepSpeed's default (the parameters' dtype) halves
        # the gradient buffer and the optimizer's read of it.
        if t.grad_accum > 1:
            types["grad_accum_dtype"] = "fp32"
        else:
            del types["grad_accum_dtype"]

    zero = ds.get("zero_optimization", {})
    if zero.get("stage3_param_persistence_threshold") == "auto":
        # One data-parallel rank has nothing to partition parameters across: keeping every parameter
        # resident skips ZeRO-3's gather/release around each module (docs/benchmarks.md measures it).
        # With several ranks, DeepSpeed's default (1e5 elements) keeps only small parameters resident.
        # Offloaded parameters must not be persistent (DeepSpeed keeps persistent ones on the device).
        offload_param = (zero.get("offload_param") or {}).get("device", "none") not in (None, "none")
        zero["stage3_param_persistence_threshold"] = 10**12 if world_size == 1 and not offload_param else 100_000
    ep = ds.get("expert_parallel")
    if ep is not None and ep.get("enabled", False):
        _check_expert_parallel(ep, cfg, world_size=world_size, num_experts=num_experts, model_type=model_type)
    ds.setdefault("steps_per_print", 10**9)  # nitp-ds logs; DeepSpeed's own step prints stay quiet
    # DeepSpeed's throughput timer is on by default and synchronizes the device at every forward and every
    # step: the host then waits for the backward and the optimizer step before it can queue the next forward,
    # and the device idles while it does (one H200, shape B: 58 ms of a 100 ms step waited in engine.step).
    # nitp-ds measures tokens/s itself; a ds_config that sets "timers" keeps what it sets.
    ds.setdefault("timers", {"throughput": {"enabled": False}})
    return ds


def _fill(ds: dict[str, Any], key: str, value: Any, source: str) -> None:
    current = ds.get(key, "auto")
    if current == "auto":
        ds[key] = value
    elif current != value:
        raise NITPError(f"ds_config {key} is {current} but {source} gives {value}; set it to \"auto\" in the "
                        f"ds_config (nitp-ds fills it) or change {source.split(' ')[0]}")


def _check_expert_parallel(ep: dict[str, Any], cfg: Config, *, world_size: int, num_experts: int,
                           model_type: str) -> None:
    family = family_of(model_type)
    preset = ep.get("preset_model", "auto")
    if preset in (None, "auto"):
        ep["preset_model"] = family.autoep_preset
    elif preset != family.autoep_preset:
        raise NITPError(f"ds_config expert_parallel.preset_model is '{preset}' but the model family {model_type} "
                        f"needs '{family.autoep_preset}'; set it to \"auto\"")
    pattern = ep.get("moe_layer_pattern", "auto")
    if pattern in (None, "auto"):
        ep["moe_layer_pattern"] = MOE_LAYER_PATTERN
    elif pattern != MOE_LAYER_PATTERN:
        raise NITPError(f"ds_config expert_parallel.moe_layer_pattern is '{pattern}' but nitp-ds wraps the model "
                        f"so its MoE blocks are '{MOE_LAYER_PATTERN}'; set it to \"auto\"")
    size = ep.get("autoep_size", "auto")
    if size == "auto":
        size = max(d for d in range(1, world_size + 1) if world_size % d == 0 and num_experts % d == 0)
        ep["autoep_size"] = size
    if not isinstance(size, int) or size < 1:
        raise NITPError(f"ds_config expert_parallel.autoep_size must be a positive integer or \"auto\", got {size!r}")
    if world_size % size:
        raise NITPError(f"expert_parallel.autoep_size ({size}) does not divide the world size ({world_size}); "
                        f"launch {size}×N processes (nitp train --nproc {size}) or set autoep_size to \"auto\"")
    if num_experts % size:
        raise NITPError(f"expert_parallel.autoep_size ({size}) does not divide model.num_experts ({num_experts}); "
                        f"choose an autoep_size that divides {num_experts}, or \"auto\"")
