"""The train/val split of one source: by whole documents, or by tokens when it has too few documents.

By documents (the default). With `val_fraction`, each document goes to val with that probability,
from a hash of (seed, source, document number): deterministic, and independent of batching and
worker count. With `val_tokens`, val takes a pseudo-random quarter of the first documents of the
source until its share (by weight) of `val_tokens` is reached.

By tokens (the fallback). A val side of fewer than MIN_VAL_DOCUMENTS documents is too small a
sample of a source's documents (one large text file with few blank lines is the common case), and an
empty train side cannot train. Such a source is cut again at the token level: its train documents
followed by the documents the hash chose for val form one stream, whose last ceil(val_fraction x
tokens) tokens (or its share of `val_tokens`) become val. One document is cut in two; every other
document stays whole.
"""

from __future__ import annotations

import math

import numpy as np

from nitp_ds.data.shards import TokenShardWriter, recut
from nitp_ds.errors import NITPError

VAL_TOKENS_PICK = 0.25  # with val_tokens: the fraction of early documents that are candidates for val
MIN_VAL_DOCUMENTS = 10  # fewer val documents than this: the source is split by tokens instead


class DocumentSplitter:
    """Decides, per document, whether it goes to val; the decision depends only on seed, source, number."""

    def __init__(self, args: dict, source_index: int, share: float):
        self.seed, self.source_index, self.next_doc = args["seed"], source_index, 0
        self.val_tokens = args["val_tokens"]
        self.val_fraction = args["val_fraction"]
        self.fraction = self.val_fraction if self.val_tokens is None else VAL_TOKENS_PICK
        self.asked_quota = math.ceil(self.val_tokens * share) if self.val_tokens is not None else None
        self.quota = self.asked_quota

    def assign(self, lengths: np.ndarray) -> np.ndarray:
        numbers = np.arange(self.next_doc, self.next_doc + len(lengths), dtype=np.uint64)
        self.next_doc += len(lengths)
        to_val = document_uniforms(self.seed, self.source_index, numbers) < self.fraction
        if self.quota is not None:
            candidate_tokens = np.where(to_val, lengths, 0)
            before = np.cumsum(candidate_tokens) - candidate_tokens
            to_val &= before < self.quota
            self.quota = max(0, self.quota - int(candidate_tokens[to_val].sum()))
        return to_val

    def val_target(self, source_tokens: int) -> int:
        """How many of the source's tokens val should hold."""
        if self.asked_quota is not None:
            return self.asked_quota
        return math.ceil(self.val_fraction * source_tokens)


def document_uniforms(seed: int, source_index: int, numbers: np.ndarray) -> np.ndarray:
    """A uniform in [0, 1) per document number: splitmix64 of (seed, source, number)."""
    with np.errstate(over="ignore"):
        x = numbers.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + source_index * 0xD1B54A32D192ED03)
                                                  & 0xFFFFFFFFFFFFFFFF)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def settle_split(name: str, splitter: DocumentSplitter, train: TokenShardWriter, val: TokenShardWriter
                 ) -> tuple[TokenShardWriter, TokenShardWriter, dict]:
    """Keep the document split of one source, or cut it again by tokens; the writers and how it was split."""
    total = train.tokens + val.tokens
    target = splitter.val_target(total)
    if target == 0 or (val.documents >= MIN_VAL_DOCUMENTS and train.tokens > 0):
        return train, val, {"by": "documents"}
    if target >= total:
        raise NITPError(f"source {name!r} has {total:,} tokens and val asks {target:,} of them, which leaves none to "
                        "train on; lower --val-fraction / --val-tokens or add data")
    documents, by_documents = train.documents + val.documents, val.documents
    train, val = recut(train, val, total - target)
    notice = (f"source {name!r} has {documents:,} documents, too few for a document-level val split "
              f"({by_documents} would go to val, fewer than {MIN_VAL_DOCUMENTS}); split by tokens instead: "
              f"the last {target:,} of its {total:,} tokens are val")
    return train, val, {"by": "tokens", "val_tokens": target, "notice": notice}
