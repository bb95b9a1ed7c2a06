"""DeepSpeed ZeRO-3 + AutoEP checkpoint → consolidated Hugging Face safetensors, or a universal checkpoint.

To safetensors: the fp32 weights are read straight from the ranks' partition files, memory-mapped, one layer at a
time (`partitions.ZeroCheckpoint`; the Adam moments are never read), renamed to the Hugging Face names of the
installed transformers version, and streamed into sharded safetensors (`safetensors_shards.py`) with an HF-style
index; the NITP head goes to its own file, `nitp_head.safetensors`. To universal (resuming at another world size):
the same reader, one parameter at a time, writes what DeepSpeed's own `ds_to_universal` writes (`universal.py`).
Peak memory is about one layer plus a constant, whatever the model's size (docs/checkpoints.md).

AutoEP → Hugging Face (every supported family in transformers 5.x; proven by the logits tests in
`tests/test_convert_export.py`, table in `docs/checkpoints.md`):
    lm.X.mlp.experts.w1 [E, I, H] + w3 [E, I, H]  →  X.mlp.experts.gate_up_proj [E, 2I, H] = cat(w1, w3, dim=1)
    lm.X.mlp.experts.w2 [E, H, I]                 →  X.mlp.experts.down_proj [E, H, I]
    lm.X.mlp.router.gate.weight [E, H]            →  X.mlp.gate.weight [E, H]
    lm.X.mlp.router.e_score_correction_bias       →  X.mlp.gate.e_score_correction_bias (deepseek_v3 buffer)
    lm.<anything else>                            →  <anything else>
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from nitp_ds.checkpoint.integrity import FILES_KEY, check_file, recorded_files
from nitp_ds.checkpoint.partitions import MODEL_STATES_RE, OPTIM_STATES_RE, ZeroCheckpoint, load_mapped, rank_files
from nitp_ds.checkpoint.safetensors_shards import SafetensorsShards
from nitp_ds.checkpoint.state import META, read_meta, resolve_checkpoint
from nitp_ds.checkpoint.universal import write_universal
from nitp_ds.errors import NITPError
from nitp_ds.files import replace_dir
from nitp_ds.models.families import AUTOEP_RENAMES, FAMILIES

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HEAD_PREFIX = "nitp_head."
LM_PREFIX = "lm."
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3

# (AutoEP suffix, Hugging Face suffix) for single tensors, from the family table; the fused expert pair is
# handled apart.
_RENAMES = AUTOEP_RENAMES
_FAMILY_RENAMES = {name: family.autoep_renames for name, family in FAMILIES.items() if family.autoep_renames}
_GATE, _UP = ".mlp.experts.w1", ".mlp.experts.w3"
_GATE_UP_HF = ".mlp.experts.gate_up_proj"


@dataclass
class ConvertResult:
    out: Path
    step: int | None
    files: list[str] = field(default_factory=list)
    num_tensors: int = 0
    total_bytes: int = 0
    peak_rss_mib: float = 0.0


# -- checking the input --------------------------------------------------------------------------

def check_checkpoint_files(ckpt: Path) -> int:
    """Checks that every rank's model and optimizer files are present, whole and of one run; returns the world size."""
    model_ranks, optim_ranks = rank_files(ckpt, MODEL_STATES_RE), rank_files(ckpt, OPTIM_STATES_RE)
    if not model_ranks:
        raise NITPError(f"{ckpt} is not a DeepSpeed checkpoint (no zero_pp_rank_*_model_states.pt); "
                        "pass a checkpoints/global_stepN directory")
    records = recorded_files(ckpt)  # sizes and CRC-32s taken at save; none: torch.save's own zip CRCs
    for path in sorted([*model_ranks.values(), *optim_ranks.values()]):
        check_file(path, records.get(path.name))
    saved_world = load_mapped(model_ranks[min(model_ranks)]).get("dp_world_size")
    ranks = sorted(model_ranks)
    if saved_world is not None and (len(ranks) > saved_world or max(ranks) >= saved_world):
        raise NITPError(f"{ckpt} mixes files from different world sizes: rank {max(ranks)} present but the "
                        f"checkpoint was saved by {saved_world} ranks; remove stale files or re-save the checkpoint")
    world = saved_world or len(ranks)
    for kind, found in (("model", model_ranks), ("optim", optim_ranks)):
        missing = [r for r in range(world) if r not in found]
        if missing:
            raise NITPError(f"{ckpt} is missing the {kind} states of rank(s) {missing} "
                            f"(zero_pp_rank_{missing[0]}_mp_rank_00_{kind}_states.pt); copy the complete checkpoint")
    return world


# -- atomic output ------------------------------------------------------------------------------

def prepare_output(out: str | Path, force: bool) -> tuple[Path, Path]:
    """(final path, temp dir next to it); refuses an existing output unless `force`."""
    final = Path(out).absolute()
    if final.exists() and not force:
        raise NITPError(f"output {final} already exists; choose another path or pass --force to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return final, tmp


def commit_output(tmp: Path, final: Path) -> None:
    replace_dir(tmp, final)


# -- to safetensors: names and order ---------------------------------------------------------------

@dataclass(frozen=True)
class HFTensor:
    """One tensor of the output: its Hugging Face name, shape, and the checkpoint parameters it is made of."""
    name: str
    shape: tuple[int, ...]
    sources: tuple[str, ...]


def _param_order(name: str) -> tuple[int, int, str]:
    m = re.search(r"\.layers\.(\d+)\.", name)
    if m:
        return (1, int(m.group(1)), name)
    if "embed" in name:
        return (0, 0, name)
    return (2 if not name.startswith(HEAD_PREFIX) else 3, 0, name)


def hf_name(name: str, model_type: str = "") -> str:
    """The Hugging Face name of one AutoEP/universal parameter name (NITP head names are kept)."""
    if name.startswith(HEAD_PREFIX):
        return name
    if not name.startswith(LM_PREFIX):
        raise NITPError(f"checkpoint parameter '{name}' is neither under lm. nor nitp_head.; "
                        "this is not an nitp-ds checkpoint")
    name = name[len(LM_PREFIX):]
    for old, new in _FAMILY_RENAMES.get(model_type, []):
        name = name.replace(old, new)
    for old, new in _RENAMES:
        if name.endswith(old):
            return name[: -len(old)] + new
    if name.endswith(_GATE):
        return name[: -len(_GATE)] + _GATE_UP_HF
    return name


def plan_hf_tensors(ckpt: ZeroCheckpoint, model_type: str) -> list[HFTensor]:
    """The output tensors in layer order; a fused gate/up pair takes the place of its second half."""
    plan, pending = [], {}
    for name in sorted(ckpt.names(), key=_param_order):
        shape = ckpt.shape(name)
        if name.endswith(_GATE) or name.endswith(_UP):
            base = name[: -len(_GATE)]
            pending[name] = shape
            gate, up = pending.get(base + _GATE), pending.get(base + _UP)
            if gate is not None and up is not None:
                del pending[base + _GATE], pending[base + _UP]
                if gate[0] != up[0] or gate[2:] != up[2:]:
                    raise NITPError(f"expert weights {base + _GATE} {gate} and {base + _UP} {up} cannot be fused")
                fused = (gate[0], gate[1] + up[1], *gate[2:])
                plan.append(HFTensor(hf_name(base + _GATE, model_type), fused, (base + _GATE, base + _UP)))
            continue
        plan.append(HFTensor(hf_name(name, model_type), shape, (name,)))
    if pending:
        raise NITPError(f"the checkpoint has unpaired expert weights {sorted(pending)}; it is incomplete")
    return plan


def iter_hf_tensors(ckpt: ZeroCheckpoint, plan: list[HFTensor]) -> Iterator[tuple[HFTensor, torch.Tensor]]:
    """(planned tensor, fp32 values), read one at a time; the rank files are unmapped whenever the layer changes,
    so that resident memory holds one layer of the partition files at most."""
    group = None
    for item in plan:
        key = _param_order(item.sources[0])[:2]
        if key != group:
            ckpt.release()
            group = key
        yield item, _read(ckpt, item)
    ckpt.release()


def _read(ckpt: ZeroCheckpoint, item: HFTensor) -> torch.Tensor:
    if len(item.sources) == 1:
        return ckpt.read(item.sources[0])
    fused = torch.empty(item.shape, dtype=torch.float32)  # gate and up read straight into their halves
    start = 0
    for source in item.sources:
        part = ckpt.read(source)
        fused.narrow(1, start, part.shape[1]).copy_(part)
        start += part.shape[1]
        del part
    return fused


def expected_hf_shapes(hf_config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the HF model's state dict, from a model built on the meta device (no memory)."""
    config = hf_config_object(hf_config)
    shapes = {k: tuple(v.shape) for k, v in meta_model(config).state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    return shapes


def meta_model(config) -> torch.nn.Module:
    """The stock causal-LM class of `config`, built on the meta device (no memory, no initialisation)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def hf_config_object(hf_config: dict[str, Any]):
    """The transformers config object of nitp_meta.json's "hf_config" (`nitp_ds.models.hf_config_from_dict`)."""
    from nitp_ds.models import hf_config_from_dict

    if hf_config.get("model_type") is None:
        raise NITPError("nitp_meta.json's hf_config has no model_type; re-save the checkpoint or add it")
    return hf_config_from_dict(hf_config)


def infer_model_type(meta: dict[str, Any], ckpt: ZeroCheckpoint) -> str:
    from nitp_ds.models import family_of

    model_type = meta.get("model_type") or (meta.get("hf_config") or {}).get("model_type")
    if model_type is None:
        preset = (ckpt.ds_config.get("expert_parallel") or {}).get("preset_model")
        shared = any(".mlp.shared_experts_gate." in n for n in ckpt.shapes)
        model_type = "qwen2_moe" if preset == "qwen3_moe" and shared else preset
    if model_type is None:
        raise NITPError("cannot tell the model family: no nitp_meta.json and no expert_parallel.preset_model in "
                        "the checkpoint's ds_config; write nitp_meta.json with model_type")
    family_of(model_type)
    return model_type


def check_plan(plan: list[HFTensor], hf_config: dict[str, Any]) -> None:
    """Every output name and shape is the Hugging Face model's, and none of its tensors is missing."""
    expected = expected_hf_shapes(hf_config)
    model_type = hf_config.get("model_type")
    for item in plan:
        if item.name.startswith(HEAD_PREFIX):
            continue
        if item.name not in expected:
            raise NITPError(f"checkpoint tensor '{item.name}' has no place in the Hugging Face {model_type} model; "
                            "the AutoEP name mapping does not cover it")
        if item.shape != expected[item.name]:
            raise NITPError(f"checkpoint tensor '{item.name}' has shape {item.shape}, the Hugging Face "
                            f"model expects {expected[item.name]}; the checkpoint does not match nitp_meta.json")
    missing = sorted(set(expected) - {item.name for item in plan})
    if missing:
        raise NITPError(f"the checkpoint lacks {len(missing)} tensor(s) of the Hugging Face model, e.g. "
                        f"{missing[:3]}; the checkpoint is incomplete or the mapping is wrong")


# -- to safetensors: writing -------------------------------------------------------------------------

def write_safetensors(ckpt: ZeroCheckpoint, out: Path, *, model_type: str, dtype: torch.dtype,
                      meta: dict[str, Any], max_shard_bytes: int, include_head: bool = True,
                      on_disk: Callable[[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]] | None = None,
                      show_progress: bool = True) -> tuple[list[str], int, int]:
    """Streams the checkpoint into `out` with HF names; returns (files, tensors, bytes).

    `on_disk` maps one model tensor (name, tensor) to the tensors stored for it (export: transformers' saved
    format, e.g. one fused expert tensor to one tensor per expert); it must work on meta tensors too."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    plan = plan_hf_tensors(ckpt, model_type)
    if meta.get("hf_config"):
        check_plan(plan, meta["hf_config"])  # before anything is written
    head_plan = [t for t in plan if t.name.startswith(HEAD_PREFIX)] if include_head else []
    model_plan = [t for t in plan if not t.name.startswith(HEAD_PREFIX)]
    on_disk = on_disk or (lambda name, tensor: [(name, tensor)])
    stored = [(n, tuple(t.shape)) for item in model_plan
              for n, t in on_disk(item.name, torch.empty(item.shape, device="meta"))]
    model = SafetensorsShards(out, "model", stored, dtype, max_shard_bytes)
    head = SafetensorsShards(out, "nitp_head", [(t.name[len(HEAD_PREFIX):], t.shape) for t in head_plan], dtype,
                             1 << 62)  # one file
    with Progress(TextColumn("[bold]converting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), disable=not show_progress, transient=False) as progress:
        task = progress.add_task("", total=len(model_plan) + len(head_plan))
        for item, tensor in iter_hf_tensors(ckpt, model_plan + head_plan):
            progress.update(task, advance=1, description=item.name)
            if item.name.startswith(HEAD_PREFIX):
                head.write(item.name[len(HEAD_PREFIX):], tensor)
            else:
                for name, part in on_disk(item.name, tensor):
                    model.write(name, part)
            del tensor
    files = model.close() + head.close()
    return files, model.num_tensors + head.num_tensors, model.total_bytes + head.total_bytes


def convert_checkpoint(src: str | Path, out: str | Path, *, to: str = "safetensors", dtype: str = "fp32",
                       force: bool = False, max_shard_size: int = DEFAULT_MAX_SHARD_BYTES,
                       show_progress: bool = True) -> ConvertResult:
    """Converts a DeepSpeed ZeRO-3/AutoEP checkpoint to consolidated safetensors or a universal checkpoint.

    `src`: a run directory or its `checkpoints/` directory (the newest complete checkpoint there) or a checkpoint
    directory (`resolve_checkpoint`; one without nitp_meta.json is taken as a DeepSpeed checkpoint of another loop).
    `to="safetensors"`: `out/model*.safetensors` (+ index when sharded) with Hugging Face names, the NITP
    head in `out/nitp_head.safetensors`, and `out/nitp_meta.json`. `to="universal"`: `out/global_stepN/`
    plus `out/latest`, loadable by DeepSpeed with `"checkpoint": {"load_universal": true}`.
    """
    if to not in ("safetensors", "universal"):
        raise NITPError(f"--to {to!r} is not a conversion target; use 'safetensors' or 'universal'")
    if dtype not in DTYPES:
        raise NITPError(f"--dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    ckpt = resolve_checkpoint(src, require_meta=False)
    world = check_checkpoint_files(ckpt)
    meta = read_meta(ckpt)
    meta.pop(FILES_KEY, None)  # the records describe the source's files, not what is written here
    final, tmp = prepare_output(out, force)
    try:
        if to == "universal":
            univ_dir = tmp / ckpt.name
            write_universal(ZeroCheckpoint(ckpt, world), univ_dir)
            (tmp / "latest").write_text(ckpt.name)
            if meta:
                (univ_dir / META).write_text(json.dumps(meta, indent=2) + "\n")
            result = ConvertResult(final, meta.get("step"), files=[ckpt.name, "latest"])
        else:
            partitions = ZeroCheckpoint(ckpt, world)
            model_type = infer_model_type(meta, partitions)
            files, n, size = write_safetensors(partitions, tmp, model_type=model_type, dtype=DTYPES[dtype],
                                               meta=meta, max_shard_bytes=max_shard_size, show_progress=show_progress)
            meta_out = dict(meta, step=meta.get("step", partitions.step), converted_dtype=dtype)
            meta_out.setdefault("model_type", model_type)
            (tmp / META).write_text(json.dumps(meta_out, indent=2) + "\n")
            result = ConvertResult(final, meta_out["step"], files=files + [META], num_tensors=n,
                                   total_bytes=size)
        commit_output(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return result
