"""`nitp demo`: the main job on a built-in default."""

from __future__ import annotations

import typer

from nitp_ds.cli.main import app


@app.command("demo")
def demo_command(
    out: str = typer.Option("nitp-demo", "--out", help="Directory for the corpus, data, run and export."),
    steps: int = typer.Option(None, "--steps", help="Training steps (default 300; 12 with --quick)."),
    quick: bool = typer.Option(False, "--quick", help="A smaller, shorter run (for tests)."),
    nproc: int = typer.Option(2, "--nproc", help="Training processes (expert parallelism across them)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out directory."),
) -> None:
    """Run the whole toolkit on a built-in corpus: data, NITP training, export, eval, generation."""
    from nitp_ds.demo import run_demo

    run_demo(out, steps=steps, quick=quick, nproc=nproc, force=force)
