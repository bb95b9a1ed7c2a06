"""`nitp prepare-data` and `nitp data-info`: parse, call nitp_ds.data, print tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from nitp_ds.cli.main import app


@app.command("prepare-data")
def prepare_data_command(
    source: list[str] = typer.Option(..., "--source", "-s", help="[NAME=]INPUT[@WEIGHT], repeatable. INPUT: a file "
                                     "(.txt = documents cut at blank lines, .jsonl, .parquet; other text = one "
                                     "document per file), a directory, a glob, a save_to_disk directory, or "
                                     "hf:NAME[:CONFIG][:SPLIT]."),
    out: Path = typer.Option(..., "--out", "-o", help="The data directory to write."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="A local Hugging Face tokenizer directory."),
    train_tokenizer: Optional[int] = typer.Option(None, "--train-tokenizer", metavar="VOCAB_SIZE",
                                                  help="Train a byte-level BPE of this size on the sources."),
    text_key: str = typer.Option("text", "--text-key", help="JSONL key / Parquet or dataset column of the text."),
    txt_documents: str = typer.Option("paragraphs", "--txt-documents",
                                      help="How .txt files become documents: paragraphs (cut at blank lines) or "
                                           "files (one per file). Either way, documents over ~4M characters are "
                                           "cut at a line end."),
    val_fraction: float = typer.Option(0.005, "--val-fraction", help="Fraction of documents held out for val."),
    val_tokens: Optional[int] = typer.Option(None, "--val-tokens", help="Hold out about this many val tokens instead."),
    seed: int = typer.Option(0, "--seed", help="Seed of the train/val split."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Tokenizer processes (default: one per core)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, uint16 or uint32."),
    shard_tokens: int = typer.Option(1 << 30, "--shard-tokens", help="Tokens per shard file."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    """Tokenize text into token shards, a document index and manifest.json for `nitp train`."""
    from nitp_ds.data.prepare import prepare_data

    manifest = prepare_data(source, out, tokenizer=tokenizer, train_vocab_size=train_tokenizer, text_key=text_key,
                            txt_documents=txt_documents, val_fraction=val_fraction, val_tokens=val_tokens, seed=seed,
                            num_workers=workers, dtype=dtype, shard_tokens=shard_tokens, force=force,
                            progress=progress)
    _print_tables(manifest, out)


@app.command("data-info")
def data_info_command(
    path: Path = typer.Argument(..., help="A directory written by `nitp prepare-data`."),
    verify: bool = typer.Option(False, "--verify", help="Re-hash every shard against the manifest's sha256."),
) -> None:
    """Show a data directory's manifest and statistics."""
    from nitp_ds.data.dataset import open_data

    data = open_data(path, verify=verify)
    _print_tables(data.manifest, path)
    if verify:
        from rich.console import Console

        Console().print("[green]all shard checksums match[/green]")


def _print_tables(manifest: dict[str, Any], path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    about = Table(title=f"data {path}", show_header=False)
    tokenizer = manifest["tokenizer"]
    timing = manifest.get("timing", {})
    for key, value in [("tokenizer", tokenizer["source"]), ("tokenizer sha256", tokenizer["sha256"][:16] + "…"),
                       ("vocab size", f"{manifest['vocab_size']:,}"), ("eos token id", manifest["eos_token_id"]),
                       ("dtype", manifest["dtype"]), ("seed", manifest["args"]["seed"]),
                       ("val", f"{manifest['args']['val_tokens']} tokens" if manifest["args"]["val_tokens"] is not None
                        else f"{manifest['args']['val_fraction']} of documents"),
                       ("time", f"{timing.get('seconds', 0):.1f} s, "
                                f"{timing.get('tokens_per_second', 0) / 1e6:.2f} M tokens/s tokenizing")]:
        about.add_row(key, str(value))
    console.print(about)

    table = Table(title="sources")
    for column in ("source", "input", "weight", "docs", "bad UTF-8",
                   "train tok", "train docs", "val tok", "val docs", "shards"):
        table.add_column(column, justify="left" if column in ("source", "input") else "right")
    splits = manifest["splits"]
    for source in manifest["sources"]:
        name = source["name"]
        train, val = splits["train"]["sources"][name], splits["val"]["sources"][name]
        table.add_row(name, source["input"], f"{source['weight']:g}", f"{source['read']['documents']:,}",
                      f"{source['read']['replaced']:,}", f"{train['tokens']:,}", f"{train['documents']:,}",
                      f"{val['tokens']:,}", f"{val['documents']:,}", str(len(train["shards"]) + len(val["shards"])))
    table.add_row("total", "", "", "", "", f"{splits['train']['tokens']:,}", f"{splits['train']['documents']:,}",
                  f"{splits['val']['tokens']:,}", f"{splits['val']['documents']:,}", "", style="bold")
    console.print(table)
    for source in manifest["sources"]:  # "split" is absent from directories written before it existed
        if source.get("split", {}).get("by") == "tokens":
            console.print(f"notice: {source['split']['notice']}", markup=False, soft_wrap=True)
