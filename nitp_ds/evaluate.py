"""The one validation loss (the trainer's evaluation and `nitp eval` both call `validation_loss`), and `nitp eval`.

The validation loss, defined once:
- **Sample.** The val split of every source is cut into windows of seq_len + 1 tokens with stride
  seq_len, as the training data is (`nitp_ds.data.dataset`). With W windows in the split (sources one
  after another) and a cap of `max_tokens` scored tokens, n = min(W, max_tokens // seq_len) windows
  are scored: window ⌊(k + ½)·W/n⌋ for k = 0 … n−1, evenly spaced over the whole split (all of it when
  it fits under the cap). Each source thus counts in proportion to its val tokens; data.weights do
  not apply. The sample is a function of the data, seq_len and the cap only: not of the batch size,
  the world size or a seed.
- **Loss.** The token-weighted mean next-token cross-entropy over every scored token of the sample
  (sum of per-token losses / number of tokens), computed by the model's own loss (`NITPModel`).
- **Standard error.** Over windows (one window = one scored sequence of seq_len tokens), by the ratio
  estimator: SE² = n/(n−1) · Σ_i (s_i − L·t_i)² / (Σ_i t_i)², with s_i the summed loss and t_i the
  scored tokens of window i and L the loss; with equal t_i it is the standard deviation of the
  per-window losses over √n. Neighbouring windows are not independent draws, so read it as the
  sampling error of this sample, not a bound on the distance to the loss on infinite data.
- **Sequence length.** The model's training length when known (the trainer's data.seq_len;
  `nitp eval` reads it from the checkpoint, see `nitp_ds.model_source`).
- **Several ranks** (ZeRO-3): rank r scores windows r, r+R, r+2R, …; every rank runs the same number of
  forward passes (a rank whose share has run out scores a row with no scored label), and the sums
  above are all-reduced in float64: the result does not depend on the world size, to float rounding.

`nitp eval` (`evaluate`) adds hidden-state geometry (effective rank, anisotropy; `nitp_ds.metrics`) on a
seeded sample of token states: the final hidden states after the final norm (the vector fed to the LM
head, h_t of the NITP loss), and with `per_layer` the residual stream after each block; and the NITP loss
when the source has a head. It needs no DeepSpeed engine; it runs on the GPU when torch sees one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from nitp_ds.config import TrainConfig
from nitp_ds.errors import NITPError
from nitp_ds.losses import IGNORE
from nitp_ds.metrics import anisotropy, effective_rank, expert_load_stats, perplexity

DEFAULT_EVAL_TOKENS = TrainConfig.eval_tokens  # 1,000,000: the cap on scored tokens (`nitp eval --tokens`)
SPLIT = "val"
Window = tuple[str, int]  # (source, first token of the window in that source's val stream)


# ---------------------------------------------------------------------------------------------
# The sample
# ---------------------------------------------------------------------------------------------


def validation_windows(data: Any, seq_len: int, max_tokens: int = DEFAULT_EVAL_TOKENS) -> list[Window]:
    """The windows that the validation loss scores, evenly spaced over the whole val split (see the module doc)."""
    if seq_len < 1:
        raise NITPError(f"seq_len must be >= 1, got {seq_len}")
    if max_tokens < seq_len:
        raise NITPError(f"the validation token cap ({max_tokens}) is below one sequence of {seq_len} tokens; raise "
                        "train.eval_tokens / `nitp eval --tokens` or lower the sequence length")
    counts = {name: max(0, (data.source_tokens(SPLIT, name) - 1) // seq_len) for name in data.source_names}
    total = sum(counts.values())
    if total == 0:
        raise NITPError(f"the val split of {data.path} has {data.num_tokens(SPLIT)} tokens, fewer than one window "
                        f"of seq_len + 1 = {seq_len + 1} in any source; prepare data with a larger val split "
                        "(`nitp prepare-data --val-fraction`) or lower the sequence length")
    n = min(total, max_tokens // seq_len)
    starts = np.cumsum([0] + list(counts.values()))
    picks = ((np.arange(n) + 0.5) * total / n).astype(np.int64)
    windows = []
    for pick in picks.tolist():
        which = int(np.searchsorted(starts, pick, side="right")) - 1
        windows.append((data.source_names[which], (pick - int(starts[which])) * seq_len))
    return windows


def read_window(data: Any, window: Window, seq_len: int) -> np.ndarray:
    source, start = window
    return data.stream(SPLIT, source).read(start, seq_len + 1)


def rank_batches(data: Any, windows: list[Window], seq_len: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, vocab_size: int | None = None,
                 pad: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Rank `rank`'s share of the sample as batches {"input_ids", "labels"} of up to `batch_size` rows.

    Every rank yields ceil(ceil(n / world_size) / batch_size) batches: ZeRO-3 and AutoEP run collectives
    inside each forward pass, so a rank whose share has run out yields a row with no scored label. With `pad`,
    every batch has `batch_size` rows (such rows fill the last), so that compiled layers see one shape.
    """
    mine = windows[rank::world_size]
    steps = math.ceil(math.ceil(len(windows) / world_size) / batch_size)
    for step in range(steps):
        rows = mine[step * batch_size:(step + 1) * batch_size]
        fill = max(0, (batch_size if pad else 1) - len(rows))
        tokens = torch.from_numpy(np.stack([read_window(data, w, seq_len) for w in rows + windows[:1] * fill]))
        if vocab_size is not None and int(tokens.max()) >= vocab_size:
            raise NITPError(f"validation token id {int(tokens.max())} is outside the model's vocabulary of "
                            f"{vocab_size}; evaluate on data prepared with the model's tokenizer")
        labels = tokens[:, 1:].clone()
        labels[len(rows):] = IGNORE  # filler rows: nothing scored
        yield {"input_ids": tokens[:, :-1].contiguous(), "labels": labels}


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------

# Float64 sums over windows, all-reduced across ranks: Σs, Σt, Σs², Σs·t, Σt², windows, NITP loss × positions,
# NITP positions.
SUMS = ("loss", "tokens", "loss_sq", "loss_tokens", "tokens_sq", "windows", "nitp", "nitp_positions")


@dataclass
class ValidationLoss:
    loss: float  # token-weighted mean next-token loss
    stderr: float  # standard error over windows (NaN with fewer than 2)
    tokens: int  # scored tokens
    windows: int  # scored sequences of seq_len tokens
    seq_len: int
    nitp: float | None  # mean NITP loss over the positions it scores; None for a model without a head

    @classmethod
    def from_sums(cls, sums: list[float], seq_len: int, has_head: bool) -> "ValidationLoss":
        s = dict(zip(SUMS, sums))
        tokens, n = s["tokens"], s["windows"]
        loss = s["loss"] / max(tokens, 1.0)
        stderr = float("nan")
        if n >= 2 and tokens > 0:
            squares = s["loss_sq"] - 2 * loss * s["loss_tokens"] + loss * loss * s["tokens_sq"]
            stderr = math.sqrt(max(squares, 0.0) * n / (n - 1)) / tokens
        nitp = s["nitp"] / max(s["nitp_positions"], 1.0) if has_head else None
        return cls(loss, stderr, int(round(tokens)), int(round(n)), seq_len, nitp)

    def record(self) -> dict[str, float]:
        """The metrics.jsonl / summary.json keys."""
        out = {"val/loss_ntp": self.loss, "val/ppl": perplexity(self.loss), "val/loss_ntp_se": self.stderr,
               "val/tokens": self.tokens, "val/windows": self.windows, "val/seq_len": self.seq_len}
        if self.nitp is not None:
            out["val/loss_nitp"] = self.nitp
        return out


def batch_sums(parts: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """One batch's contribution to SUMS, from the model's per-row losses (see `NITPModel.forward`)."""
    if "ntp_rows" not in parts:
        raise NITPError("the model returned no per-sequence losses (ntp_rows); the validation loss needs an "
                        "NITPModel run without gradients")
    s = parts["ntp_rows"].double()
    t = parts["tokens_rows"].double()
    positions = (labels[:, :-1] != IGNORE).sum().double()
    return torch.stack([s.sum(), t.sum(), (s * s).sum(), (s * t).sum(), (t * t).sum(), (t > 0).sum().double(),
                        parts["nitp"].double() * positions, positions])


def validation_loss(model: torch.nn.Module, data: Any, *, seq_len: int, max_tokens: int = DEFAULT_EVAL_TOKENS,
                    batch_size: int = 8, device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
                    pad: bool = False, on_batch: Callable[[dict, dict], None] | None = None) -> ValidationLoss:
    """The validation loss of `model` on the val split of `data` (see the module doc for the definition).

    `model` is an `NITPModel`: the trainer passes its DeepSpeed engine's module (ZeRO-3 gathers parameters
    through the module's own hooks), `nitp eval` a loaded one. With `world_size` > 1 every rank of the default
    process group calls this together; `pad` gives every batch `batch_size` rows (see `rank_batches`).
    `on_batch(batch, parts)` sees every batch after its forward pass.
    """
    if batch_size < 1:
        raise NITPError(f"the evaluation batch size must be >= 1, got {batch_size}")
    windows = validation_windows(data, seq_len, max_tokens)
    vocab_size = model.lm.config.vocab_size if hasattr(model, "lm") else None
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(SUMS), dtype=torch.float64, device=device)
    try:
        with torch.no_grad():
            for batch in rank_batches(data, windows, seq_len, batch_size, rank, world_size, vocab_size, pad):
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                parts = model(batch["input_ids"], batch["labels"])
                sums += batch_sums(parts, batch["labels"])
                if on_batch is not None:
                    on_batch(batch, parts)
    finally:
        model.train(was_training)
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(sums)
    return ValidationLoss.from_sums(sums.tolist(), seq_len, getattr(model, "nitp_head", None) is not None)


def summary_line(record: dict[str, Any]) -> str:
    """One line for the console: loss ± SE, perplexity, tokens and sequence length."""
    text = (f"val ntp {record['val/loss_ntp']:.4f} ± {record['val/loss_ntp_se']:.4f} (SE over "
            f"{record['val/windows']:,} sequences)  ppl {record['val/ppl']:.2f}  {record['val/tokens']:,} tokens "
            f"at seq_len {record['val/seq_len']}")
    if "val/loss_nitp" in record:
        text += f"  val nitp {record['val/loss_nitp']:.4f}"
    return text


# ---------------------------------------------------------------------------------------------
# `nitp eval`
# ---------------------------------------------------------------------------------------------


def evaluate(source: str | Path, data_dir: Any = None, *, max_tokens: int = DEFAULT_EVAL_TOKENS,
             seq_len: int | None = None, batch_size: int = 8, sample_tokens: int = 4096, seed: int = 0,
             per_layer: bool = False, out_json: str | Path | None = None, device: str | torch.device | None = None,
             dtype: torch.dtype | None = None) -> dict[str, Any]:
    """`nitp eval`: the validation loss of `source` (see `nitp_ds.model_source` for what it may be), its
    perplexity, NITP loss (with a head), router losses, expert load and hidden-state geometry; flat metrics.

    Keys: val/loss_ntp, val/loss_ntp_se, val/ppl, val/tokens, val/windows, val/seq_len (and seq_len_from,
    where it was read), val/loss_nitp (with a head), val/loss_aux, val/loss_z (means over batches),
    val/moe/*, geometry/effective_rank, geometry/anisotropy, geometry/tokens, and with `per_layer`
    geometry/layer{k}/… for k = 0 (embedding output) … L (output of the last block, before the final
    norm). `data_dir` defaults to the data the run trained on, when the checkpoint records it.
    """
    from nitp_ds.model_source import open_source

    if batch_size < 1 or sample_tokens < 2:
        raise NITPError(f"batch_size ({batch_size}) must be >= 1 and sample_tokens ({sample_tokens}) >= 2")
    if out_json is not None and Path(out_json).is_dir():
        raise NITPError(f"--out {out_json} is a directory; pass the path of the JSON file to write")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    data = open_validation_data(data_dir) if data_dir is not None else None  # a wrong --data fails in a second
    opened = open_source(source, dtype=dtype)
    if data is None:
        if not opened.data_dir:
            raise NITPError(f"{source} does not record the data it was trained on; pass --data DIR (a directory "
                            "written by `nitp prepare-data`)")
        data_dir, data = opened.data_dir, open_validation_data(opened.data_dir)
    model = opened.model.to(device)
    lm_config = model.lm.config
    if data.vocab_size > lm_config.vocab_size:
        raise NITPError(f"the data in {data_dir} has a vocabulary of {data.vocab_size} tokens but the model in "
                        f"{source} has {lm_config.vocab_size}; evaluate on data prepared with the model's tokenizer "
                        "(nitp prepare-data --tokenizer DIR)")
    seq_len, seq_len_from = choose_seq_len(seq_len, opened, lm_config)

    probe = Probe(model, per_layer, sample_tokens, seed,
                  batches=math.ceil(len(validation_windows(data, seq_len, max_tokens)) / batch_size))
    try:
        loss = validation_loss(model, data, seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size,
                               device=device, on_batch=probe.on_batch)
    finally:
        probe.close()
    results: dict[str, Any] = {"source": str(source), "data": str(data_dir), **opened.info,
                               "seq_len_from": seq_len_from, **loss.record(), **probe.results()}
    if out_json is not None:
        from nitp_ds.files import atomic_write_text

        atomic_write_text(Path(out_json), json.dumps(results, indent=2) + "\n")
    return results


def open_validation_data(data_dir: Any):
    """The prepared data directory (opened and checked), or `data_dir` itself when it is already open."""
    from nitp_ds.data.dataset import open_data

    return open_data(data_dir) if isinstance(data_dir, (str, Path)) else data_dir


def choose_seq_len(asked: int | None, opened: Any, lm_config) -> tuple[int, str]:
    """--seq-len, else the training length the source records, else the model's context; and where it came from."""
    limit = getattr(lm_config, "max_position_embeddings", None)
    if asked is not None:
        seq_len, origin = asked, "--seq-len"
    elif opened.train_seq_len is not None:
        seq_len, origin = opened.train_seq_len, f"training length, from {opened.train_seq_len_from}"
    elif limit is not None:
        seq_len, origin = limit, "the model's max_position_embeddings (the training length is not recorded)"
    else:
        raise NITPError("the source records no training length and its config no max_position_embeddings; "
                        "pass --seq-len")
    if seq_len < 1 or (limit is not None and seq_len > limit):
        raise NITPError(f"--seq-len {seq_len} is outside the model's 1..{limit} positions; pass a length within it")
    return seq_len, origin


class Probe:
    """What `nitp eval` gathers besides the loss: token states for the geometry, router losses, expert load."""

    def __init__(self, model, per_layer: bool, sample_tokens: int, seed: int, batches: int):
        self.sample_tokens = sample_tokens
        self.per_batch = math.ceil(sample_tokens / max(batches, 1))
        self.generator = torch.Generator().manual_seed(seed)
        self.captured: dict[str, torch.Tensor] = {}
        self.states: dict[str, list[torch.Tensor]] = {}
        self.aux = self.z = 0.0
        self.batches = 0
        self.load: torch.Tensor | None = None
        self.hooks = [model.lm.model.norm.register_forward_hook(self._capture("final"))]
        if per_layer:
            self.hooks.append(model.lm.get_input_embeddings().register_forward_hook(self._capture("layer0")))
            for index, layer in enumerate(model.lm.model.layers):
                self.hooks.append(layer.register_forward_hook(self._capture(f"layer{index + 1}")))

    def _capture(self, key: str):
        def hook(module, args, output) -> None:
            self.captured[key] = output[0] if isinstance(output, tuple) else output
        return hook

    def on_batch(self, batch: dict[str, torch.Tensor], parts: dict[str, torch.Tensor]) -> None:
        self.aux += float(parts["aux"])
        self.z += float(parts["z"])
        self.batches += 1
        load = parts["load"].detach().float().cpu()
        if load.numel():
            self.load = load if self.load is None else self.load + load
        # The states at `per_batch` seeded random positions whose label is scored.
        valid = torch.nonzero((batch["labels"] != IGNORE).reshape(-1).cpu()).flatten()
        chosen = valid[torch.randperm(valid.numel(), generator=self.generator)[:self.per_batch]]
        for key, states in self.captured.items():
            flat = states.reshape(-1, states.shape[-1])
            self.states.setdefault(key, []).append(flat[chosen.to(flat.device)].float().cpu())
        self.captured.clear()

    def close(self) -> None:
        for handle in self.hooks:
            handle.remove()

    def results(self) -> dict[str, Any]:
        out: dict[str, Any] = {"val/loss_aux": self.aux / max(self.batches, 1),
                               "val/loss_z": self.z / max(self.batches, 1)}
        if self.load is not None:
            out.update({f"val/{k}": v for k, v in expert_load_stats(self.load).items()})
        out.update(geometry(self.states, self.sample_tokens))
        return out


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
        if key in ("source", "data", "seq_len_from"):  # seq_len_from: in the line under the table
            continue
        if isinstance(value, float):
            text = f"{value:.4f}" if math.isfinite(value) and abs(value) < 1e6 else f"{value:.4g}"
        else:
            text = str(value)
        table.add_row(key, text)
    return table
