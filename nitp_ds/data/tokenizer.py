"""The tokenizer of a data directory: loaded from a local Hugging Face directory, or trained here.

Either way it is saved as a Hugging Face fast tokenizer under `<data dir>/tokenizer/`, so that
training, evaluation and export find it beside the tokens it produced. Nothing is downloaded:
`from_pretrained` runs with `local_files_only=True`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from nitp_ds.errors import NITPError

EOS_TOKEN = "<|endoftext|>"
MIN_TRAINED_VOCAB = 256 + 1 + 1  # the 256 byte symbols, the EOS token, and at least one merge


def load_tokenizer(path: str | Path):
    """A fast tokenizer from a local directory; it must define an end-of-sequence token."""
    path = Path(path)
    if not path.is_dir():
        raise NITPError(f"tokenizer directory {path} does not exist; pass --tokenizer with a local Hugging Face "
                        "tokenizer directory, or --train-tokenizer VOCAB_SIZE to train one")
    if not (path / "tokenizer.json").is_file() and (path / "tokenizer" / "tokenizer.json").is_file():
        raise NITPError(f"{path} is a prepared data directory, not a tokenizer directory; pass --tokenizer "
                        f"{path / 'tokenizer'} to reuse its tokenizer")
    from transformers import AutoTokenizer  # after the cheap checks: importing it takes seconds

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
    except Exception as exc:  # transformers raises many types here; all mean "not a usable tokenizer dir"
        raise NITPError(f"cannot load a tokenizer from {path} ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                        "pass a directory holding tokenizer.json (a fast tokenizer)") from None
    if not getattr(tokenizer, "is_fast", False):
        raise NITPError(f"tokenizer in {path} is not a fast tokenizer; convert it (tokenizer.json) before preparing data")
    if tokenizer.eos_token_id is None:
        raise NITPError(f"tokenizer in {path} has no eos_token; set one in its tokenizer_config.json "
                        f"(e.g. \"eos_token\": \"{EOS_TOKEN}\")")
    return tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE (GPT-2 style) on `texts`, with `<|endoftext|>` as EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_TRAINED_VOCAB:
        raise NITPError(f"--train-tokenizer {vocab_size} is too small for a byte-level BPE; "
                        f"use at least {MIN_TRAINED_VOCAB} (256 bytes + EOS + merges)")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_in_batches(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   unk_token=EOS_TOKEN)


def save_tokenizer(tokenizer, out_dir: Path) -> Path:
    """Save as a Hugging Face fast tokenizer; returns the directory."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    if not (out_dir / "tokenizer.json").is_file():
        raise NITPError(f"tokenizer saved in {out_dir} has no tokenizer.json; use a fast tokenizer")
    return out_dir


def tokenizer_sha256(tokenizer_dir: Path) -> str:
    return hashlib.sha256((Path(tokenizer_dir) / "tokenizer.json").read_bytes()).hexdigest()


def vocab_size_of(tokenizer) -> int:
    """Every id the tokenizer can emit is below this (added tokens included)."""
    return max(len(tokenizer), tokenizer.vocab_size)


def _in_batches(texts: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
