"""Checkpoint → Hugging Face directory without the NITP head: config, sharded safetensors, tokenizer.

The weights come from `convert_checkpoint` (fp32, Hugging Face names). They are loaded *strictly* into
the stock model class, so a missing or misplaced expert tensor fails here instead of at inference, and
written with `save_pretrained`. `verify=True` reloads the written directory with `from_pretrained`
and compares its logits on a fixed batch with the fp32 model built from the consolidated weights.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from nitp_ds.checkpoint.convert import commit_output, convert_checkpoint, hf_config_object, prepare_output
from nitp_ds.checkpoint.state import META, read_meta, resolve_checkpoint
from nitp_ds.errors import NITPError

# verify compares the exported model's logits (computed in fp32) with two references built from the
# consolidated fp32 weights: (1) the same weights rounded to the export dtype — must agree within
# EXACT_TOLERANCE in both dtypes, which catches any misplaced tensor; (2) the unrounded fp32 weights —
# the bf16 rounding drift, bounded by DRIFT_TOLERANCE × max(1, max |reference logit|) (routing flips
# in tiny MoE models make it larger than the 2^-9 relative rounding of each weight).
EXACT_TOLERANCE = 1e-4
DRIFT_TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}
TOLERANCE = DRIFT_TOLERANCE
MAX_SHARD_SIZE = "2GB"


@dataclass
class ExportResult:
    out: Path
    step: int | None
    max_abs_diff: float | None = None  # exported vs the reference rounded to the export dtype
    max_abs_drift: float | None = None  # exported vs the unrounded fp32 reference
    tolerance: float | None = None
    drift_tolerance: float | None = None


def export_checkpoint(src: str | Path, out: str | Path, *, dtype: str = "bf16", verify: bool = False,
                      force: bool = False, tokenizer_dir: str | Path | None = None,
                      max_shard_size: str | int = MAX_SHARD_SIZE, show_progress: bool = True) -> ExportResult:
    """Writes a Hugging Face model directory from an nitp-ds checkpoint (run dir, checkpoints dir or tag dir)."""
    from transformers import GenerationConfig

    if dtype not in TOLERANCE:
        raise NITPError(f"--dtype {dtype!r} is not supported for export; use bf16 or fp32")
    ckpt = resolve_checkpoint(src, require_meta=False)  # without nitp_meta.json: refused below, naming the fix
    meta = read_meta(ckpt)
    if not meta.get("hf_config"):
        raise NITPError(f"{ckpt / META} is missing or has no hf_config, so the Hugging Face config "
                        "cannot be written; use `nitp convert` for bare weights or add nitp_meta.json")
    tokenizer = tokenizer_dir or meta.get("tokenizer_dir")
    if tokenizer:
        _check_tokenizer_dir(Path(tokenizer))  # before the conversion, not after it
    final, tmp = prepare_output(out, force)
    try:
        consolidated = tmp / ".consolidated"
        convert_checkpoint(ckpt, consolidated, to="safetensors", dtype="fp32", show_progress=show_progress)
        config = hf_config_object(meta["hf_config"])
        model = load_consolidated(consolidated, config)
        reference_logits = _logits(model, config) if verify else None

        config.use_cache = True
        config.output_router_logits = False
        config.architectures = [type(model).__name__]
        model.config = config
        model.generation_config = GenerationConfig.from_model_config(config)
        rounded_logits = reference_logits
        if dtype == "bf16":
            if verify:
                _round_state_to(model, torch.bfloat16)  # params and persistent buffers, as save_pretrained writes them
                rounded_logits = _logits(model, config)
            model = model.to(torch.bfloat16)
        model.config.dtype = "bfloat16" if dtype == "bf16" else "float32"
        model.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
        if not (tmp / "generation_config.json").is_file():
            model.generation_config.save_pretrained(tmp)
        del model
        shutil.rmtree(consolidated)

        if tokenizer:
            _copy_tokenizer(Path(tokenizer), tmp)

        result = ExportResult(final, meta.get("step"))
        if verify:
            (result.max_abs_diff, result.tolerance, result.max_abs_drift,
             result.drift_tolerance) = verify_export(tmp, rounded_logits, reference_logits, dtype)
        commit_output(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def load_consolidated(directory: Path, config) -> torch.nn.Module:
    """The stock HF model (fp32) with the consolidated weights of `convert_checkpoint`, loaded strictly."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("model*.safetensors")):
        state.update(load_file(path))
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise NITPError(f"the converted weights do not fit {type(model).__name__}: {' '.join(first)}") from None
    return model.eval()


def _round_state_to(model: torch.nn.Module, dtype: torch.dtype) -> None:
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(dtype))


def fixed_batch(vocab_size: int, rows: int = 2, length: int = 32) -> torch.Tensor:
    return torch.randint(0, vocab_size, (rows, length), generator=torch.Generator().manual_seed(0))


def _logits(model: torch.nn.Module, config) -> torch.Tensor:
    with torch.no_grad():
        return model(fixed_batch(config.vocab_size)).logits.float()


def verify_export(directory: Path, rounded_logits: torch.Tensor, reference_logits: torch.Tensor,
                  dtype: str) -> tuple[float, float, float, float]:
    """Reloads `directory` with from_pretrained; returns (diff, tolerance, drift, drift tolerance) or raises."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=torch.float32).eval()
    logits = _logits(model, model.config)
    diff = float((logits - rounded_logits).abs().max())
    drift = float((logits - reference_logits).abs().max())
    drift_tolerance = DRIFT_TOLERANCE[dtype] * (1.0 if dtype == "fp32" else
                                                max(1.0, float(reference_logits.abs().max())))
    if not diff <= EXACT_TOLERANCE:
        raise NITPError(f"export verification failed: max |logits difference| {diff:.3g} exceeds {EXACT_TOLERANCE:g} "
                        f"against the same {dtype} weights; the exported tensors are misplaced or corrupt")
    if not drift <= drift_tolerance:
        raise NITPError(f"export verification failed: {dtype} logits drift {drift:.3g} from the fp32 checkpoint, "
                        f"beyond {drift_tolerance:.3g}; export in fp32 instead")
    return diff, EXACT_TOLERANCE, drift, drift_tolerance


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
