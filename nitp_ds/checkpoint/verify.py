"""`nitp export --verify`: an exported Hugging Face directory against the checkpoint it came from.

(a) Tensors. Every exported tensor must equal the checkpoint's fp32 tensor of the same Hugging Face name rounded to
    the export dtype, bit for bit, and no tensor may be missing or extra. Read one tensor at a time from each side
    (the checkpoint's partition files memory-mapped, the export through `safe_open`), so it costs two tensors of
    memory. A perturbed, misplaced or swapped tensor fails here, by name (and for expert tensors, which experts).
(b) Quality. The directory as users load it (`AutoModelForCausalLM.from_pretrained`, computed in fp32 so that only
    the weights differ) is scored on validation tokens of the run's data against the stock model holding the
    checkpoint's weights, twice: rounded to the export dtype, where it must give the same next-token
    log-probabilities (max |difference| <= 1e-4: this catches a tensor that from_pretrained renames, drops or
    re-initialises, or a config.json that builds another model), and in fp32, where the export's next-token loss
    must stay within what rounding can cost: |loss difference| <= 4u * max(1, loss), u the dtype's unit roundoff
    (2^-8 for bf16, 2^-24 for fp32): rounding moves each weight by at most u of its size, so the loss moves by a
    small multiple of u relative (0.016 * loss for bf16). Top-1 agreement and KL(checkpoint || export) of the
    next-token distributions are printed beside it; they are not bounded, because both grow with the spread of
    the logits and with near-tied routing decisions, which a well-trained model can have. One model is held at a
    time: the checkpoint model's log-probabilities wait on disk while the export is scored.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from nitp_ds.errors import NITPError

UNIT_ROUNDOFF = {"bf16": 2.0**-8, "fp32": 2.0**-24}
EVAL_TOKENS = 4096
EVAL_SEQ_LEN = 256
EVAL_ROWS_PER_BATCH = 4
LOADED_BOUND = 1e-4


@dataclass
class Verification:
    tensors: int
    tokens: int
    data: str  # where the tokens came from
    loaded_difference: float  # max |log-prob difference| of the export against the rounded checkpoint weights
    loss_checkpoint: float
    loss_export: float
    top1_agreement: float
    kl: float
    loss_bound: float

    def lines(self) -> list[str]:
        return [f"tensors: {self.tensors}, each equal to the checkpoint's fp32 tensor rounded to the export dtype",
                f"loaded by transformers: max |log-prob difference| {self.loaded_difference:.1e} from the checkpoint's "
                f"rounded weights (bound {LOADED_BOUND:.0e})",
                f"quality on {self.tokens:,} tokens of {self.data}:",
                f"  next-token loss  checkpoint (fp32) {self.loss_checkpoint:.4f}  export {self.loss_export:.4f}  "
                f"|diff| {abs(self.loss_export - self.loss_checkpoint):.1e} (bound {self.loss_bound:.1e})",
                f"  top-1 agreement  {self.top1_agreement:.2%}",
                f"  KL(checkpoint || export)  {self.kl:.1e} nats/token"]


def loss_bound(dtype: str, loss: float) -> float:
    return max(4 * UNIT_ROUNDOFF[dtype] * max(1.0, loss), 1e-6)


# -- (a) tensors -------------------------------------------------------------------------------------

def check_tensors(reference: Iterable[tuple[str, torch.Tensor]], directory: Path, dtype: torch.dtype) -> int:
    """Each (name, fp32 tensor) of `reference` equals the exported one rounded to `dtype`; returns the count."""
    from safetensors import safe_open

    where = exported_tensor_files(directory)
    seen = 0
    handles: dict[str, Any] = {}
    try:
        for name, tensor in reference:
            file = where.pop(name, None)
            if file is None:
                raise NITPError(f"export verification failed: tensor '{name}' of the checkpoint is missing from "
                                f"{directory}; export again")
            if file not in handles:
                handles.clear()  # one file open at a time
                handles[file] = safe_open(str(directory / file), "pt")
            exported = handles[file].get_tensor(name)
            expected = tensor.to(dtype)
            if exported.dtype != dtype or exported.shape != expected.shape or not torch.equal(exported, expected):
                raise NITPError(f"export verification failed: tensor '{name}' in {file} is not the checkpoint's "
                                f"fp32 tensor rounded to {_dtype_name(dtype)} ({_difference(exported, expected)}); "
                                "the export is corrupt: export again")
            seen += 1
    finally:
        handles.clear()
    if where:
        extra = sorted(where)
        raise NITPError(f"export verification failed: {directory} has {len(extra)} tensor(s) that the checkpoint "
                        f"does not, e.g. '{extra[0]}'; export again into an empty directory")
    return seen


def exported_tensor_files(directory: Path) -> dict[str, str]:
    """{tensor name: safetensors file} of an HF directory (sharded with an index, or one model.safetensors)."""
    import json

    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    with safe_open(str(directory / "model.safetensors"), "pt") as handle:
        return {name: "model.safetensors" for name in handle.keys()}


def _difference(exported: torch.Tensor, expected: torch.Tensor) -> str:
    if exported.shape != expected.shape:
        return f"shape {tuple(exported.shape)}, expected {tuple(expected.shape)}"
    if exported.dtype != expected.dtype:
        return f"dtype {exported.dtype}, expected {expected.dtype}"
    diff = (exported.float() - expected.float()).abs()
    text = f"max |difference| {float(diff.max()):.3g}"
    if diff.dim() == 3:  # [experts, ...]: say which experts differ (a swap names two)
        experts = torch.nonzero(diff.flatten(1).amax(1)).flatten().tolist()
        text += f" in expert(s) {experts[:8]}"
    return text


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype))


# -- (b) quality -------------------------------------------------------------------------------------

def evaluation_batches(config, data_dir: str | Path | None, warn: Callable[[str], None],
                       tokens: int = EVAL_TOKENS) -> tuple[list[dict[str, torch.Tensor]], str]:
    """About `tokens` validation tokens {"input_ids", "labels"} of the run's data, or a labelled fixed batch of
    random ids (with a notice) when the data is gone."""
    from nitp_ds.data.dataset import TokenLoader

    longest = min(EVAL_SEQ_LEN, getattr(config, "max_position_embeddings", None) or EVAL_SEQ_LEN)
    data = _validation_data(config, data_dir)
    if data is not None:
        # A window must fit in every source's val split (TokenLoader's rule): shorter windows for a small split.
        seq_len = min(longest, min(data.source_tokens("val", s) for s in data.source_names) - 1)
        if seq_len >= 2:
            loader = TokenLoader(data, "val", seq_len, EVAL_ROWS_PER_BATCH)
            batches = loader.val_batches(math.ceil(tokens / (seq_len * EVAL_ROWS_PER_BATCH)))
            return batches, f"the validation split of {data_dir} (windows of {seq_len})"
    warn(f"notice: the run's validation data ({data_dir or 'not recorded'}) is not available; verifying quality on "
         "a fixed batch of random token ids instead (pass --data DIR for real text)")
    ids = torch.randint(0, config.vocab_size, (math.ceil(tokens / longest), longest + 1),
                        generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids[i:i + EVAL_ROWS_PER_BATCH, :-1], "labels": ids[i:i + EVAL_ROWS_PER_BATCH, 1:]}
               for i in range(0, len(ids), EVAL_ROWS_PER_BATCH)]
    return batches, "a FIXED RANDOM BATCH (no validation data)"


def _validation_data(config, data_dir: str | Path | None):
    from nitp_ds.data.dataset import open_data

    if data_dir is None or not Path(data_dir).is_dir():
        return None
    data = open_data(data_dir)
    if data.vocab_size > config.vocab_size:
        raise NITPError(f"the data in {data_dir} has a vocabulary of {data.vocab_size} tokens but the model has "
                        f"{config.vocab_size}; pass the run's own data with --data DIR")
    return data if data.num_tokens("val") > 0 else None


def _log_probs(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> Iterator[torch.Tensor]:
    with torch.no_grad():
        for batch in batches:
            yield torch.log_softmax(model(input_ids=batch["input_ids"], use_cache=False).logits.float(), dim=-1)


def compare_quality(reference: torch.nn.Module, dtype: torch.dtype, load_export: Callable[[], torch.nn.Module],
                    batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Scores `reference` (fp32 weights), then the same model with its weights rounded to `dtype`, then the export;
    `reference` is freed before the export is loaded (its log-probabilities wait on disk meanwhile)."""
    sums = {"loss_checkpoint": 0.0, "loss_export": 0.0, "agree": 0.0, "kl": 0.0, "tokens": 0, "loaded": 0.0}
    with tempfile.TemporaryDirectory(prefix="nitp-verify-") as tmp:
        for i, logp in enumerate(_log_probs(reference, batches)):
            torch.save(logp, Path(tmp) / f"fp32-{i}.pt")
        rounded = "fp32" if dtype == torch.float32 else "rounded"
        if rounded != "fp32":
            with torch.no_grad():
                for tensor in reference.state_dict().values():
                    if tensor.is_floating_point():
                        tensor.copy_(tensor.to(dtype))  # what the export holds, as (a) has just proven
            for i, logp in enumerate(_log_probs(reference, batches)):
                torch.save(logp, Path(tmp) / f"{rounded}-{i}.pt")
        del reference  # the caller holds no other reference: one model at a time
        exported = load_export().eval()
        for i, logp in enumerate(_log_probs(exported, batches)):
            ref, same_weights = torch.load(Path(tmp) / f"fp32-{i}.pt"), torch.load(Path(tmp) / f"{rounded}-{i}.pt")
            labels = batches[i]["labels"]
            valid = labels >= 0
            target = labels.clamp(min=0).unsqueeze(-1)
            sums["loaded"] = max(sums["loaded"], float((logp - same_weights)[valid].abs().max()))
            sums["loss_checkpoint"] -= float(ref.gather(-1, target).squeeze(-1)[valid].sum())
            sums["loss_export"] -= float(logp.gather(-1, target).squeeze(-1)[valid].sum())
            sums["agree"] += float((ref.argmax(-1) == logp.argmax(-1))[valid].sum())
            sums["kl"] += float((ref.exp() * (ref - logp)).sum(-1)[valid].sum())
            sums["tokens"] += int(valid.sum())
    n = max(sums["tokens"], 1)
    return {"loss_checkpoint": sums["loss_checkpoint"] / n, "loss_export": sums["loss_export"] / n,
            "top1_agreement": sums["agree"] / n, "kl": max(sums["kl"] / n, 0.0), "tokens": sums["tokens"],
            "loaded_difference": sums["loaded"]}


def judge(dtype: str, tensors: int, data: str, quality: dict[str, float]) -> Verification:
    """The verification record, or one line naming what is beyond its bound."""
    result = Verification(tensors, quality["tokens"], data, quality["loaded_difference"], quality["loss_checkpoint"],
                          quality["loss_export"], quality["top1_agreement"], quality["kl"],
                          loss_bound(dtype, quality["loss_checkpoint"]))
    if not result.loaded_difference <= LOADED_BOUND:
        raise NITPError(f"export verification failed: the model transformers loads from the export is not the "
                        f"checkpoint's: its next-token log-probabilities differ by up to "
                        f"{result.loaded_difference:.3g} (> {LOADED_BOUND:g}) from the same {dtype} weights on "
                        f"{result.tokens} tokens of {data}; its tensors are right, so check config.json against "
                        "nitp_meta.json's hf_config")
    diff = abs(result.loss_export - result.loss_checkpoint)
    if not diff <= result.loss_bound:
        raise NITPError(f"export verification failed: next-token loss {result.loss_export:.4f} in {dtype} against "
                        f"the checkpoint's {result.loss_checkpoint:.4f} in fp32 (|diff| {diff:.3g} > "
                        f"{result.loss_bound:.3g}, 4 x the {dtype} unit roundoff x loss) on {result.tokens} tokens of "
                        f"{data}; export in fp32")
    return result
