"""The word-cache encoder (nitp_ds.data.encode) gives the Rust tokenizer's ids, id for id, or steps aside."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from nitp_ds.data import encode
from nitp_ds.data.encode import DocumentEncoder
from nitp_ds.data.prepare import prepare_data
from test_data_prepare import documents, write_jsonl

REPO = Path(__file__).resolve().parents[1]
EOS = "<|endoftext|>"
PIECES = [  # what real text holds, and what could split differently in Python and in Rust
    *"abcdefghijklmnopqrstuvwxyz ABCXYZ.,;:!?-_()[]{}<>|/\\\"#$%&*+=@^`~",
    " ", " ", " ", "  ", "    ", "\t", "\n", "\n\n", "\r\n", " \n ", "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\xa0",
    "\u2003", "\u200b", "\u2028", "\u3000", "\ufeff", "\x00",
    "0", "7", "42", "2024", "3.14", "1,000", "٣", "١٢", "０９", "²", "½", "Ⅻ", "𝟗",
    "é", "è", "ß", "Ł", "ñ", "İ", "ı", "ſ", "e\u0301", "Привет", "мир", "Ωμέγα", "中文", "日本語", "한국어", "ไทย",
    "👍", "👨‍👩‍👧", "🇫🇷", "𝔘𝔫𝔦",
    "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "''", "’s", "don't",
    "\u0558", "\u0870", "\U0001e030", "\U00031350", "\u0378", "\ue000", "\U0010ffff",  # assigned late, or never
    EOS, "<|im_start|>", "[[SEP]]", "<|", "|>",
]


def mixed_documents(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    docs = ["".join(rng.choice(PIECES) for _ in range(rng.choice([1, 3, 20, 200, 2000]))) for _ in range(count)]
    return [d for d in docs if d.strip()] + ["a", "\n\nx", "x" + EOS + "y", "   trailing   "]


def real_documents() -> list[str]:
    """This repository's docs and sources: prose, code, tables, digits and a little Unicode."""
    paths = sorted(REPO.glob("docs/*.md")) + sorted(REPO.glob("nitp_ds/**/*.py"))
    docs = [text for text in (p.read_text(encoding="utf-8") for p in paths) if text.strip()]
    return docs + [para for doc in docs for para in doc.split("\n\n") if para.strip()]


def rust_ids(tokenizer_json: Path, texts: list[str], eos_id: int) -> list[list[int]]:
    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    tokenizer.no_truncation()
    return [e.ids + [eos_id] for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


def cached_ids(encoder: DocumentEncoder, texts: list[str], batch: int = 64) -> list[list[int]]:
    out = []
    for start in range(0, len(texts), batch):  # several batches: later ones hit the cache
        tokens, lengths = encoder.encode(texts[start:start + batch])
        assert tokens.dtype == np.uint32 and lengths.sum() == len(tokens)
        out += [part.tolist() for part in np.split(tokens, np.cumsum(lengths)[:-1])]
    return out


def byte_level_tokenizer(path: Path, *, pre_tokenizer=None, normalizer=None, dropout=None, post_processor=None,
                         added=(), vocab_size=600) -> Path:
    """A byte-level BPE trained on mixed text and saved as tokenizer.json (EOS is id 0)."""
    core = Tokenizer(models.BPE(dropout=dropout))
    core.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.normalizer = normalizer
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(mixed_documents(1, 200) + real_documents()[:50], trainer=trainer)
    core.add_tokens(list(added))
    if post_processor is not None:
        core.post_processor = post_processor
    path.parent.mkdir(parents=True, exist_ok=True)
    core.save(str(path))
    return path


def test_word_cache_gives_rust_ids_on_real_and_adversarial_text(tmp_path, monkeypatch):
    monkeypatch.setattr(encode, "MAX_CACHED_WORDS", 500)  # the cache also empties and refills
    tokenizer_json = byte_level_tokenizer(tmp_path / "tokenizer.json")
    texts = real_documents() + mixed_documents(2, 400)
    random.Random(0).shuffle(texts)
    encoder = DocumentEncoder(tokenizer_json, 0, np.uint32)
    assert encoder.description == "word cache"
    assert cached_ids(encoder, texts) == rust_ids(tokenizer_json, texts, 0)
    assert len(encoder.checked_chars) > 200
    with pytest.raises(TypeError):  # a lone surrogate (from JSON "\ud800") fails as it does in Rust
        encoder.encode(["fine", "broken \ud800 text"])


def test_user_tokenizer_directory_is_encoded_whole_with_its_added_tokens(tmp_path):
    """A GPT-2-layout directory as downloaded: added tokens, a BOS template, truncation saved in the file."""
    from transformers import PreTrainedTokenizerFast

    tokenizer_json = byte_level_tokenizer(
        tmp_path / "raw" / "tokenizer.json", added=["[[SEP]]"],
        post_processor=processors.TemplateProcessing(single=f"{EOS} $A", special_tokens=[(EOS, 0)]))
    core = Tokenizer.from_file(str(tokenizer_json))
    core.add_special_tokens(["<|im_start|>"])
    core.enable_truncation(max_length=8)  # as some hub files carry: documents must not be cut to it
    hub_dir = tmp_path / "hub"
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS).save_pretrained(str(hub_dir))
    assert json.loads((hub_dir / "tokenizer.json").read_text())["truncation"]["max_length"] == 8

    texts = [t for t in real_documents()[:60] + mixed_documents(3, 100) if len(t) < 20_000]
    write_jsonl(tmp_path / "c.jsonl", texts)
    expected = rust_ids(hub_dir / "tokenizer.json", texts, 0)
    for word_cache in (True, False):
        out = tmp_path / f"out-{word_cache}"
        manifest = prepare_data([str(tmp_path / "c.jsonl")], out, tokenizer=hub_dir, val_fraction=0.0, num_workers=2,
                                progress=False, word_cache=word_cache)
        assert manifest["timing"]["encoder"].startswith("word cache" if word_cache else "rust encoder")
        assert [list(doc) for doc in documents(out, "train", "c")] == expected
    specials = [ids for text, ids in zip(texts, expected) if "<|im_start|>" in text]
    assert specials and all(core.token_to_id("<|im_start|>") in ids for ids in specials)


@pytest.mark.parametrize("kind, options, description", [
    ("lowercase", dict(normalizer=normalizers.Lowercase()), "rust encoder (the tokenizer has a normalizer Lowercase)"),
    ("nfc", dict(normalizer=normalizers.NFC()), "word cache for ASCII documents (the tokenizer normalizes Unicode)"),
    ("llama3-split", dict(pre_tokenizer=pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])),
     "rust encoder (the pre-tokenizer is not GPT-2's byte-level regex without prefix space (Sequence))"),
    ("prefix-space", dict(pre_tokenizer=pre_tokenizers.ByteLevel(add_prefix_space=True)),
     "rust encoder (the pre-tokenizer is not GPT-2's byte-level regex without prefix space (ByteLevel))"),
    ("metaspace", dict(pre_tokenizer=pre_tokenizers.Metaspace()),
     "rust encoder (the pre-tokenizer is not GPT-2's byte-level regex without prefix space (Metaspace))"),
    ("dropout", dict(dropout=0.1), "rust encoder (the model is not a BPE without dropout (BPE))"),
])
def test_tokenizers_the_cache_cannot_prove_exact_fall_back_to_rust(tmp_path, kind, options, description):
    tokenizer_json = byte_level_tokenizer(tmp_path / "tokenizer.json", vocab_size=400, **options)
    encoder = DocumentEncoder(tokenizer_json, 0, np.uint32)
    assert encoder.description == description
    if kind != "dropout":  # dropout draws at random: no two encodings agree
        texts = real_documents()[:40] + mixed_documents(4, 60)
        assert cached_ids(encoder, texts) == rust_ids(tokenizer_json, texts, 0)


def test_without_the_regex_module_only_ascii_documents_use_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(encode, "regex", None)
    tokenizer_json = byte_level_tokenizer(tmp_path / "tokenizer.json", vocab_size=400)
    encoder = DocumentEncoder(tokenizer_json, 0, np.uint32)
    assert encoder.description == "word cache for ASCII documents (the regex module is not installed)"
    texts = real_documents()[:40] + mixed_documents(5, 60)
    assert cached_ids(encoder, texts) == rust_ids(tokenizer_json, texts, 0)
