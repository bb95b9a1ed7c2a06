"""TokenLoader, open_data and check_vocab: windows, blending, val, resume, data-parallel slices."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from nitp_ds.data.dataset import TokenLoader, blend_schedule, check_vocab, open_data
from nitp_ds.data.prepare import prepare_data
from nitp_ds.errors import NITPError

SEQ = 16


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Two sources with disjoint letters, so that decoded text tells which source a window came from."""
    root = tmp_path_factory.mktemp("loader")
    rng = random.Random(0)
    for name, letters in (("low", "abcdefghijklm"), ("high", "nopqrstuvwxyz")):
        words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 6))) for _ in range(40)]
        docs = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 60))) for _ in range(150)]
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare_data([f"{root / 'low.jsonl'}@3", f"{root / 'high.jsonl'}@1"], root / "data", train_vocab_size=300,
                 val_fraction=0.1, seed=0, num_workers=1, progress=False)
    return root / "data"


def rows(batches) -> list[tuple[int, ...]]:
    return [tuple(row.tolist()) for b in batches for row in b["input_ids"]]


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_rows_are_shifted_windows_of_the_packed_stream(data_dir):
    data = open_data(data_dir)
    loader = TokenLoader(data, "train", SEQ, 4, seed=1)
    batch = next(loader)
    assert batch["input_ids"].shape == batch["labels"].shape == (4, SEQ)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    assert (batch["labels"] >= 0).all()
    streams = {name: data.stream("train", name).read(0, data.source_tokens("train", name)) for name in ("low", "high")}
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        window = np.concatenate([ids[:1].numpy(), labels.numpy()])
        assert any(any(np.array_equal(s[w * SEQ:w * SEQ + SEQ + 1], window) for w in range((len(s) - 1) // SEQ))
                   for s in streams.values())


def test_blending_realizes_the_weights_within_one_percent(data_dir):
    data = open_data(data_dir)
    tokenizer_letters = set("abcdefghijklm")
    for weights in (None, {"low": 0.2, "high": 0.8}):
        loader = TokenLoader(data, "train", SEQ, 8, seed=0, weights=weights)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(data.tokenizer_dir), local_files_only=True)
        low = total = 0
        for batch in take(loader, 150):  # 1,200 samples: several epochs of the smaller source
            for row in batch["input_ids"]:
                letters = set(tokenizer.decode(row.tolist())) - set(" <|endoftext|>")
                is_low = letters <= tokenizer_letters
                assert is_low or not letters & tokenizer_letters  # a window never mixes sources
                low += is_low
                total += 1
        asked = 0.75 if weights is None else 0.2
        assert abs(low / total - asked) < 0.01


def test_blend_schedule_prefixes_stay_close_to_the_weights():
    counts, source_at, _ = blend_schedule([0.5, 0.3, 0.2])
    assert counts.tolist() == [5000, 3000, 2000]
    for prefix in (10, 137, 1000, 9999):
        share = np.bincount(source_at[:prefix], minlength=3) / prefix
        assert np.abs(share - [0.5, 0.3, 0.2]).max() <= 1.0 / prefix + 1e-9


def test_one_epoch_visits_every_window_once_and_the_next_is_reshuffled(data_dir):
    data = open_data(data_dir)
    loader = TokenLoader(data, "train", SEQ, 1, seed=5, weights={"high": 1.0})
    n = loader.num_windows["high"]
    first = rows(take(loader, n))
    second = rows(take(loader, n))
    assert len(set(first)) == n and set(first) == set(second) and first != second


def test_order_depends_on_the_seed(data_dir):
    data = open_data(data_dir)
    assert rows(take(TokenLoader(data, "train", SEQ, 4, seed=0), 3)) == rows(take(TokenLoader(data, "train", SEQ, 4, seed=0), 3))
    assert rows(take(TokenLoader(data, "train", SEQ, 4, seed=0), 3)) != rows(take(TokenLoader(data, "train", SEQ, 4, seed=1), 3))


def test_resumed_loader_yields_exactly_the_uninterrupted_batches(data_dir):
    data = open_data(data_dir)
    reference = TokenLoader(data, "train", SEQ, 4, seed=2)
    take(reference, 37)
    state = json.loads(json.dumps(reference.state_dict()))  # JSON-able
    expected = take(reference, 60)  # crosses epoch boundaries of the smaller source
    resumed = TokenLoader(data, "train", SEQ, 4, seed=2)
    resumed.load_state_dict(state)
    assert rows(take(resumed, 60)) == rows(expected)
    with pytest.raises(NITPError, match="saved data position has seed=2 but this run has 3"):
        TokenLoader(data, "train", SEQ, 4, seed=3).load_state_dict(state)


def test_data_parallel_ranks_get_disjoint_complete_slices_of_one_global_order(data_dir):
    data = open_data(data_dir)
    single = rows(take(TokenLoader(data, "train", SEQ, 6, seed=4), 5))  # 30 global samples, world size 1
    per_rank = [rows(take(TokenLoader(data, "train", SEQ, 2, dp_rank=r, dp_world_size=3, seed=4), 5)) for r in range(3)]
    for step in range(5):  # global step j holds the same samples whatever the world size
        together = [per_rank[r][step * 2 + i] for i in range(2) for r in range(3)]
        assert together == single[step * 6:(step + 1) * 6]
    slices = [[loader_row for loader_row in per_rank[r]] for r in range(3)]
    positions = [set(range(r, 30, 3)) for r in range(3)]
    assert set().union(*positions) == set(range(30)) and sum(len(s) for s in slices) == 30

    # and the position carries over to another world size
    two = TokenLoader(data, "train", SEQ, 3, dp_rank=1, dp_world_size=2, seed=4)
    two.load_state_dict({**TokenLoader(data, "train", SEQ, 6, seed=4).state_dict(), "global_samples": 12})
    assert rows([next(two)]) == [single[12 + 1], single[12 + 3], single[12 + 5]]


def test_val_batches_are_the_same_every_call_and_come_from_val(data_dir):
    data = open_data(data_dir)
    loader = TokenLoader(data, "val", SEQ, 2, seed=0)
    first, again = loader.val_batches(3), loader.val_batches(3)
    assert len(first) == 3 and rows(first) == rows(again)
    assert rows(first) == rows(TokenLoader(data, "val", SEQ, 2, seed=99).val_batches(3))  # val is not shuffled
    train_rows = set(rows(take(TokenLoader(data, "train", SEQ, 50, seed=0, weights={"low": 1.0}), 40)))
    assert not set(rows(first)) & train_rows


def test_a_split_shorter_than_one_window_is_refused(data_dir):
    data = open_data(data_dir)
    with pytest.raises(NITPError, match="lower data.seq_len or add data"):
        TokenLoader(data, "train", 10**6, 1)


def test_check_vocab_names_the_size_to_set(data_dir):
    data = open_data(data_dir)
    assert check_vocab(data, 0) == data.vocab_size == 300
    assert check_vocab(data, 512) == 512
    with pytest.raises(NITPError, match="set model.vocab_size to at least 300 \\(or 0 to take the data's\\)"):
        check_vocab(data, 256)


def test_open_data_refuses_what_is_not_a_prepared_directory(tmp_path, data_dir):
    with pytest.raises(NITPError, match="does not exist; run `nitp prepare-data"):
        open_data(tmp_path / "missing")
    with pytest.raises(NITPError, match="is not a prepared data directory"):
        open_data(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(NITPError, match="is not valid JSON"):
        open_data(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "nitp-ds-tokens", "format_version": 99}))
    with pytest.raises(NITPError, match="format_version 99"):
        open_data(tmp_path)
    data = open_data(data_dir)
    assert data.tokenizer_dir == data_dir / "tokenizer" and data.eos_token_id == 0
    assert data.num_tokens("train") + data.num_tokens("val") == sum(
        s["tokens"] for split in data.manifest["splits"].values() for s in split["sources"].values())
    with pytest.raises(NITPError, match="names source 'nope'"):
        TokenLoader(data, "train", SEQ, 1, weights={"nope": 1.0})
