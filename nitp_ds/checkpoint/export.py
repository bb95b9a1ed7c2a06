"""Checkpoint → Hugging Face directory without the NITP head: config, sharded safetensors, tokenizer.

The weights are streamed from the checkpoint's partition files straight into the export dtype
(`convert.write_safetensors`: one layer in memory, every name and shape checked against the stock model class
built on the meta device, none missing), so an export costs what a convert costs whatever the model's size.
`config.json` and `generation_config.json` come from nitp_meta.json's `hf_config`; `nitp_export.json` keeps
the training sequence length, data directory, step and source checkpoint (read by `nitp eval`). `verify=True` then checks
the written directory against the checkpoint (`nitp_ds.checkpoint.verify`): every tensor exactly, and the
quality of the model that `from_pretrained` loads.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from nitp_ds.checkpoint.convert import (DTYPES, HEAD_PREFIX, ZeroCheckpoint, check_checkpoint_files, commit_output,
                                        hf_config_object, infer_model_type, iter_hf_tensors, meta_model,
                                        plan_hf_tensors, prepare_output, write_safetensors)
from nitp_ds.checkpoint.state import EXPORT_INFO, META, read_meta, resolve_checkpoint
from nitp_ds.checkpoint.verify import Verification, check_tensors, compare_quality, evaluation_batches, judge
from nitp_ds.errors import NITPError
from nitp_ds.models import model_from_tensors

MAX_SHARD_BYTES = 2 * 10**9  # save_pretrained's default "2GB"


@dataclass
class ExportResult:
    out: Path
    step: int | None
    verification: Verification | None = None


def export_checkpoint(src: str | Path, out: str | Path, *, dtype: str = "bf16", verify: bool = False,
                      force: bool = False, tokenizer_dir: str | Path | None = None, data_dir: str | Path | None = None,
                      max_shard_size: int = MAX_SHARD_BYTES, show_progress: bool = True,
                      warn: Callable[[str], None] = print) -> ExportResult:
    """Writes a Hugging Face model directory from an nitp-ds checkpoint (run dir, checkpoints dir or tag dir).

    `verify`: check the written directory against the checkpoint before it is put in place; the quality part
    scores validation tokens of `data_dir` (default: the run's data directory in nitp_meta.json)."""
    if dtype not in DTYPES:
        raise NITPError(f"--dtype {dtype!r} is not supported for export; use bf16 or fp32")
    ckpt = resolve_checkpoint(src, require_meta=False)  # without nitp_meta.json: refused below, naming the fix
    meta = read_meta(ckpt)
    if not meta.get("hf_config"):
        raise NITPError(f"{ckpt / META} is missing or has no hf_config, so the Hugging Face config "
                        "cannot be written; use `nitp convert` for bare weights or add nitp_meta.json")
    tokenizer = tokenizer_dir or meta.get("tokenizer_dir")
    if tokenizer:
        _check_tokenizer_dir(Path(tokenizer))  # before the conversion, not after it
    world = check_checkpoint_files(ckpt)
    final, tmp = prepare_output(out, force)
    try:
        partitions = ZeroCheckpoint(ckpt, world)
        model_type = infer_model_type(meta, partitions)
        config = write_config(tmp, meta["hf_config"], dtype)
        write_safetensors(partitions, tmp, model_type=model_type, dtype=DTYPES[dtype], meta=meta,
                          max_shard_bytes=max_shard_size, include_head=False, on_disk=saved_format(config),
                          show_progress=show_progress)
        if tokenizer:
            _copy_tokenizer(Path(tokenizer), tmp)
        write_training_info(tmp, meta, ckpt)
        result = ExportResult(final, meta.get("step"))
        if verify:
            result.verification = _verify(partitions, tmp, config=config, model_type=model_type, dtype=dtype,
                                          data_dir=data_dir or meta.get("data_dir"), warn=warn)
        commit_output(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def write_training_info(directory: Path, meta: dict, ckpt: Path) -> None:
    """nitp_export.json: what the export cannot say in Hugging Face's own files: the training sequence length
    (which `nitp eval` scores at), the data directory, the step and the checkpoint it came from."""
    info = {"seq_len": meta.get("seq_len"), "data_dir": meta.get("data_dir"), "step": meta.get("step"),
            "checkpoint": str(ckpt.resolve())}
    (directory / EXPORT_INFO).write_text(json.dumps(info, indent=2))


def write_config(directory: Path, hf_config: dict, dtype: str):
    """config.json (for inference: cache on, router logits off, the architecture named) and generation_config.json."""
    from transformers import GenerationConfig

    config = hf_config_object(hf_config)
    config.use_cache = True
    config.output_router_logits = False
    config.architectures = [type(meta_model(config)).__name__]
    config.dtype = "bfloat16" if dtype == "bf16" else "float32"
    config.save_pretrained(directory)
    GenerationConfig.from_model_config(config).save_pretrained(directory)
    return config


def saved_format(config) -> Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]]:
    """(name, tensor) of the model in memory → the tensors `save_pretrained` stores for it. transformers 5 fuses
    the experts on load (`experts.gate_up_proj` [E, 2I, H]) and splits them again on save
    (`experts.{e}.gate_proj.weight`, ...), the format other tools read; its own `revert_weight_conversion` does
    the split, here for one tensor at a time."""
    from transformers.core_model_loading import revert_weight_conversion

    model = meta_model(config)
    return lambda name, tensor: list(revert_weight_conversion(model, {name: tensor}).items())


def verify_export(src: str | Path, directory: str | Path, *, data_dir: str | Path | None = None,
                  warn: Callable[[str], None] = print) -> Verification:
    """Checks an exported directory (its dtype from its config.json) against the checkpoint `src` it came from:
    what `export --verify` does before putting the directory in place."""
    import json

    ckpt = resolve_checkpoint(src, require_meta=False)
    meta = read_meta(ckpt)
    if not meta.get("hf_config"):
        raise NITPError(f"{ckpt / META} is missing or has no hf_config; verification needs the checkpoint's config")
    directory = Path(directory)
    saved = json.loads((directory / "config.json").read_text()).get("dtype")
    dtype = {"bfloat16": "bf16", "float32": "fp32"}.get(saved)
    if dtype is None:
        raise NITPError(f"{directory / 'config.json'} has dtype {saved!r}; only bf16 and fp32 exports can be verified")
    partitions = ZeroCheckpoint(ckpt, check_checkpoint_files(ckpt))
    return _verify(partitions, directory, config=hf_config_object(meta["hf_config"]),
                   model_type=infer_model_type(meta, partitions), dtype=dtype,
                   data_dir=data_dir or meta.get("data_dir"), warn=warn)


def _verify(partitions: ZeroCheckpoint, directory: Path, *, config, model_type: str, dtype: str,
            data_dir: str | Path | None, warn: Callable[[str], None]) -> Verification:
    """(a) every exported tensor is the checkpoint's, rounded; (b) the model from_pretrained loads scores like the
    checkpoint's fp32 weights. Raises one line naming what differs."""
    from transformers import AutoModelForCausalLM

    plan = [t for t in plan_hf_tensors(partitions, model_type) if not t.name.startswith(HEAD_PREFIX)]

    def checkpoint_tensors():
        return ((item.name, tensor) for item, tensor in iter_hf_tensors(partitions, plan))

    on_disk = saved_format(config)
    stored = (pair for name, tensor in checkpoint_tensors() for pair in on_disk(name, tensor))
    tensors = check_tensors(stored, directory, DTYPES[dtype])
    batches, source = evaluation_batches(config, data_dir, warn)
    # Not bound to a name here: compare_quality frees the checkpoint's model before it loads the export.
    quality = compare_quality(model_from_tensors(config, checkpoint_tensors()), DTYPES[dtype],
                              lambda: AutoModelForCausalLM.from_pretrained(directory, local_files_only=True,
                                                                           dtype=torch.float32), batches)
    return judge(dtype, tensors, source, quality)


def _check_tokenizer_dir(source: Path) -> None:
    if not source.is_dir():
        raise NITPError(f"tokenizer directory {source} does not exist; pass --tokenizer DIR or fix tokenizer_dir "
                        "in nitp_meta.json")


def _copy_tokenizer(source: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    _check_tokenizer_dir(source)
    try:
        AutoTokenizer.from_pretrained(source, local_files_only=True).save_pretrained(out)
    except (OSError, ValueError) as exc:
        raise NITPError(f"cannot load a tokenizer from {source} ({exc}); pass --tokenizer DIR") from None
