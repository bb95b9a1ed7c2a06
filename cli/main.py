"""The `nitp` Typer app: one function per command, parsing and printing only.

Each command calls one library function; bad input raises `NITPError`, which `main` prints as
one line and turns into exit code 2 (`--debug` shows the traceback instead). Third-party warnings,
log records and progress bars are hidden unless `--debug` is given (nitp_ds/console.py).
"""

from __future__ import annotations

import os
import sys

import typer

from nitp_ds.errors import NITPError

app = typer.Typer(
    name="nitp",
    help="Pretrain MoE language models with DeepSpeed ZeRO-3 + expert parallelism and the NITP objective.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors, and the third-party "
                                     "warnings, log lines and progress bars that are hidden otherwise."),
          local_rank: int = typer.Option(None, "--local_rank", "--local-rank", hidden=True,
                                         help="Passed by the deepspeed launcher; LOCAL_RANK is read instead.")) -> None:
    # `deepspeed --module nitp_ds.cli train ...` without --no_local_rank puts --local_rank=N before the
    # command name; it is accepted and ignored (the launcher also sets LOCAL_RANK, which the trainer reads).
    if debug:
        os.environ["NITP_DEBUG"] = "1"  # the processes this one starts (launcher, ranks) inherit it
    from nitp_ds.console import quiet_third_parties

    quiet_third_parties()  # before any command imports torch, transformers or deepspeed


@app.command("env")
def env_command() -> None:
    """Show versions, accelerators and whether this install is inside the tested ranges."""
    from nitp_ds.env import print_env_report

    print_env_report()


def _register_commands() -> None:
    # Each group of commands lives in its own module and adds itself to `app`.
    from nitp_ds.cli import commands  # noqa: F401


def main() -> None:
    from nitp_ds import distributed

    try:
        _main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # a bug (or --debug): the traceback, then the same exit as every other way out
        if not distributed.joined_group():
            raise
        import traceback

        traceback.print_exc()
        code = 1
    distributed.exit_process(code)


def _main() -> None:
    _register_commands()
    try:
        # Without standalone mode click returns (not raises) the code of a `typer.Exit`, e.g. the launcher's.
        code = app(standalone_mode=False)
    except NITPError as exc:
        if os.environ.get("NITP_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        sys.exit(code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # usage errors from click (typer may vendor its own copy as typer._click)
        kinds = {cls.__name__ for cls in type(exc).__mro__}
        if "UsageError" in kinds:  # one line, like every other bad input (no arguments at all: the help, shown)
            message = exc.format_message().strip().rstrip(".")
            if message:
                command = exc.ctx.command_path if getattr(exc, "ctx", None) is not None else "nitp"
                print(f"error: {message}; see `{command} --help`", file=sys.stderr)
            sys.exit(2)
        if "ClickException" in kinds:
            exc.show()
            sys.exit(2)
        if "Abort" in kinds:
            sys.exit(130)
        raise
    if isinstance(code, int) and code:
        sys.exit(code)
