"""Reading documents from the inputs of `nitp prepare-data`, one document at a time.

A source spec is `[NAME=]INPUT[@WEIGHT]` (name defaults to the input's stem, weight to 1). INPUT is
- a file: `.jsonl` (one JSON object per line, the document in `text_key`), `.parquet` (column
  `text_key`), `.txt` (plain text cut into documents at blank lines, or one document per file with
  txt_documents="files"), anything else is plain text with ONE DOCUMENT PER FILE;
- a directory: every file under it (recursively, sorted, hidden files skipped), each read by its
  extension as above; a directory written by `datasets.save_to_disk` is read with `load_from_disk`;
- a glob (`data/**/*.txt`), expanded and sorted;
- `hf:NAME[:CONFIG][:SPLIT]`: `datasets.load_dataset(NAME, CONFIG, split=SPLIT, streaming=True)`
  (split defaults to train; needs the Hugging Face hub, unlike everything else here).

Plain text. A blank line is a line of whitespace only. With "paragraphs" (`.txt`), a run of blank
lines ends a document (as `datasets`' text builder with sample_by="paragraph"); the separator and
trailing whitespace are not part of either document, and the end of the file ends the last one.
A document that reaches MAX_DOCUMENT_CHARS without one (a long file without blank lines, or any long
file read whole) is cut at a line end less than 2 x READ_BYTES later (inside a line longer than
READ_BYTES: on a character boundary); each piece is a document (followed by EOS, like any other).

Reading is streaming: only one line, one Parquet batch or READ_BYTES of a text file (plus the
document being assembled) is in memory at a time. Bytes that are not valid UTF-8 are decoded as
U+FFFD and counted in `ReadStats.replaced`. Empty documents are skipped.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from nitp_ds.errors import NITPError

SOURCE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
TXT_DOCUMENTS = ("paragraphs", "files")  # how a .txt file becomes documents
READ_BYTES = 1 << 20
MAX_DOCUMENT_CHARS = 4 << 20  # about one tokenizer batch (prepare.BATCH_CHARS)
# The end of a paragraph: its line break, then one or more blank lines (a pattern that starts with a
# literal "\n": re scans for it quickly; one that starts with optional whitespace runs ~20x slower).
PARAGRAPH_BREAK = re.compile(r"\n(?:[^\S\n]*\n)+")
LEADING_BLANK_LINES = re.compile(r"^(?:[^\S\n]*\n)+")


@dataclass
class SourceSpec:
    name: str
    input: str
    weight: float = 1.0


@dataclass
class ReadStats:
    files: int = 0
    documents: int = 0
    bytes: int = 0
    replaced: int = 0  # invalid UTF-8 sequences replaced by U+FFFD
    skipped_empty: int = 0
    replaced_where: list[str] = field(default_factory=list)  # the first few places, for the summary


def parse_source(spec: str) -> SourceSpec:
    """`[NAME=]INPUT[@WEIGHT]` -> SourceSpec."""
    name, rest = None, spec
    head, sep, tail = spec.partition("=")
    if sep and SOURCE_NAME.match(head) and not os.path.exists(spec):
        name, rest = head, tail
    weight = 1.0
    if "@" in rest:
        body, _, weight_text = rest.rpartition("@")
        try:
            weight = float(weight_text)
        except ValueError:
            raise NITPError(f"--source {spec!r}: weight {weight_text!r} is not a number; "
                            "write --source [NAME=]INPUT[@WEIGHT], e.g. web=data/web.jsonl@0.7") from None
        rest = body
    if not rest:
        raise NITPError(f"--source {spec!r} names no input; write --source [NAME=]INPUT[@WEIGHT]")
    if not weight > 0:
        raise NITPError(f"--source {spec!r}: weight {weight} must be positive; drop the source instead of weighting it 0")
    if name is None:
        name = _default_name(rest)
    if not SOURCE_NAME.match(name):
        raise NITPError(f"--source {spec!r}: name {name!r} may only hold letters, digits, '_', '-', '.'; "
                        "give one explicitly with NAME=INPUT")
    return SourceSpec(name=name, input=rest, weight=weight)


def _default_name(input_: str) -> str:
    if input_.startswith("hf:"):
        base = input_[3:].split(":")[0].split("/")[-1]
    else:
        base = Path(input_.rstrip("/").split("*")[0].rstrip("/") or "data").name
        for suffix in (".jsonl", ".parquet", ".txt"):
            base = base.removesuffix(suffix)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", base) or "data"


def iter_documents(source: SourceSpec, text_key: str = "text", stats: ReadStats | None = None,
                   txt_documents: str = "paragraphs") -> Iterator[str]:
    """Every non-empty document of one source, in a fixed order."""
    stats = stats if stats is not None else ReadStats()
    if source.input.startswith("hf:"):
        yield from _hub_documents(source.input, text_key, stats)
        return
    for path in resolve_files(source.input):
        if path.is_dir():  # a save_to_disk directory
            yield from _saved_dataset_documents(path, text_key, stats)
            continue
        stats.files += 1
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path, text_key, stats)
        elif path.suffix == ".parquet":
            yield from _parquet_documents(path, text_key, stats)
        else:
            paragraphs = path.suffix == ".txt" and txt_documents == "paragraphs"
            yield from _count(_text_documents(path, stats, paragraphs), stats)


def resolve_files(input_: str) -> list[Path]:
    """The files (and save_to_disk directories) that one input names, sorted."""
    path = Path(input_)
    if any(ch in input_ for ch in "*?["):
        found = sorted(Path(p) for p in glob.glob(input_, recursive=True) if Path(p).is_file())
        if not found:
            raise NITPError(f"--source glob {input_!r} matches no files; check the pattern (quote it in the shell)")
        return found
    if not path.exists():
        raise NITPError(f"--source input {input_} does not exist; check the path")
    if path.is_dir():
        if _is_saved_dataset(path):
            return [path]
        found = sorted(p for p in path.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(path).parts))
        if not found:
            raise NITPError(f"--source directory {input_} holds no files; point it at text, .jsonl or .parquet files")
        return found
    return [path]


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _open(path: Path):
    try:
        return path.open("rb")
    except OSError as exc:
        raise NITPError(f"cannot read {path} ({exc.strerror}); check its permissions or drop it from --source") from None


def _text_documents(path: Path, stats: ReadStats, paragraphs: bool) -> Iterator[str]:
    """The documents of one plain-text file, read READ_BYTES at a time (see the module's docstring)."""
    pending = ""  # the document being assembled
    with _open(path) as handle:
        carry = b""  # the start of a line (or of a character) that the next block completes
        while True:
            block = handle.read(READ_BYTES)
            raw, carry = _complete_lines(carry + block) if block else (carry, b"")
            text = _decode(raw, stats, str(path)) if raw else ""
            if paragraphs and not pending:  # a document starts here: blank lines are still its separator
                text = LEADING_BLANK_LINES.sub("", text)
            if paragraphs:
                done, pending = _paragraphs(pending, text)
                yield from done
            else:
                pending += text
            if len(pending) >= MAX_DOCUMENT_CHARS or not block:
                if paragraphs and not block:  # the end of the file ends the last paragraph
                    pending = pending.rstrip()
                if pending:
                    yield pending
                pending = ""
            if not block:
                return


def _paragraphs(pending: str, text: str) -> tuple[list[str], str]:
    """The paragraphs that `text` completes, and the start of the next. Only the last line of `pending`
    (the rest held no break) is searched again, so a long paragraph is not rescanned at every read."""
    start = pending.rfind("\n", 0, len(pending) - 1) + 1
    *done, rest = PARAGRAPH_BREAK.split(pending[start:] + text)
    if not done:
        return [], pending[:start] + rest
    done[0] = pending[:start] + done[0]
    return [paragraph.rstrip() for paragraph in done if paragraph.strip()], rest


def _complete_lines(raw: bytes) -> tuple[bytes, bytes]:
    """(whole lines, the rest); with no line break at all, (whole UTF-8 characters, the rest)."""
    cut = raw.rfind(b"\n") + 1
    if cut:
        return raw[:cut], raw[cut:]
    for back in range(1, min(4, len(raw)) + 1):  # an incomplete multi-byte character at the end waits
        lead = raw[-back]
        if lead & 0xC0 != 0x80:
            need = 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 1
            return (raw[:-back], raw[-back:]) if need > back else (raw, b"")
    return raw, b""


def _decode(raw: bytes, stats: ReadStats, where: str) -> str:
    stats.bytes += len(raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    text = raw.decode("utf-8", errors="replace")
    # Each invalid sequence becomes one U+FFFD; U+FFFD already in the input is encoded validly, so
    # the difference counts exactly the replacements.
    replaced = text.count("\ufffd") - raw.count("\ufffd".encode())
    stats.replaced += replaced
    if len(stats.replaced_where) < 5:
        stats.replaced_where.append(where)
    return text


def _count(texts, stats: ReadStats) -> Iterator[str]:
    for text in texts:
        if not text or text.isspace():
            stats.skipped_empty += 1
            continue
        stats.documents += 1
        yield text


def _jsonl_documents(path: Path, text_key: str, stats: ReadStats) -> Iterator[str]:
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise NITPError(f"cannot read {path} ({exc.strerror}); check its permissions or drop it from --source") from None
    with handle:
        for line_no, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            line = _decode(raw, stats, f"{path}:{line_no}")
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise NITPError(f"{path}:{line_no} is not valid JSON ({exc.msg} column {exc.colno}); "
                                "fix or remove that line") from None
            if not isinstance(record, dict) or text_key not in record:
                raise NITPError(f"{path}:{line_no} has no key {text_key!r}; "
                                f"pass --text-key with the field that holds the text")
            text = record[text_key]
            if not isinstance(text, str):
                raise NITPError(f"{path}:{line_no}: {text_key!r} is a {type(text).__name__}, not a string; "
                                "pass --text-key with the field that holds the text")
            yield from _count([text], stats)


def _parquet_documents(path: Path, text_key: str, stats: ReadStats) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise NITPError(f"cannot read Parquet file {path} ({exc}); check that it is a Parquet file") from None
    if text_key not in parquet.schema_arrow.names:
        raise NITPError(f"Parquet file {path} has no column {text_key!r} (columns: {parquet.schema_arrow.names}); "
                        "pass --text-key with the column that holds the text")
    column_type = parquet.schema_arrow.field(text_key).type
    is_binary = pa.types.is_binary(column_type) or pa.types.is_large_binary(column_type)
    for batch in parquet.iter_batches(batch_size=1024, columns=[text_key]):
        values = batch.column(0).to_pylist()
        if is_binary:
            values = [_decode(v, stats, str(path)) if v is not None else "" for v in values]
        else:
            stats.bytes += batch.nbytes
        yield from _count((v or "" for v in values), stats)


def _saved_dataset_documents(path: Path, text_key: str, stats: ReadStats) -> Iterator[str]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises several types for a broken directory
        raise NITPError(f"cannot load the saved dataset {path} ({type(exc).__name__}); "
                        "pass a directory written by Dataset.save_to_disk") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise NITPError(f"saved DatasetDict {path} has no 'train' split (splits: {list(loaded)}); "
                            "save the split you want with Dataset.save_to_disk")
        loaded = loaded["train"]
    yield from _dataset_documents(loaded, str(path), text_key, stats)


def _hub_documents(input_: str, text_key: str, stats: ReadStats) -> Iterator[str]:
    import datasets

    parts = input_[3:].split(":")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    try:
        loaded = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as exc:  # network, unknown name, unknown config: all are bad input here
        raise NITPError(f"cannot load Hugging Face dataset {input_!r} ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); check the name, config and split, "
                        "and that the hub is reachable (or save it with save_to_disk and pass that directory)") from None
    yield from _dataset_documents(loaded, input_, text_key, stats)


def _dataset_documents(dataset, where: str, text_key: str, stats: ReadStats) -> Iterator[str]:
    columns = dataset.column_names
    if columns is not None and text_key not in columns:
        raise NITPError(f"dataset {where} has no column {text_key!r} (columns: {columns}); "
                        "pass --text-key with the column that holds the text")
    stats.files += 1
    for batch in dataset.iter(batch_size=1024):
        values = batch[text_key]
        values = [_decode(v, stats, where) if isinstance(v, bytes) else (v or "") for v in values]
        if not isinstance(values[0] if values else "", str):
            raise NITPError(f"dataset {where}: column {text_key!r} does not hold strings; pass --text-key")
        yield from _count(values, stats)
