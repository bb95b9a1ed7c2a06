"""`nitp eval`: validation loss, perplexity and hidden-state geometry of a model directory.

The source is a Hugging Face directory (`save_pretrained`, `nitp export`) or a consolidated
checkpoint written by `nitp convert`: HF-named `model*.safetensors`, `nitp_meta.json` (with the
HF config under "hf_config" when there is no `config.json`, and {"nitp": {"head", "head_mult",
"target_layer"}}) and, when the run trained with NITP, `nitp_head.safetensors`. With a head the
NITP loss is reported too. The model runs in a `NITPModel`, so losses are computed exactly as in
training (same masking, same chunked cross-entropy).

Geometry (effective rank, anisotropy; see `nitp_ds.metrics`) is measured on a fixed, seeded
sample of token states: the final hidden states after the final norm (the vector fed to the
LM head, h_t of the NITP loss), and with `per_layer` the residual stream after each block.
No DeepSpeed engine is needed; it runs on the GPU when torch sees one, else on the CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch

from nitp_ds.checkpoint.state import META, is_checkpoint_location, read_meta
from nitp_ds.errors import NITPError
from nitp_ds.losses import IGNORE
from nitp_ds.metrics import anisotropy, effective_rank, expert_load_stats, perplexity

HEAD_FILE = "nitp_head.safetensors"
META_FILE = META  # nitp_meta.json, beside `nitp convert` output too
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
DEFAULT_SEQ_LEN = 512


def evaluate(source: str | Path, data_dir: Any, *, batches: int = 20, seq_len: int | None = None,
             batch_size: int = 4, sample_tokens: int = 4096, seed: int = 0, per_layer: bool = False,
             out_json: str | Path | None = None, device: str | torch.device | None = None,
             dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Evaluate `source` on up to `batches` validation batches of `data_dir`; return flat metrics.

    Keys: val/loss_ntp, val/ppl (= exp(val/loss_ntp)), val/loss_nitp (with a head), val/loss_aux,
    val/loss_z, val/tokens, val/batches, val/moe/* (expert load over the evaluation),
    geometry/effective_rank, geometry/anisotropy, geometry/tokens, and with `per_layer`
    geometry/layer{k}/effective_rank and .../anisotropy for k = 0 (embedding output) … L
    (output of the last block, before the final norm). `data_dir` is a prepared data directory
    (or an already opened one). seq_len defaults to 512 capped at the model's context.
    """
    if batches < 1 or batch_size < 1 or sample_tokens < 2:
        raise NITPError(f"batches ({batches}) and batch_size ({batch_size}) must be >= 1 and sample_tokens "
                        f"({sample_tokens}) >= 2")
    if out_json is not None and Path(out_json).is_dir():
        raise NITPError(f"--out {out_json} is a directory; pass the path of the JSON file to write")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    data = open_validation_data(data_dir)  # before the model: a wrong --data fails in a second
    model, info = load_model(source, dtype=dtype)
    model.to(device)
    lm_config = model.lm.config
    if data.vocab_size > lm_config.vocab_size:
        raise NITPError(f"the data in {data_dir} has a vocabulary of {data.vocab_size} tokens but the model in "
                        f"{source} has {lm_config.vocab_size}; evaluate on data prepared with the model's tokenizer "
                        "(nitp prepare-data --tokenizer DIR)")
    seq_len = seq_len or min(DEFAULT_SEQ_LEN, getattr(lm_config, "max_position_embeddings", DEFAULT_SEQ_LEN))
    stream = validation_batches(data, seq_len, batch_size, batches, seed)
    totals = run_batches(model, stream, lm_config.vocab_size, sample_tokens, batches, seed, per_layer, device)
    if totals["tokens"] == 0:
        raise NITPError(f"validation split of {data_dir} gave no tokens to score; prepare data with a val split "
                        "(see `nitp prepare-data --help`) or lower --seq-len")

    ntp = totals["ntp"] / totals["tokens"]
    results: dict[str, Any] = {"source": str(source), "data": str(data_dir), **info, "seq_len": seq_len,
                               "val/loss_ntp": ntp, "val/ppl": perplexity(ntp)}
    if model.nitp_head is not None:
        results["val/loss_nitp"] = totals["nitp"] / max(totals["nitp_positions"], 1)
    results["val/loss_aux"] = totals["aux"] / totals["batches"]
    results["val/loss_z"] = totals["z"] / totals["batches"]
    results["val/tokens"] = totals["tokens"]
    results["val/batches"] = totals["batches"]
    if totals["load"] is not None:
        results.update({f"val/{k}": v for k, v in expert_load_stats(totals["load"]).items()})
    results.update(geometry(totals["states"], sample_tokens))
    if out_json is not None:
        from nitp_ds.checkpoint.state import atomic_write_text

        atomic_write_text(Path(out_json), json.dumps(results, indent=2) + "\n")
    return results


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_model(source: str | Path, dtype: torch.dtype = torch.float32):
    """An `NITPModel` around the HF model in `source`, with its NITP head when the directory has one.

    The Hugging Face config comes from `config.json`, or else from the "hf_config" that
    `nitp convert` copies into `nitp_meta.json`.
    """
    from nitp_ds.nitp import NITPModel

    path = Path(source)
    if not path.is_dir():
        raise NITPError(f"{path} is not a directory; pass a Hugging Face directory (save_pretrained, `nitp export`) "
                        "or the output of `nitp convert`")
    if is_checkpoint_location(path):
        raise NITPError(f"{path} is a DeepSpeed checkpoint or run directory; run `nitp convert {path} --out DIR` "
                        "and evaluate DIR")
    meta = read_meta(path, fix="re-run `nitp convert`")
    config = load_hf_config(path, meta)
    lm = load_language_model(path, config, dtype)
    lm.config.use_cache = False
    nitp = nitp_settings(meta, path, config)
    head_file = path / HEAD_FILE
    if head_file.is_file() and nitp is None:
        raise NITPError(f"{head_file} has no {META_FILE} beside it (with {{\"nitp\": {{\"head\", \"head_mult\", "
                        "\"target_layer\"}}}}); re-run `nitp convert` to write it")
    if nitp is None or nitp["head"] == "none" or not head_file.is_file():
        model = NITPModel(lm, head="none", target_layer=0)
        return model.to(dtype), {"family": config.model_type, "nitp_head": None}
    model = NITPModel(lm, head=nitp["head"], head_mult=nitp["head_mult"], target_layer=nitp["target_layer"])
    load_head(model.nitp_head, head_file)
    info = {"family": config.model_type, "nitp_head": nitp["head"], "target_layer": nitp["target_layer"]}
    return model.to(dtype), info


def load_hf_config(path: Path, meta: dict[str, Any]):
    from transformers import AutoConfig

    from nitp_ds.models import hf_config_from_dict

    if (path / "config.json").is_file():
        return AutoConfig.from_pretrained(path, local_files_only=True)
    hf_config = meta.get("hf_config")
    if not isinstance(hf_config, dict) or "model_type" not in hf_config:
        raise NITPError(f"{path} has no config.json (nor an hf_config in {META_FILE}); pass a Hugging Face "
                        "directory (save_pretrained, `nitp export`) or the output of `nitp convert`")
    return hf_config_from_dict(hf_config)


def nitp_settings(meta: dict[str, Any], path: Path, config) -> dict[str, Any] | None:
    """The head's kind, width multiplier and target layer from nitp_meta.json's "nitp", or None."""
    nitp = meta.get("nitp")
    if nitp is None:
        return None
    if not isinstance(nitp, dict) or "head" not in nitp:
        raise NITPError(f"{path / META_FILE}: 'nitp' must hold head, head_mult and target_layer, got {nitp!r}; "
                        "re-run `nitp convert`")
    target = nitp.get("target_layer")
    if target is None:  # the recipe default
        from nitp_ds.resolve import default_target_layer

        target = default_target_layer(config.num_hidden_layers)
    return {"head": nitp["head"], "head_mult": int(nitp.get("head_mult", 4)), "target_layer": int(target)}


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
    from safetensors.torch import load_file

    lm = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    result = lm.load_state_dict(state, strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and tied)]
    if missing or result.unexpected_keys:
        raise NITPError(f"weights in {path} do not match its config: {len(missing)} missing "
                        f"(e.g. {missing[:1]}), {len(result.unexpected_keys)} unexpected "
                        f"(e.g. {result.unexpected_keys[:1]}); re-run `nitp convert`")
    if tied:
        lm.tie_weights()
    return lm


def load_head(head: torch.nn.Module, file: Path) -> None:
    from safetensors.torch import load_file

    state = {k.removeprefix("nitp_head."): v for k, v in load_file(str(file)).items()}
    expected = head.state_dict()
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
        got = {k: tuple(v.shape) for k, v in state.items()}
        want = {k: tuple(v.shape) for k, v in expected.items()}
        raise NITPError(f"{file} does not match the head in {META_FILE}: has {got}, expected {want}; "
                        "re-run `nitp convert`")
    head.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# Data and the evaluation pass
# ---------------------------------------------------------------------------------------------


def open_validation_data(data_dir: Any):
    """The prepared data directory (opened and checked), or `data_dir` itself when it is already open."""
    from nitp_ds.data.dataset import open_data

    return open_data(data_dir) if isinstance(data_dir, (str, Path)) else data_dir


def validation_batches(data: Any, seq_len: int, batch_size: int, batches: int,
                       seed: int) -> Iterable[dict[str, torch.Tensor]]:
    """Up to `batches` fixed validation batches {"input_ids", "labels"} from the prepared data."""
    from nitp_ds.data.dataset import TokenLoader

    return TokenLoader(open_validation_data(data), "val", seq_len, batch_size, seed=seed).val_batches(batches)


def run_batches(model, stream: Iterable[dict[str, torch.Tensor]], vocab_size: int, sample_tokens: int,
                batches: int, seed: int, per_layer: bool, device: torch.device) -> dict[str, Any]:
    """One no-grad pass: summed losses and counts, summed expert load, sampled token states."""
    model.eval()
    model.requires_grad_(False)  # the chunked cross-entropy then computes no gradients
    captured: dict[str, torch.Tensor] = {}
    hooks = [model.lm.model.norm.register_forward_hook(_capture(captured, "final"))]
    if per_layer:
        hooks.append(model.lm.get_input_embeddings().register_forward_hook(_capture(captured, "layer0")))
        for index, layer in enumerate(model.lm.model.layers):
            hooks.append(layer.register_forward_hook(_capture(captured, f"layer{index + 1}")))
    per_batch = math.ceil(sample_tokens / batches)
    generator = torch.Generator().manual_seed(seed)
    totals: dict[str, Any] = {"ntp": 0.0, "tokens": 0, "nitp": 0.0, "nitp_positions": 0, "aux": 0.0, "z": 0.0,
                              "batches": 0, "load": None, "states": {}}
    try:
        with torch.no_grad():
            for number, batch in enumerate(stream):
                if number >= batches:
                    break
                input_ids = batch["input_ids"].to(device)
                labels = batch["labels"].to(device)
                _check_ids(input_ids, vocab_size)
                captured.clear()
                parts = model(input_ids, labels)
                tokens = int(parts["tokens"])
                totals["ntp"] += float(parts["ntp"]) * tokens
                totals["tokens"] += tokens
                positions = int((labels[:, :-1] != IGNORE).sum())
                totals["nitp"] += float(parts["nitp"]) * positions
                totals["nitp_positions"] += positions
                totals["aux"] += float(parts["aux"])
                totals["z"] += float(parts["z"])
                totals["batches"] += 1
                load = parts["load"].detach().float().cpu()
                if load.numel():
                    totals["load"] = load if totals["load"] is None else totals["load"] + load
                _sample_states(captured, labels, per_batch, generator, totals["states"])
    finally:
        for handle in hooks:
            handle.remove()
    return totals


def _capture(store: dict[str, torch.Tensor], key: str):
    def hook(module, args, output) -> None:
        store[key] = output[0] if isinstance(output, tuple) else output
    return hook


def _check_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    largest = int(input_ids.max())
    if largest >= vocab_size or int(input_ids.min()) < 0:
        raise NITPError(f"validation token id {largest} is outside the model's vocabulary of {vocab_size}; "
                        "evaluate on data prepared with the model's tokenizer")


def _sample_states(captured: dict[str, torch.Tensor], labels: torch.Tensor, count: int,
                   generator: torch.Generator, out: dict[str, list[torch.Tensor]]) -> None:
    """Keep the states at `count` seeded random positions whose label is scored (not padding)."""
    valid = torch.nonzero((labels != IGNORE).reshape(-1).cpu()).flatten()
    if valid.numel() == 0:
        return
    chosen = valid[torch.randperm(valid.numel(), generator=generator)[:count]]
    for key, states in captured.items():
        flat = states.reshape(-1, states.shape[-1])
        out.setdefault(key, []).append(flat[chosen.to(flat.device)].float().cpu())


def geometry(states: dict[str, list[torch.Tensor]], sample_tokens: int) -> dict[str, float]:
    results: dict[str, float] = {}
    if not states.get("final"):
        return results
    for key, chunks in states.items():
        sample = torch.cat(chunks)[:sample_tokens]
        prefix = "geometry/" if key == "final" else f"geometry/{key}/"
        results[prefix + "effective_rank"] = effective_rank(sample)
        results[prefix + "anisotropy"] = anisotropy(sample) if sample.shape[0] >= 2 else float("nan")
        if key == "final":
            results["geometry/tokens"] = int(sample.shape[0])
    return dict(sorted(results.items(), key=lambda item: _by_layer(item[0])))


def _by_layer(key: str) -> tuple[int, str]:
    parts = key.split("/")
    if len(parts) == 3 and parts[1].startswith("layer"):
        return int(parts[1][5:]) + 1, parts[2]
    return 0, key


# ---------------------------------------------------------------------------------------------
# Presentation (used by the CLI)
# ---------------------------------------------------------------------------------------------


def results_table(results: dict[str, Any]):
    """A rich table of the metrics: losses first, then expert load, then geometry."""
    from rich.table import Table

    table = Table(title=f"eval: {results.get('source', '')}", show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in results.items():
        if key in ("source", "data"):
            continue
        if isinstance(value, float):
            text = f"{value:.4f}" if math.isfinite(value) and abs(value) < 1e6 else f"{value:.4g}"
        else:
            text = str(value)
        table.add_row(key, text)
    return table
