"""prepare_data and the prepare-data / data-info commands: inputs, split, dtype, checksums, errors."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nitp_ds.data.dataset import open_data
from nitp_ds.data.prepare import prepare_data
from nitp_ds.data.sources import parse_source
from nitp_ds.errors import NITPError

WORDS = [w + s for w in ("alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta") for s in ("", "s", "ing")]


def sentence(rng: random.Random, n: int = 40) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def write_jsonl(path: Path, docs: list[str], key: str = "text") -> Path:
    path.write_text("".join(json.dumps({key: d}) + "\n" for d in docs))
    return path


def prepare(tmp_path: Path, sources: list[str], name: str = "out", **kwargs):
    kwargs.setdefault("train_vocab_size", 300)
    kwargs.setdefault("progress", False)
    kwargs.setdefault("num_workers", 2)
    return prepare_data(sources, tmp_path / name, **kwargs)


def documents(out: Path, split: str, source: str) -> list[tuple[int, ...]]:
    data = open_data(out)
    offsets = data.document_offsets(split, source)
    tokens = data.stream(split, source).read(0, int(offsets[-1])) if offsets[-1] else np.zeros(0)
    return [tuple(tokens[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]


def test_every_input_kind_is_read_one_document_per_unit(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "dir" / f"{i}.txt").write_text(sentence(rng) + "\n\n" + sentence(rng))
    (tmp_path / "dir" / "sub" / "x.txt").write_text(sentence(rng))
    (tmp_path / "dir" / "notes.md").write_text(sentence(rng) + "\n\n" + sentence(rng))  # not .txt: one document
    (tmp_path / "dir" / ".hidden").write_text("skipped")
    write_jsonl(tmp_path / "a.jsonl", [sentence(rng) for _ in range(7)])
    pq.write_table(pa.table({"text": [sentence(rng) for _ in range(5)], "id": list(range(5))}), tmp_path / "p.parquet")
    datasets.Dataset.from_dict({"text": [sentence(rng) for _ in range(6)]}).save_to_disk(str(tmp_path / "saved"))

    manifest = prepare(tmp_path, [f"dir={tmp_path / 'dir'}", f"file={tmp_path / 'dir' / '0.txt'}",
                                  f"glob={tmp_path / 'dir'}/*.txt", str(tmp_path / "a.jsonl"),
                                  str(tmp_path / "p.parquet"), str(tmp_path / "saved")], val_fraction=0.0)

    read = {s["name"]: s["read"]["documents"] for s in manifest["sources"]}
    assert read == {"dir": 8, "file": 2, "glob": 6, "a": 7, "p": 5, "saved": 6}  # a .txt paragraph is a document
    train = manifest["splits"]["train"]["sources"]
    assert {name: train[name]["documents"] for name in read} == read
    eos = manifest["eos_token_id"]
    for name in read:  # every document ends with EOS, and EOS appears nowhere else
        for doc in documents(tmp_path / "out", "train", name):
            assert doc[-1] == eos and eos not in doc[:-1]
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.json").is_file()
    assert manifest["tokenizer"]["sha256"] and manifest["args"]["val_fraction"] == 0.0


def decoded(out: Path, split: str, source: str) -> list[str]:
    """The text of every document of one stream (EOS dropped)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    eos = open_data(out).eos_token_id
    return [tokenizer.decode([t for t in doc if t != eos]) for doc in documents(out, split, source)]


def test_one_large_txt_file_is_read_in_blocks_and_split_at_blank_lines(tmp_path, monkeypatch):
    import nitp_ds.data.sources as sources

    monkeypatch.setattr(sources, "READ_BYTES", 4096)  # many block boundaries inside and between paragraphs
    rng = random.Random(0)
    paragraphs = [f"paragraph {i}\n" + "\n".join(sentence(rng, rng.randint(3, 30)) for _ in range(rng.randint(1, 4)))
                  for i in range(3000)]
    separators = ["\n\n", "\n\n\n", "  \n \t\n", "\r\n\r\n"]
    text = "".join(p + rng.choice(separators) for p in paragraphs)
    (tmp_path / "corpus.txt").write_text(text, newline="")
    assert len(text) > 900_000

    manifest = prepare(tmp_path, [str(tmp_path / "corpus.txt")])
    source = manifest["sources"][0]
    assert source["read"]["documents"] == 3000 and source["split"] == {"by": "documents"}
    train, val = decoded(tmp_path / "out", "train", "corpus"), decoded(tmp_path / "out", "val", "corpus")
    assert len(val) >= 10 and sorted(train + val) == sorted(paragraphs)  # each paragraph whole, in one split

    whole = prepare(tmp_path, [str(tmp_path / "corpus.txt")], "whole", txt_documents="files", val_fraction=0.0)
    assert decoded(tmp_path / "whole", "train", "corpus") == [text]  # under MAX_DOCUMENT_CHARS: one document


def test_a_txt_file_without_blank_lines_is_cut_at_line_ends(tmp_path, monkeypatch):
    import nitp_ds.data.sources as sources

    monkeypatch.setattr(sources, "READ_BYTES", 1000)
    monkeypatch.setattr(sources, "MAX_DOCUMENT_CHARS", 5000)
    rng = random.Random(1)
    lines = [sentence(rng, rng.randint(1, 12)) + "\n" for _ in range(4000)]
    (tmp_path / "lines.txt").write_text("".join(lines))
    stats = sources.ReadStats()
    docs = list(sources.iter_documents(sources.parse_source(str(tmp_path / "lines.txt")), stats=stats))
    assert "".join(docs) == "".join(lines).rstrip() and stats.documents == len(docs) > 10  # the end: stripped
    assert all(doc.endswith("\n") and 5000 <= len(doc) < 5000 + 2 * 1000 for doc in docs[:-1])

    monkeypatch.setattr(sources, "READ_BYTES", 999)  # odd: reads end inside the two-byte characters
    long_line = "é" * 6000  # one line longer than a read: cut inside it, on character boundaries
    (tmp_path / "long.txt").write_text(long_line)
    stats = sources.ReadStats()
    docs = list(sources.iter_documents(sources.parse_source(str(tmp_path / "long.txt")), stats=stats))
    assert "".join(docs) == long_line and len(docs) == 2 and stats.replaced == 0


def test_reading_a_big_text_file_holds_a_bounded_part_of_it(tmp_path, monkeypatch):
    import tracemalloc

    import nitp_ds.data.sources as sources

    monkeypatch.setattr(sources, "READ_BYTES", 64 << 10)
    monkeypatch.setattr(sources, "MAX_DOCUMENT_CHARS", 256 << 10)
    line = "a line of text without any blank line after it," * 4 + "\n"
    (tmp_path / "big.txt").write_text(line * ((32 << 20) // len(line)))
    size = (tmp_path / "big.txt").stat().st_size
    tracemalloc.start()
    lengths = [len(doc) for doc in sources.iter_documents(sources.parse_source(str(tmp_path / "big.txt")))]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    limit = sources.MAX_DOCUMENT_CHARS
    assert sum(lengths) == size - 1 and all(limit <= n < limit + 2 * sources.READ_BYTES for n in lengths[:-1])
    assert peak < 8 * limit < size / 15, peak  # a few documents' worth, not the file


def test_a_source_with_too_few_documents_is_split_by_tokens_with_a_notice(tmp_path, monkeypatch, capsys):
    rng = random.Random(2)
    (tmp_path / "book.txt").write_text("\n\n".join(sentence(rng, 200) for _ in range(6)))
    manifest = prepare(tmp_path, [str(tmp_path / "book.txt")], val_fraction=0.05)
    split = manifest["sources"][0]["split"]
    train, val = manifest["splits"]["train"]["sources"]["book"], manifest["splits"]["val"]["sources"]["book"]
    total = train["tokens"] + val["tokens"]
    assert split["by"] == "tokens" and val["tokens"] == split["val_tokens"] == -(-total * 5 // 100)
    assert "6 documents, too few for a document-level val split" in split["notice"]
    # Nothing lost or duplicated: the two streams together hold the 6 documents (one of them cut in two).
    eos = manifest["eos_token_id"]
    pieces = documents(tmp_path / "out", "train", "book") + documents(tmp_path / "out", "val", "book")
    assert sum(len(p) for p in pieces) == total and sum(p.count(eos) for p in pieces) == 6 and len(pieces) == 7
    assert documents(tmp_path / "out", "train", "book")[-1][-1] != eos  # the cut document's head: no EOS
    open_data(tmp_path / "out", verify=True)  # the re-cut shards match their recorded sha256

    code, stdout, _ = run_cli(["data-info", str(tmp_path / "out")], monkeypatch, capsys)
    assert code == 0 and "notice: source 'book' has 6 documents" in stdout

    by_tokens = prepare(tmp_path, [str(tmp_path / "book.txt")], "tok", val_tokens=300)
    assert by_tokens["splits"]["val"]["tokens"] == 300 and by_tokens["sources"][0]["split"]["by"] == "tokens"
    with pytest.raises(NITPError, match=r"source 'book' has .* tokens and val asks 100,000 of them, which leaves none"):
        prepare(tmp_path, [str(tmp_path / "book.txt")], "all", val_tokens=100_000)
    assert not (tmp_path / "all").exists()
    with pytest.raises(NITPError, match=r"--txt-documents 'lines' is not one of paragraphs, files"):
        prepare(tmp_path, [str(tmp_path / "book.txt")], "lines", txt_documents="lines")


def test_source_syntax_names_weights_and_hub_specs():
    assert parse_source("web=data/web.jsonl@0.7").__dict__ == {"name": "web", "input": "data/web.jsonl", "weight": 0.7}
    assert parse_source("data/books/*.txt").name == "books"
    assert parse_source("hf:allenai/c4:en:validation@2").__dict__ == {
        "name": "c4", "input": "hf:allenai/c4:en:validation", "weight": 2.0}
    with pytest.raises(NITPError, match="weight 'x' is not a number"):
        parse_source("a.jsonl@x")


def test_val_split_is_deterministic_disjoint_and_seeded(tmp_path):
    docs = [f"document {i} " + sentence(random.Random(i), 10) for i in range(300)]
    write_jsonl(tmp_path / "c.jsonl", docs)
    first = prepare(tmp_path, [str(tmp_path / "c.jsonl")], "one", val_fraction=0.2, seed=3)
    prepare(tmp_path, [str(tmp_path / "c.jsonl")], "two", val_fraction=0.2, seed=3, num_workers=1)
    prepare(tmp_path, [str(tmp_path / "c.jsonl")], "other", val_fraction=0.2, seed=4)

    val = documents(tmp_path / "one", "val", "c")
    train = documents(tmp_path / "one", "train", "c")
    assert 30 < len(val) < 90 and len(val) + len(train) == 300
    assert not set(val) & set(train)
    assert val == documents(tmp_path / "two", "val", "c")  # same seed, other worker count: same split
    assert set(val) != set(documents(tmp_path / "other", "val", "c"))
    assert first["splits"]["val"]["documents"] == len(val)

    by_tokens = prepare(tmp_path, [str(tmp_path / "c.jsonl")], "tok", val_tokens=500)
    assert 500 <= by_tokens["splits"]["val"]["tokens"] < 500 + 200


def test_dtype_is_uint16_when_the_vocabulary_fits_else_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    write_jsonl(tmp_path / "c.jsonl", ["w1 w2 w69999 w5"] * 20)
    small = prepare(tmp_path, [str(tmp_path / "c.jsonl")], "small")
    assert small["dtype"] == "uint16"
    assert open_data(tmp_path / "small").stream("train", "c").maps[0].dtype == np.uint16

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    big_dir = tmp_path / "big_tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>").save_pretrained(str(big_dir))

    big = prepare(tmp_path, [str(tmp_path / "c.jsonl")], "big", train_vocab_size=None, tokenizer=big_dir)
    assert big["dtype"] == "uint32" and big["vocab_size"] == 70_002
    tokens = open_data(tmp_path / "big").stream("train", "c").read(0, 5)
    assert list(tokens) == [3, 4, 70_001, 7, 0]
    with pytest.raises(NITPError, match="vocabulary of 70002 tokens does not fit --dtype uint16"):
        prepare(tmp_path, [str(tmp_path / "c.jsonl")], "forced", train_vocab_size=None, tokenizer=big_dir,
                dtype="uint16")
    assert not (tmp_path / "forced").exists()


def test_corrupted_shard_fails_its_checksum(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [sentence(random.Random(i)) for i in range(50)])
    prepare(tmp_path, [str(tmp_path / "c.jsonl")])
    open_data(tmp_path / "out", verify=True)
    shard = tmp_path / "out" / "train" / "c" / "00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    open_data(tmp_path / "out")  # the default check compares sizes only
    with pytest.raises(NITPError, match=r"shard .*train/c/00000.bin fails its sha256 checksum"):
        open_data(tmp_path / "out", verify=True)
    shard.write_bytes(bytes(raw[:-2]))
    with pytest.raises(NITPError, match="00000.bin has .* bytes, the manifest says"):
        open_data(tmp_path / "out")


def test_shards_roll_over_at_shard_tokens(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [sentence(random.Random(i)) for i in range(50)])
    manifest = prepare(tmp_path, [str(tmp_path / "c.jsonl")], shard_tokens=500, val_fraction=0.0)
    shards = manifest["splits"]["train"]["sources"]["c"]["shards"]
    assert len(shards) > 2 and all(s["tokens"] == 500 for s in shards[:-1])
    data = open_data(tmp_path / "out", verify=True)
    whole = np.concatenate([np.fromfile(tmp_path / "out/train/c" / s["file"], dtype=np.uint16) for s in shards])
    assert np.array_equal(data.stream("train", "c").read(480, 600), whole[480:1080])


@pytest.mark.parametrize("make, message", [
    (lambda d: [str(d / "nope.jsonl")], r"--source input .*nope.jsonl does not exist"),
    (lambda d: [str(d / "*.nothing")], r"matches no files"),
    (lambda d: [str(_touch(d / "empty.txt", ""))], r"source 'empty' .* has no documents \(empty corpus"),
    (lambda d: [str(_touch(d / "k.jsonl", '{"text": "ok"}\n\n{"body": "no text key"}\n'))], r"k.jsonl:3 has no key 'text'"),
    (lambda d: [str(_touch(d / "j.jsonl", '{"text": "ok"}\nnot json\n'))], r"j.jsonl:2 is not valid JSON"),
])
def test_bad_input_is_refused_with_a_message_and_leaves_nothing(tmp_path, make, message):
    with pytest.raises(NITPError, match=message):
        prepare(tmp_path, make(tmp_path))
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary dir left behind


def _touch(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    good = sentence(random.Random(0)).encode()
    (tmp_path / "bad.txt").write_bytes(good + b" \xff\xfe broken \xc3 end \xef\xbf\xbd real replacement char")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok \xff here"}\n')
    manifest = prepare(tmp_path, [str(tmp_path / "bad.txt"), f"j={tmp_path / 'bad.jsonl'}"], val_fraction=0.0)
    read = {s["name"]: s["read"] for s in manifest["sources"]}
    assert read["bad"]["replaced"] == 3 and read["bad"]["documents"] == 1  # \xff, \xfe, \xc3; the real U+FFFD is not
    assert read["j"]["replaced"] == 1 and "bad.jsonl:1" in read["j"]["replaced_where"][0]


def test_failure_in_a_later_source_leaves_no_output(tmp_path):
    write_jsonl(tmp_path / "good.jsonl", [sentence(random.Random(i)) for i in range(20)])
    write_jsonl(tmp_path / "bad.jsonl", ["x"] * 5, key="body")
    with pytest.raises(NITPError, match="bad.jsonl:1 has no key 'text'"):
        prepare(tmp_path, [str(tmp_path / "good.jsonl"), str(tmp_path / "bad.jsonl")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl"]


def test_existing_output_is_refused_without_force(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [sentence(random.Random(i)) for i in range(10)])
    prepare(tmp_path, [str(tmp_path / "c.jsonl")])
    with pytest.raises(NITPError, match=r"already exists; pass --force"):
        prepare(tmp_path, [str(tmp_path / "c.jsonl")])
    manifest = prepare(tmp_path, [str(tmp_path / "c.jsonl")], force=True, seed=9)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["args"]["seed"] == 9 == manifest["args"]["seed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "out"]


def test_loading_an_existing_tokenizer_directory(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [sentence(random.Random(i)) for i in range(20)])
    first = prepare(tmp_path, [str(tmp_path / "c.jsonl")], "first")
    second = prepare(tmp_path, [str(tmp_path / "c.jsonl")], "second", train_vocab_size=None,
                     tokenizer=tmp_path / "first" / "tokenizer")
    assert second["tokenizer"]["sha256"] == first["tokenizer"]["sha256"]
    assert documents(tmp_path / "first", "train", "c") == documents(tmp_path / "second", "train", "c")
    with pytest.raises(NITPError, match="tokenizer directory .*missing does not exist"):
        prepare(tmp_path, [str(tmp_path / "c.jsonl")], "third", train_vocab_size=None, tokenizer=tmp_path / "missing")


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    from nitp_ds.cli.main import main

    monkeypatch.setattr(sys, "argv", ["nitp", *args])
    monkeypatch.delenv("NITP_DEBUG", raising=False)
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_prepares_data_and_reports_bad_input_in_one_line(tmp_path, monkeypatch, capsys):
    write_jsonl(tmp_path / "c.jsonl", [sentence(random.Random(i)) for i in range(30)])
    out = tmp_path / "out"
    code, stdout, _ = run_cli(["prepare-data", "--source", f"web={tmp_path / 'c.jsonl'}@2", "--out", str(out),
                               "--train-tokenizer", "300", "--no-progress"], monkeypatch, capsys)
    assert code == 0 and "total" in stdout and (out / "manifest.json").is_file()
    code, stdout, _ = run_cli(["data-info", str(out), "--verify"], monkeypatch, capsys)
    assert code == 0 and "web" in stdout and "checksums match" in stdout

    code, _, err = run_cli(["prepare-data", "--source", str(tmp_path / "c.jsonl"), "--out", str(out),
                            "--train-tokenizer", "300"], monkeypatch, capsys)
    assert code == 2 and err.strip().count("\n") == 0 and "pass --force" in err and "Traceback" not in err


def test_cli_subprocess_exit_code_2_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "nitp_ds.cli", "prepare-data", "--source",
                             str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "out"), "--train-tokenizer", "300"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: --source input {tmp_path / 'missing.jsonl'} does not exist; "
                                                  "check the path"]
