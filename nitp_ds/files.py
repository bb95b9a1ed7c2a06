"""Writing outputs so that a crash never leaves a half-written one: a file replaced atomically, a directory
built beside its final path and renamed into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_dir(tmp_dir: Path, out_dir: Path) -> None:
    """Move the finished `tmp_dir` to `out_dir`, replacing what is there (a directory or a file): the old one is
    renamed aside first, so `out_dir` is at every moment either the old output or the new one."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.replaced-{os.getpid()}"
        os.rename(out_dir, old)
    os.rename(tmp_dir, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
