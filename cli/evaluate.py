"""`nitp eval` and `nitp plot`: parse, call the library, print."""

from __future__ import annotations

from pathlib import Path

import typer

from nitp_ds.cli.main import app
from nitp_ds.config import TrainConfig

DEFAULT_EVAL_TOKENS = TrainConfig.eval_tokens


@app.command("eval")
def eval_command(
    source: str = typer.Argument(..., help="A run directory, a checkpoints/global_stepN directory, a Hugging Face "
                                           "directory or the output of `nitp convert`."),
    data: str = typer.Option(None, "--data", "-d", help="Prepared data directory, its val split is scored "
                                                       "(default: the data the run trained on, when recorded)."),
    tokens: int = typer.Option(DEFAULT_EVAL_TOKENS, "--tokens", help="Cap on scored tokens: windows evenly spaced "
                                                                     "over the whole val split, all of it if smaller."),
    seq_len: int = typer.Option(None, "--seq-len", help="Sequence length (default: the training length when the "
                                                         "source records it, else the model's context)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per forward pass (the loss does not "
                                                           "depend on it)."),
    sample_tokens: int = typer.Option(4096, "--sample-tokens", help="Token states sampled for the geometry."),
    seed: int = typer.Option(0, "--seed", help="Seed of the geometry's token sample."),
    per_layer: bool = typer.Option(False, "--per-layer", help="Also measure geometry after every block."),
    out: str = typer.Option(None, "--out", "-o", help="Write the metrics to this JSON file."),
    batches: int = typer.Option(None, "--batches", hidden=True, help="Replaced by --tokens."),
) -> None:
    """Validation loss (± standard error), perplexity, NITP loss (with a head) and hidden-state geometry."""
    from rich.console import Console

    from nitp_ds.errors import NITPError
    from nitp_ds.evaluate import evaluate, results_table, summary_line

    if batches is not None:
        raise NITPError(f"--batches was replaced by --tokens, a cap on scored tokens spread over the whole val split "
                        f"(default {DEFAULT_EVAL_TOKENS:,}); pass e.g. --tokens {DEFAULT_EVAL_TOKENS}")
    results = evaluate(source, data, max_tokens=tokens, seq_len=seq_len, batch_size=batch_size,
                       sample_tokens=sample_tokens, seed=seed, per_layer=per_layer, out_json=out)
    console = Console()
    console.print(results_table(results))
    console.print(summary_line(results) + f"  (seq_len: {results['seq_len_from']})", soft_wrap=True)
    if out:
        console.print(f"wrote {out}")


@app.command("plot")
def plot_command(
    runs: list[str] = typer.Argument(..., help="Run directories (each with metrics.jsonl); several are overlaid. "
                                     "NAME=RUN[,RUN...] (globs allowed) draws the mean of several runs, e.g. seeds, "
                                     "in a band."),
    out: str = typer.Option(None, "--out", "-o", help="Folder for the PNGs (default: RUN/plots for one run, "
                                                      "./plots for several)."),
    band: str = typer.Option("minmax", "--band", help="Band of a NAME=RUN,... group: minmax (over its runs) or "
                                                      "std (mean ± one standard deviation)."),
) -> None:
    """PNG curves of losses, lr, throughput, MFU, expert load, validation and geometry."""
    from nitp_ds.plot import plot_runs

    out_dir = Path(out) if out else (Path(runs[0]) / "plots" if len(runs) == 1 and "=" not in runs[0]
                                     else Path("plots"))
    written = plot_runs(runs, out_dir, band_kind=band)
    if not written:
        print(f"no known metrics in {', '.join(runs)}; nothing plotted")
        return
    print(f"wrote {len(written)} figures to {out_dir}: {', '.join(p.name for p in written)}")
