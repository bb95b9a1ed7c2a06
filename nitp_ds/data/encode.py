"""Documents -> flat token ids with EOS after each: what the Rust tokenizer gives, id for id, faster.

`Tokenizer.encode_batch_fast(texts, add_special_tokens=False)` runs at about 4 MB of text per second
per core, most of it in the pre-tokenizer (the byte-level regex and its offset tracking). For a
GPT-2-style byte-level BPE, `DocumentEncoder` splits the text into words itself with the same regex
(`re` for ASCII documents, `regex` for the rest), looks each word up in a cache of ids, and runs
the BPE model only on words it has not seen. A word's ids do not depend on its neighbours, so
the result is the same as the Rust encoder's. What that rests on, and how each part is checked:

- The split. Both engines run the same pattern, whose outcome depends only on which characters are
  letters (\\p{L}), numbers (\\p{N}) and whitespace (\\s). Their Unicode tables differ (the onig in
  tokenizers 0.23 knows Unicode 14, `regex` a newer one), so every character is tried on the Rust
  pre-tokenizer before a document holding it is split here: ASCII at start, any other character
  the first time it is seen. A document with a character that splits differently goes to Rust.
- A word's ids: `tokenizer.model.tokenize(the word as byte-level symbols)`, the very call the Rust
  pipeline makes for each pre-token.
- Nothing else touches ids: the cache is used only with the `ByteLevel` pre-tokenizer
  (`use_regex`, no prefix space), a BPE model without dropout, a post-processor that adds nothing
  when special tokens are off, and no normalizer, or only Unicode normalization (NFC, NFKC, ...),
  which leaves ASCII as it is: then only ASCII documents use the cache. A document that contains
  the text of an added token (`<|endoftext|>`, ...) goes to Rust, which matches added tokens
  before pre-tokenizing.

Any other tokenizer (another normalizer, the `Split` patterns of Llama 3 or Qwen2, Metaspace,
WordPiece, ...) is encoded by Rust throughout; `DocumentEncoder.description` says which path runs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

try:
    import regex
except ImportError:  # then documents with non-ASCII text go to Rust
    regex = None

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# The same for ASCII text, for `re` (about twice as fast as `regex`). `re`'s \s would also take
# \x1c-\x1f, which the byte-level regex does not, so whitespace is spelled out.
_WS = r"\t\n\x0b\x0c\r "
ASCII_PATTERN = (rf"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^{_WS}A-Za-z0-9]+"
                 rf"|[{_WS}]+(?![^{_WS}])|[{_WS}]+")
PROBES = ("a{}", "1{}", "{}\n")  # split differently iff the character is a letter / a number / whitespace
MAX_CACHED_WORDS = 1 << 19  # ~80 MB per process; once full, the cache starts again empty
POST_PROCESSORS_WITHOUT_IDS = ("ByteLevel", "TemplateProcessing", "RobertaProcessing", "BertProcessing")
NORMALIZERS_KEEPING_ASCII = ("NFC", "NFD", "NFKC", "NFKD")


def word_cache_unsupported(spec: dict) -> str | None:
    """Why the word cache is not proven exact for this tokenizer.json (as a dict), or None when it is."""
    odd = [kind for kind in _kinds(spec.get("normalizer")) if kind not in NORMALIZERS_KEEPING_ASCII]
    if odd:
        return f"the tokenizer has a normalizer {odd[0]}"
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        return f"the pre-tokenizer is not GPT-2's byte-level regex without prefix space ({pre.get('type')})"
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("dropout"):
        return f"the model is not a BPE without dropout ({model.get('type')})"
    odd = [kind for kind in _kinds(spec.get("post_processor")) if kind not in POST_PROCESSORS_WITHOUT_IDS]
    if odd:
        return f"the post-processor {odd[0]} may change ids"
    return None


def _kinds(component: dict | None) -> list[str]:
    """The types of a normalizer or post-processor, a Sequence unrolled."""
    if component is None:
        return []
    if component.get("type") == "Sequence":
        parts = component.get("normalizers", component.get("processors", []))
        return [kind for part in parts for kind in _kinds(part)]
    return [component.get("type")]


class DocumentEncoder:
    """Encodes a batch of documents into (ids with EOS after each document, tokens per document)."""

    def __init__(self, tokenizer_json: str | Path, eos_id: int, dtype, word_cache: bool = True):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_json))
        # A document is never cut or padded, whatever the file says (GPT-2 files on the hub may
        # carry the truncation of the session that saved them).
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.eos_id, self.dtype = eos_id, np.dtype(dtype)
        spec = json.loads(self.tokenizer.to_str())
        self.plain_reason = word_cache_unsupported(spec) if word_cache else "the word cache is switched off"
        if self.plain_reason is not None:
            return
        self.added_tokens = sorted({token["content"] for token in spec.get("added_tokens", [])})
        self.added_prefixes = sorted({content[:2] for content in self.added_tokens})
        self.split_ascii = re.compile(ASCII_PATTERN).findall
        # Unicode normalization can change non-ASCII text only; without `regex` it cannot be split here.
        self.ascii_only = ("the tokenizer normalizes Unicode" if spec.get("normalizer") is not None
                           else "the regex module is not installed" if regex is None else None)
        self.split_unicode = regex.compile(GPT2_PATTERN).findall if self.ascii_only is None else None
        self.checked_chars: set[str] = set()  # characters that split here as in Rust
        self.failed_chars: set[str] = set()
        self.cache = _WordCache(self.tokenizer.model, self.dtype)
        self._check_chars(map(chr, range(128)))
        if self.failed_chars:
            self.plain_reason = f"the tokenizer splits ASCII {sorted(self.failed_chars)!r} unlike GPT-2's regex"

    @property
    def description(self) -> str:
        if self.plain_reason is not None:
            return f"rust encoder ({self.plain_reason})"
        return "word cache" if self.ascii_only is None else f"word cache for ASCII documents ({self.ascii_only})"

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if self.plain_reason is not None:
            return self._encode_rust(texts)
        to_rust = self._needs_rust(texts)
        ids_of_word = self.cache.__getitem__
        split_ascii, split_unicode = self.split_ascii, self.split_unicode
        # Each document's ids as bytes: joining bytes is the cheapest way to concatenate from Python.
        parts = [b"" if rust else b"".join(map(ids_of_word, split_ascii(text) if text.isascii()
                                                else split_unicode(text)))
                 for text, rust in zip(texts, to_rust)]
        if any(to_rust):
            picked = [i for i, rust in enumerate(to_rust) if rust]
            encodings = self.tokenizer.encode_batch_fast([texts[i] for i in picked], add_special_tokens=False)
            for i, encoding in zip(picked, encodings):
                parts[i] = np.array(encoding.ids, dtype=self.dtype).tobytes()
        eos = np.array([self.eos_id], dtype=self.dtype).tobytes()
        tokens = np.frombuffer(eos.join(parts) + eos, dtype=self.dtype)
        lengths = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts)) // self.dtype.itemsize + 1
        return tokens, lengths

    def _encode_rust(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        flat: list[int] = []
        lengths = np.empty(len(encodings), dtype=np.int64)
        for i, encoding in enumerate(encodings):
            ids = encoding.ids
            flat.extend(ids)
            flat.append(self.eos_id)
            lengths[i] = len(ids) + 1
        return np.array(flat, dtype=self.dtype), lengths

    def _needs_rust(self, texts: list[str]) -> list[bool]:
        to_rust = [False] * len(texts)
        joined = "\n".join(texts)  # one scan per prefix for the batch, then per document only on a hit
        if any(prefix in joined for prefix in self.added_prefixes):
            to_rust = [any(content in text for content in self.added_tokens) for text in texts]
        for i, text in enumerate(texts):
            if not text.isascii() and not to_rust[i]:
                if self.ascii_only:
                    to_rust[i] = True
                    continue
                chars = set(text)
                if not chars <= self.checked_chars:
                    self._check_chars(chars - self.checked_chars - self.failed_chars)
                    to_rust[i] = not chars <= self.checked_chars
        return to_rust

    def _check_chars(self, chars) -> None:
        pre_tokenize = self.tokenizer.pre_tokenizer.pre_tokenize_str
        for char in chars:
            splits = [split for split in (self.split_ascii if char.isascii() else None, self.split_unicode) if split]
            agrees = True
            for probe in PROBES:
                text = probe.format(char)
                try:
                    rust = [piece for piece, _ in pre_tokenize(text)]
                    agrees = agrees and all([_byte_symbols(w) for w in split(text)] == rust for split in splits)
                except Exception:  # e.g. a lone surrogate: Rust refuses it, so let Rust fail on the document
                    agrees = False
            (self.checked_chars if agrees else self.failed_chars).add(char)


class _WordCache(dict):
    """word -> its ids (bytes of `dtype`); a word not seen before is given to the BPE model."""

    def __init__(self, model, dtype):
        super().__init__()
        self.tokenize, self.dtype = model.tokenize, dtype

    def __missing__(self, word: str) -> bytes:
        if len(self) >= MAX_CACHED_WORDS:
            self.clear()
        ids = np.array([token.id for token in self.tokenize(_byte_symbols(word))], dtype=self.dtype).tobytes()
        self[word] = ids
        return ids


def _gpt2_byte_symbols() -> dict[int, str]:
    """GPT-2's byte -> symbol table (printable Latin-1 maps to itself), keyed for str.translate."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


BYTE_SYMBOLS = _gpt2_byte_symbols()


def _byte_symbols(word: str) -> str:
    return word.encode("utf-8").decode("latin-1").translate(BYTE_SYMBOLS)
