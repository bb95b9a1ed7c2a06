"""`nitp convert` and `nitp export`: thin wrappers over nitp_ds.checkpoint.{convert,export}."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from nitp_ds.cli.main import app


@app.command("convert")
def convert_command(
    src: Path = typer.Argument(..., help="Run directory, its checkpoints/ directory, or checkpoints/global_stepN."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (must not exist unless --force)."),
    to: str = typer.Option("safetensors", "--to", help="safetensors (HF names, head apart) or universal."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 or bf16 (safetensors only)."),
    max_shard_size: int = typer.Option(2 * 1024**3, "--max-shard-bytes", help="Largest safetensors shard."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
) -> None:
    """Convert a DeepSpeed checkpoint to consolidated safetensors or a universal checkpoint."""
    from nitp_ds.checkpoint.convert import convert_checkpoint

    r = convert_checkpoint(src, out, to=to, dtype=dtype, force=force, max_shard_size=max_shard_size)
    size = f", {r.num_tensors} tensors, {r.total_bytes / 2**20:.1f} MiB" if to == "safetensors" else ""
    typer.echo(f"wrote {r.out} ({to}, step {r.step}{size}); peak RSS {r.peak_rss_mib:.0f} MiB")


@app.command("export")
def export_command(
    src: Path = typer.Argument(..., help="Run directory, its checkpoints/ directory, or checkpoints/global_stepN."),
    out: Path = typer.Option(..., "--out", "-o", help="Hugging Face output directory."),
    dtype: str = typer.Option("bf16", "--dtype", help="bf16 or fp32."),
    verify: bool = typer.Option(False, "--verify", help="Check every tensor and the loaded model's quality against "
                                "the checkpoint."),
    data: Optional[Path] = typer.Option(None, "--data", help="Data directory for --verify (default: the run's)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer directory (default: nitp_meta's)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
) -> None:
    """Export a checkpoint as a Hugging Face model directory (NITP head stripped)."""
    from nitp_ds.checkpoint.export import export_checkpoint

    r = export_checkpoint(src, out, dtype=dtype, verify=verify, force=force, tokenizer_dir=tokenizer, data_dir=data,
                          warn=lambda line: typer.echo(line, err=True))
    typer.echo(f"wrote {r.out} ({dtype}, step {r.step})")
    if r.verification is not None:
        typer.echo("verified " + "\n".join(r.verification.lines()))
