"""`nitp eval` and `nitp plot`: parse, call the library, print."""

from __future__ import annotations

from pathlib import Path

import typer

from nitp_ds.cli.main import app


@app.command("eval")
def eval_command(
    source: str = typer.Argument(..., help="A Hugging Face directory or the output of `nitp convert`."),
    data: str = typer.Option(..., "--data", "-d", help="Prepared data directory (its val split is used)."),
    batches: int = typer.Option(20, "--batches", help="Validation batches to score."),
    seq_len: int = typer.Option(None, "--seq-len", help="Sequence length (default 512, capped at the model's)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Sequences per batch."),
    sample_tokens: int = typer.Option(4096, "--sample-tokens", help="Token states sampled for the geometry."),
    seed: int = typer.Option(0, "--seed", help="Seed of the batches and of the token sample."),
    per_layer: bool = typer.Option(False, "--per-layer", help="Also measure geometry after every block."),
    out: str = typer.Option(None, "--out", "-o", help="Write the metrics to this JSON file."),
) -> None:
    """Validation loss, perplexity, NITP loss (with a head) and hidden-state geometry."""
    from rich.console import Console

    from nitp_ds.evaluate import evaluate, results_table

    results = evaluate(source, data, batches=batches, seq_len=seq_len, batch_size=batch_size,
                       sample_tokens=sample_tokens, seed=seed, per_layer=per_layer, out_json=out)
    console = Console()
    console.print(results_table(results))
    if out:
        console.print(f"wrote {out}")


@app.command("plot")
def plot_command(
    runs: list[str] = typer.Argument(..., help="Run directories (each with metrics.jsonl); several are overlaid."),
    out: str = typer.Option(None, "--out", "-o", help="Folder for the PNGs (default: RUN/plots for one run, "
                                                      "./plots for several)."),
) -> None:
    """PNG curves of losses, lr, throughput, MFU, expert load, validation and geometry."""
    from nitp_ds.plot import plot_runs

    out_dir = Path(out) if out else (Path(runs[0]) / "plots" if len(runs) == 1 else Path("plots"))
    written = plot_runs(runs, out_dir)
    if not written:
        print(f"no known metrics in {', '.join(runs)}; nothing plotted")
        return
    print(f"wrote {len(written)} figures to {out_dir}: {', '.join(p.name for p in written)}")
