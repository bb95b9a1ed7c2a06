"""DeepSpeed ZeRO-3 + AutoEP checkpoint → universal checkpoint → consolidated Hugging Face safetensors.

Step 1 is DeepSpeed's own `ds_to_universal` (run as a subprocess, so its memory is returned when it
ends): it gathers every ZeRO partition and every expert-parallel shard into `zero/<param>/fp32.pt`.
Step 2 (only for `to="safetensors"`) renames AutoEP's parameters back to the Hugging Face names of
the installed transformers version, one decoder layer at a time, and writes sharded safetensors with
an HF-style index. The NITP head goes to its own file, `nitp_head.safetensors`.

AutoEP → Hugging Face (every supported family in transformers 5.x; proven by the logits tests in
`tests/test_convert_export.py`, table in `docs/checkpoints.md`):
    lm.X.mlp.experts.w1 [E, I, H] + w3 [E, I, H]  →  X.mlp.experts.gate_up_proj [E, 2I, H] = cat(w1, w3, dim=1)
    lm.X.mlp.experts.w2 [E, H, I]                 →  X.mlp.experts.down_proj [E, H, I]
    lm.X.mlp.router.gate.weight (flat E·H)        →  X.mlp.gate.weight [E, H]
    lm.X.mlp.router.e_score_correction_bias       →  X.mlp.gate.e_score_correction_bias (deepseek_v3 buffer)
    lm.<anything else>                            →  <anything else>, reshaped to its `param_shapes` entry
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from nitp_ds.checkpoint.integrity import FILES_KEY, check_file, recorded_files
from nitp_ds.checkpoint.state import META, read_meta, resolve_checkpoint
from nitp_ds.errors import NITPError
from nitp_ds.files import replace_dir
from nitp_ds.models.families import AUTOEP_RENAMES, FAMILIES

MODEL_STATES_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
OPTIM_STATES_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
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
    peak_rss_children_mib: float = 0.0


# -- checking the input --------------------------------------------------------------------------

def check_checkpoint_files(ckpt: Path) -> int:
    """Checks that every rank's model and optimizer files are present, whole and of one run; returns the world size."""
    model_ranks = {int(m.group(1)): p for p in ckpt.iterdir() if (m := MODEL_STATES_RE.match(p.name))}
    optim_ranks = {int(m.group(1)): p for p in ckpt.iterdir() if (m := OPTIM_STATES_RE.match(p.name))}
    if not model_ranks:
        raise NITPError(f"{ckpt} is not a DeepSpeed checkpoint (no zero_pp_rank_*_model_states.pt); "
                        "pass a checkpoints/global_stepN directory")
    records = recorded_files(ckpt)  # sizes and CRC-32s taken at save; none: torch.save's own zip CRCs
    for path in sorted([*model_ranks.values(), *optim_ranks.values()]):
        check_file(path, records.get(path.name))
    saved_world = _load_small(model_ranks[min(model_ranks)]).get("dp_world_size")
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


def _load_small(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


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


# -- step 1: DeepSpeed's universal conversion -----------------------------------------------------

def to_universal(ckpt: Path, univ: Path, workers: int | None = None) -> None:
    """Runs `python -m deepspeed.checkpoint.ds_to_universal` (DeepSpeed's code, in a child process)."""
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt),
           "--output_folder", str(univ), "--num_extract_workers", str(workers), "--num_merge_workers", "1"]
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip() and "WARNING" not in ln]
        last = lines[-1].strip() if lines else f"exit code {proc.returncode}"
        raise NITPError(f"DeepSpeed's ds_to_universal failed on {ckpt}: {last}")


# -- step 2: universal → Hugging Face names -------------------------------------------------------

@dataclass
class UniversalCheckpoint:
    root: Path
    param_shapes: dict[str, tuple[int, ...]]
    buffers: dict[str, torch.Tensor]
    ds_config: dict[str, Any]
    step: int | None

    @classmethod
    def open(cls, root: Path) -> "UniversalCheckpoint":
        state = _load_small(root / "zero_pp_rank_0_mp_rank_00_model_states.pt")
        shapes: dict[str, tuple[int, ...]] = {}
        for group in state.get("param_shapes") or []:
            shapes.update({k: tuple(v) for k, v in group.items()})
        buffers = {name: state["module"][name].clone() for name in state.get("buffer_names") or []
                   if name in state.get("module", {})}
        return cls(root, shapes, buffers, state.get("ds_config") or {}, state.get("global_steps"))

    def names(self) -> list[str]:
        on_disk = {p.name for p in (self.root / "zero").iterdir() if (p / "fp32.pt").is_file()}
        return sorted(on_disk | set(self.buffers), key=_param_order)

    def load(self, name: str) -> torch.Tensor:
        if name in self.buffers:
            return self.buffers[name]
        data = torch.load(self.root / "zero" / name / "fp32.pt", map_location="cpu", weights_only=False)
        tensor = data["param"] if isinstance(data, dict) else data
        if isinstance(data, dict) and data.get("is_expert_param"):
            return tensor  # already [E, ...] with every expert gathered
        shape = self.param_shapes.get(name)
        return tensor.reshape(shape) if shape is not None else tensor


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


def iter_hf_tensors(univ: UniversalCheckpoint, model_type: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, fp32 tensor) in layer order; holds at most one layer's worth of inputs."""
    pending: dict[str, torch.Tensor] = {}
    for name in univ.names():
        if name.endswith(_GATE) or name.endswith(_UP):
            pending[name] = univ.load(name)
            base = name[: -len(_GATE)]
            gate, up = pending.get(base + _GATE), pending.get(base + _UP)
            if gate is not None and up is not None:
                del pending[base + _GATE], pending[base + _UP]
                yield hf_name(base + _GATE, model_type), torch.cat([gate, up], dim=1)
            continue
        yield hf_name(name, model_type), univ.load(name)
    if pending:
        raise NITPError(f"the checkpoint has unpaired expert weights {sorted(pending)}; it is incomplete")


def expected_hf_shapes(hf_config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the HF model's state dict, from a model built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    config = hf_config_object(hf_config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    return shapes


def hf_config_object(hf_config: dict[str, Any]):
    from nitp_ds.models import hf_config_from_dict

    if hf_config.get("model_type") is None:
        raise NITPError("nitp_meta.json's hf_config has no model_type; re-save the checkpoint or add it")
    return hf_config_from_dict(hf_config)


def infer_model_type(meta: dict[str, Any], univ: UniversalCheckpoint) -> str:
    from nitp_ds.models import family_of

    model_type = meta.get("model_type") or (meta.get("hf_config") or {}).get("model_type")
    if model_type is None:
        preset = (univ.ds_config.get("expert_parallel") or {}).get("preset_model")
        shared = any(".mlp.shared_experts_gate." in n for n in univ.param_shapes)
        model_type = "qwen2_moe" if preset == "qwen3_moe" and shared else preset
    if model_type is None:
        raise NITPError("cannot tell the model family: no nitp_meta.json and no expert_parallel.preset_model in "
                        "the checkpoint's ds_config; write nitp_meta.json with model_type")
    family_of(model_type)
    return model_type


# -- writing --------------------------------------------------------------------------------------

class SafetensorsShardWriter:
    """Accumulates tensors up to `max_bytes` per shard; names files like save_pretrained at the end."""

    def __init__(self, directory: Path, prefix: str, max_bytes: int):
        self.directory, self.prefix, self.max_bytes = directory, prefix, max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffer_bytes + size > self.max_bytes:
            self.flush()
        self.buffer[name] = tensor.contiguous()
        self.buffer_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buffer:
            return
        save_file(self.buffer, str(self.directory / f"{self.prefix}.part{len(self.shards)}"), metadata={"format": "pt"})
        self.shards.append(list(self.buffer))
        self.buffer, self.buffer_bytes = {}, 0

    def close(self) -> list[str]:
        self.flush()
        n = len(self.shards)
        if n == 1:
            (self.directory / f"{self.prefix}.part0").rename(self.directory / f"{self.prefix}.safetensors")
            return [f"{self.prefix}.safetensors"]
        files, weight_map = [], {}
        for i, names in enumerate(self.shards):
            fname = f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.directory / f"{self.prefix}.part{i}").rename(self.directory / fname)
            files.append(fname)
            weight_map.update({name: fname for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return files + [f"{self.prefix}.safetensors.index.json"]


def write_safetensors(univ: UniversalCheckpoint, out: Path, *, model_type: str, dtype: torch.dtype, meta: dict[str, Any],
                      max_shard_bytes: int, show_progress: bool = True) -> tuple[list[str], int, int]:
    """Streams the universal checkpoint into `out` with HF names; returns (files, tensors, bytes)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    hf_config = meta.get("hf_config")
    expected = expected_hf_shapes(hf_config) if hf_config else None
    seen: set[str] = set()
    model = SafetensorsShardWriter(out, "model", max_shard_bytes)
    head = SafetensorsShardWriter(out, "nitp_head", 1 << 62)  # small: always one file
    names = univ.names()
    total = len(names) - sum(n.endswith(_UP) for n in names)
    with Progress(TextColumn("[bold]converting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), disable=not show_progress, transient=False) as progress:
        task = progress.add_task("", total=total)
        for name, tensor in iter_hf_tensors(univ, model_type):
            progress.update(task, advance=1, description=name)
            if name.startswith(HEAD_PREFIX):
                head.add(name[len(HEAD_PREFIX):], tensor.to(dtype))
                continue
            if expected is not None:
                if name not in expected:
                    raise NITPError(f"checkpoint tensor '{name}' has no place in the Hugging Face "
                                    f"{hf_config.get('model_type')} model; the AutoEP name mapping does not cover it")
                if tuple(tensor.shape) != expected[name]:
                    raise NITPError(f"checkpoint tensor '{name}' has shape {tuple(tensor.shape)}, the Hugging Face "
                                    f"model expects {expected[name]}; the checkpoint does not match nitp_meta.json")
            seen.add(name)
            model.add(name, tensor.to(dtype))
    if expected is not None and (missing := sorted(set(expected) - seen)):
        raise NITPError(f"the checkpoint lacks {len(missing)} tensor(s) of the Hugging Face model, e.g. "
                        f"{missing[:3]}; the checkpoint is incomplete or the mapping is wrong")
    files = model.close()
    n_model = sum(len(s) for s in model.shards)
    if head.total_bytes:
        files += head.close()
    return files, n_model + sum(len(s) for s in head.shards), model.total_bytes + head.total_bytes


def _peak_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def convert_checkpoint(src: str | Path, out: str | Path, *, to: str = "safetensors", dtype: str = "fp32",
                       force: bool = False, max_shard_size: int = DEFAULT_MAX_SHARD_BYTES,
                       workers: int | None = None, show_progress: bool = True) -> ConvertResult:
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
    check_checkpoint_files(ckpt)
    meta = read_meta(ckpt)
    meta.pop(FILES_KEY, None)  # the records describe the source's files, not what is written here
    final, tmp = prepare_output(out, force)
    try:
        if to == "universal":
            univ_dir = tmp / ckpt.name
            to_universal(ckpt, univ_dir, workers)
            (tmp / "latest").write_text(ckpt.name)
            if meta:
                (univ_dir / META).write_text(json.dumps(meta, indent=2) + "\n")
            result = ConvertResult(final, meta.get("step"), files=[ckpt.name, "latest"])
        else:
            univ_dir = tmp / ".universal"
            to_universal(ckpt, univ_dir, workers)
            univ = UniversalCheckpoint.open(univ_dir)
            model_type = infer_model_type(meta, univ)
            files, n, size = write_safetensors(univ, tmp, model_type=model_type, dtype=DTYPES[dtype], meta=meta,
                                               max_shard_bytes=max_shard_size, show_progress=show_progress)
            meta_out = dict(meta, step=meta.get("step", univ.step), converted_dtype=dtype)
            meta_out.setdefault("model_type", model_type)
            (tmp / META).write_text(json.dumps(meta_out, indent=2) + "\n")
            shutil.rmtree(univ_dir)
            (tmp / "latest_universal").unlink(missing_ok=True)  # ds_to_universal writes it beside its output
            result = ConvertResult(final, meta_out["step"], files=files + [META], num_tensors=n,
                                   total_bytes=size)
        commit_output(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.peak_rss_mib = _peak_mib(resource.RUSAGE_SELF)
    result.peak_rss_children_mib = _peak_mib(resource.RUSAGE_CHILDREN)
    return result
