"""What `nitp eval` is pointed at, opened as an `NITPModel`, with what is known of its training.

Sources:
- a run directory, its `checkpoints/` directory or a `checkpoints/global_stepN` directory (DeepSpeed
  ZeRO-3 / AutoEP files, any world size): consolidated first with `nitp convert`'s code (fp32) into a
  temporary directory ($TMPDIR), which is removed once the model is loaded, then read as below;
- the output of `nitp convert`: HF-named `model*.safetensors`, `nitp_meta.json` (the HF config under
  "hf_config" when there is no `config.json`, and {"nitp": {"head", "head_mult", "target_layer"}}) and,
  when the run trained with NITP, `nitp_head.safetensors` (then the NITP loss is reported too);
- a Hugging Face directory (`save_pretrained`, `nitp export`; an export's `nitp_export.json` keeps the
  training sequence length and data directory).

What is known of the training: the sequence length from nitp_meta.json's "seq_len" (written by
`nitp train` with each checkpoint and copied by `nitp convert`), else from the run's
`resolved_config.yaml` (checkpoints saved before "seq_len" was recorded); the data directory from
nitp_meta.json's "data_dir".
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nitp_ds.checkpoint.integrity import check_file
from nitp_ds.checkpoint.state import EXPORT_INFO, META, is_checkpoint_location, read_meta, resolve_checkpoint
from nitp_ds.errors import NITPError

HEAD_FILE = "nitp_head.safetensors"
REWRITE = "copy it again or re-run `nitp convert`/`nitp export`"
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
RESOLVED_CONFIG = "resolved_config.yaml"  # the trainer's copy of the recipe in a run directory


@dataclass
class Source:
    model: Any  # NITPModel, on the CPU
    info: dict[str, Any] = field(default_factory=dict)  # family, nitp_head, target_layer
    train_seq_len: int | None = None
    train_seq_len_from: str = ""  # where train_seq_len was read
    data_dir: str | None = None  # the data the run trained on, when recorded


def open_source(source: str | Path, dtype: torch.dtype = torch.float32) -> Source:
    """The model in `source` (a run, a checkpoint, `nitp convert` output or an HF directory); see the module doc."""
    path = Path(source)
    if not path.is_dir():
        raise NITPError(f"{path} is not a directory; pass a run directory, a checkpoints/global_stepN directory, "
                        "a Hugging Face directory (save_pretrained, `nitp export`) or the output of `nitp convert`")
    if not is_checkpoint_location(path):
        return open_directory(path, dtype)
    from nitp_ds.checkpoint.convert import convert_checkpoint

    ckpt = resolve_checkpoint(path)
    with tempfile.TemporaryDirectory(prefix="nitp-eval-") as tmp:
        consolidated = Path(tmp) / "consolidated"
        convert_checkpoint(ckpt, consolidated, dtype="fp32", show_progress=False)
        opened = open_directory(consolidated, dtype, run_dir=ckpt.parent.parent, shown_as=ckpt)
    opened.info["checkpoint"] = str(ckpt)
    return opened


def open_directory(path: Path, dtype: torch.dtype, run_dir: Path | None = None,
                   shown_as: Path | None = None) -> Source:
    """An HF directory or `nitp convert` output, as an `NITPModel` with its NITP head when it has one.
    `run_dir`: the run it came from; `shown_as`: the directory to name in messages (a checkpoint consolidated
    into a temporary `path`)."""
    from nitp_ds.nitp import NITPModel

    for weights in sorted(path.glob("*.safetensors")):  # a cut-short file: one line naming it, not a traceback
        if weights.name != HEAD_FILE:  # the head is checked where it is read, after its settings
            check_file(weights, None, fix=REWRITE)
    meta = read_meta(path, fix="re-run `nitp convert`")
    meta_file = (shown_as or path) / META
    if not meta and (path / EXPORT_INFO).is_file():  # an export: what it keeps of its training
        meta, meta_file = export_info(path), path / EXPORT_INFO
    config = load_hf_config(path, meta)
    lm = load_language_model(path, config, dtype)
    lm.config.use_cache = False
    nitp = nitp_settings(meta, path, config)
    head_file = path / HEAD_FILE
    if head_file.is_file() and nitp is None:
        raise NITPError(f"{head_file} has no {META} beside it (with {{\"nitp\": {{\"head\", \"head_mult\", "
                        "\"target_layer\"}}}}); re-run `nitp convert` to write it")
    if nitp is None or nitp["head"] == "none" or not head_file.is_file():
        model = NITPModel(lm, head="none", target_layer=0)
        info = {"family": config.model_type, "nitp_head": None}
    else:
        model = NITPModel(lm, head=nitp["head"], head_mult=nitp["head_mult"], target_layer=nitp["target_layer"],
                          loss=nitp["loss"], offset=nitp["offset"])
        load_head(model.nitp_head, head_file)
        info = {"family": config.model_type, "nitp_head": nitp["head"], "target_layer": nitp["target_layer"]}
    seq_len, seq_len_from = training_seq_len(meta, meta_file, run_dir)
    return Source(model.to(dtype), info, seq_len, seq_len_from, meta.get("data_dir"))


def export_info(path: Path) -> dict[str, Any]:
    """An export's nitp_export.json (training seq_len, data_dir), or {} (another Hugging Face directory)."""
    import json

    try:
        info = json.loads((path / EXPORT_INFO).read_text())
    except (OSError, ValueError):
        return {}
    return {k: info[k] for k in ("seq_len", "data_dir") if isinstance(info, dict) and k in info}


def training_seq_len(meta: dict[str, Any], meta_file: Path, run_dir: Path | None) -> tuple[int | None, str]:
    """The sequence length the model was trained at, and the file it was read from; (None, "") when unknown."""
    if isinstance(meta.get("seq_len"), int):
        return meta["seq_len"], str(meta_file)
    resolved = run_dir / RESOLVED_CONFIG if run_dir is not None else None
    if resolved is not None and resolved.is_file():
        import yaml

        try:
            raw = yaml.safe_load(resolved.read_text())
            seq_len = raw["data"]["seq_len"]
        except (yaml.YAMLError, KeyError, TypeError):
            return None, ""
        if isinstance(seq_len, int):
            return seq_len, str(resolved)
    return None, ""


def load_hf_config(path: Path, meta: dict[str, Any]):
    from transformers import AutoConfig

    from nitp_ds.models import hf_config_from_dict

    if (path / "config.json").is_file():
        return AutoConfig.from_pretrained(path, local_files_only=True)
    hf_config = meta.get("hf_config")
    if not isinstance(hf_config, dict) or "model_type" not in hf_config:
        raise NITPError(f"{path} has no config.json (nor an hf_config in {META}); pass a Hugging Face "
                        "directory (save_pretrained, `nitp export`), the output of `nitp convert`, or a run")
    return hf_config_from_dict(hf_config)


def nitp_settings(meta: dict[str, Any], path: Path, config) -> dict[str, Any] | None:
    """The head's kind, width multiplier and target layer from nitp_meta.json's "nitp", or None."""
    nitp = meta.get("nitp")
    if nitp is None:
        return None
    if not isinstance(nitp, dict) or "head" not in nitp:
        raise NITPError(f"{path / META}: 'nitp' must hold head, head_mult and target_layer, got {nitp!r}; "
                        "re-run `nitp convert`")
    target = nitp.get("target_layer")
    if target is None:  # the recipe default
        from nitp_ds.resolve import default_target_layer

        target = default_target_layer(config.num_hidden_layers)
    # loss and offset were added with the ablation options; checkpoints from before them used cosine, offset 1
    return {"head": nitp["head"], "head_mult": int(nitp.get("head_mult", 4)), "target_layer": int(target),
            "loss": nitp.get("loss", "cosine"), "offset": int(nitp.get("offset", 1))}


@contextlib.contextmanager
def _with_config_json(path: Path, config):
    """`path` itself when it has a config.json; else a temporary directory of links to its files plus one.

    `nitp convert` writes no config.json, and from_pretrained (transformers 5.22) then fails looking for a
    generation config beside the weights; from_pretrained is still wanted for its weight-name conversions.
    """
    if (path / "config.json").is_file():
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="nitp-eval-") as tmp:
        for item in path.iterdir():
            (Path(tmp) / item.name).symlink_to(item.resolve())
        config.save_pretrained(tmp)
        yield Path(tmp)


def load_language_model(path: Path, config, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    if any((path / name).is_file() for name in HF_WEIGHT_FILES):
        with _with_config_json(path, config) as directory:
            lm, loading = AutoModelForCausalLM.from_pretrained(directory, config=config, local_files_only=True,
                                                               dtype=dtype, output_loading_info=True)
        missing = sorted(loading.get("missing_keys") or [])
        if missing:
            raise NITPError(f"{path} lacks weights for {len(missing)} parameters (e.g. {missing[0]}); the "
                            "directory is incomplete or from another model shape: re-run `nitp convert`/`nitp export`")
        return lm
    files = sorted(p for p in path.glob("*.safetensors") if p.name != HEAD_FILE)
    if not files:
        raise NITPError(f"{path} has a model config but no model weights (*.safetensors); re-run `nitp convert` "
                        "or `nitp export`")
    from safetensors import safe_open

    from nitp_ds.models import model_from_tensors

    def tensors():  # one at a time, file by file
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)

    return model_from_tensors(config, tensors(), dtype, source=str(path),
                              fix="re-run `nitp convert` or `nitp export`")


def load_head(head: torch.nn.Module, file: Path) -> None:
    from safetensors.torch import load_file

    check_file(file, None, fix=REWRITE)

    state = {k.removeprefix("nitp_head."): v for k, v in load_file(str(file)).items()}
    expected = head.state_dict()
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
        got = {k: tuple(v.shape) for k, v in state.items()}
        want = {k: tuple(v.shape) for k, v in expected.items()}
        raise NITPError(f"{file} does not match the head in {META}: has {got}, expected {want}; "
                        "re-run `nitp convert`")
    head.load_state_dict(state)
