"""Crash-safe checkpoints on top of DeepSpeed's `save_checkpoint` / `load_checkpoint`.

Layout: `RUN/checkpoints/global_stepN/` (DeepSpeed's files, per rank) plus `nitp_meta.json`,
written by rank 0 only after every rank has finished writing — its presence marks the checkpoint
complete. `RUN/checkpoints/latest` names the newest complete tag and is replaced atomically
(write then rename), so it never points at a partial checkpoint. On resume, an incomplete
directory is skipped with a warning. `nitp_meta.json` also holds the size and CRC-32 of every file
(`integrity.py`): `--resume auto` skips a damaged checkpoint with a warning, an explicit PATH is refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

from nitp_ds.checkpoint import integrity
from nitp_ds.errors import NITPError
from nitp_ds.files import atomic_write_text  # noqa: F401 - also used from here by callers

META = "nitp_meta.json"
EXPORT_INFO = "nitp_export.json"  # beside an export's Hugging Face files: its training seq_len, data, step
TAG_RE = re.compile(r"^global_step(\d+)$")


def tag_for(step: int) -> str:
    return f"global_step{step}"


def is_complete(tag_dir: Path) -> bool:
    meta = tag_dir / META
    if not meta.is_file():
        return False
    try:
        return bool(json.loads(meta.read_text()).get("complete"))
    except (OSError, json.JSONDecodeError):
        return False


def read_meta(directory: Path, fix: str = "rewrite it or delete it") -> dict[str, Any]:
    """`directory`'s `nitp_meta.json` (a checkpoint's, or `nitp convert` output's), or {} when it has none
    (a DeepSpeed checkpoint of another loop). `fix` ends the error message of an unreadable file."""
    path = directory / META
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise NITPError(f"{path} is not valid JSON ({exc}); {fix}") from None
    if not isinstance(meta, dict):
        raise NITPError(f"{path} must hold a JSON object, got {type(meta).__name__}; {fix}")
    return meta


def check_expert_layout(meta: dict[str, Any], ds_config: dict[str, Any], tag_dir: Path) -> None:
    """A checkpoint names its expert parameters by the layout it was trained with (AutoEP's `mlp.experts.w1/w2/w3`
    and `mlp.router.gate`, or Hugging Face's own): refuse to resume it under the other one."""
    if "autoep_size" not in meta:  # not written by nitp train
        return
    was = meta["autoep_size"] is not None
    now = bool(ds_config.get("expert_parallel", {}).get("enabled"))
    if was != now:
        layout = "AutoEP experts (expert_parallel enabled)" if was else "Hugging Face experts (expert_parallel disabled)"
        raise NITPError(f"{tag_dir} was trained with {layout} and this ds_config {'enables' if now else 'disables'} "
                        "expert_parallel; the expert parameters are named differently. Resume with the ds_config it "
                        "was trained with, or start a new run from `nitp export` of it (model.pretrained=DIR)")


def list_tags(ckpt_dir: Path) -> list[tuple[int, Path]]:
    if not ckpt_dir.is_dir():
        return []
    found = []
    for child in ckpt_dir.iterdir():
        match = TAG_RE.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def complete_newest_first(ckpt_dir: Path, warn=print) -> Iterator[Path]:
    """The complete checkpoint directories, newest first; an incomplete one met on the way is skipped with a
    warning (a lazy walk: the ones older than where the caller stops are never looked at)."""
    for step, tag_dir in reversed(list_tags(ckpt_dir)):
        if is_complete(tag_dir):
            yield tag_dir
        else:
            warn(f"warning: skipping incomplete checkpoint {tag_dir} (no complete {META}; a save was interrupted)")


def latest_complete(ckpt_dir: Path, warn=print) -> Path | None:
    """The newest complete checkpoint directory, skipping (and warning about) incomplete ones."""
    return next(complete_newest_first(ckpt_dir, warn), None)


def resume_hint(ckpt_dir: Path) -> str:
    """What a run that stopped abnormally can resume from, said at its end: the newest complete checkpoint,
    checked by its files' sizes (a stat each, no reading)."""
    tag_dir = latest_complete(ckpt_dir, warn=lambda _: None)
    if tag_dir is None:
        return "no checkpoint was saved yet: the same command starts afresh"
    damage = integrity.find_damage(tag_dir, checksums=False)
    if damage:
        return f"the newest complete checkpoint, {tag_dir}, is damaged ({damage}); resume with the same command"
    return f"the newest complete checkpoint, {tag_dir}, is intact: resume with the same command"


def has_model_states(directory: Path) -> bool:
    """Whether `directory` holds DeepSpeed's model-state files itself (a checkpoint, whatever its name)."""
    return directory.is_dir() and any(p.name.endswith("_model_states.pt") for p in directory.iterdir())


def is_checkpoint_location(path: Path) -> bool:
    """A checkpoint, a directory of checkpoints or a run directory: what `resolve_checkpoint` reads."""
    return has_model_states(path) or (path / "latest").is_file() or bool(list_tags(path)) or (
        path / "checkpoints").is_dir()


def resolve_checkpoint(path: str | Path, *, require_meta: bool = True, warn=print) -> Path:
    """The checkpoint directory to read, for `nitp train --resume PATH`, `nitp convert` and `nitp export`.

    - A checkpoint directory (named global_stepN, or holding DeepSpeed's model-state files): itself, when its
      nitp_meta.json says complete. Without nitp_meta.json it is a save that never finished (nitp train writes
      the file last), unless `require_meta` is False: convert also takes a DeepSpeed checkpoint written by
      another loop, and checks its files itself.
    - A run directory or its checkpoints/ directory: the newest complete global_stepN, as `--resume auto`
      picks it (incomplete ones are skipped with a warning).
    """
    path = Path(path)
    if not path.is_dir():
        raise NITPError(f"{path} is not a directory; pass a run directory, its checkpoints/ directory or a "
                        "checkpoints/global_stepN directory")
    if TAG_RE.match(path.name) or has_model_states(path):
        has_meta = (path / META).is_file()
        if (has_meta and read_meta(path).get("complete")) or (not has_meta and not require_meta):
            return path
        raise NITPError(f"checkpoint {path} is incomplete (no complete {META}); a save was interrupted — "
                        "use an earlier global_stepN or the run directory")
    for ckpt_dir in (path / "checkpoints", path):
        latest = ckpt_dir / "latest"
        if not (list_tags(ckpt_dir) or latest.is_file()):
            continue
        found = latest_complete(ckpt_dir, warn)
        if found is not None:
            return found
        tag = latest.read_text().strip() if latest.is_file() else ""
        if tag and not (ckpt_dir / tag).is_dir():
            raise NITPError(f"{latest} names tag '{tag}', but {ckpt_dir / tag} does not exist; "
                            "pass an existing checkpoints/global_stepN directory")
        raise NITPError(f"no complete checkpoint under {ckpt_dir}; every global_stepN there is incomplete")
    raise NITPError(f"{path} is not a checkpoint: it holds no global_stepN directory, no "
                    "zero_pp_rank_*_model_states.pt and no 'latest' file; pass a run directory, its checkpoints/ "
                    "directory or a checkpoints/global_stepN directory written by nitp train")


def explicit_resume(mode: str, rank: int = 0, world_size: int = 1) -> Path | None:
    """The checkpoint that `checkpoint.resume` names, checked up front (complete, every file whole: each rank
    reads the files it will load, `integrity.find_damage`); None for "auto" and "never"."""
    if mode in ("auto", "never"):
        return None
    if not Path(mode).exists():
        raise NITPError(f"--resume {mode} (checkpoint.resume) is neither auto, never, nor an existing path; pass "
                        "auto, never, a run directory or a checkpoints/global_stepN directory")
    tag_dir = resolve_checkpoint(mode)
    integrity.check_intact(tag_dir, rank=rank, world_size=world_size)
    return tag_dir


def mark_complete(tag_dir: Path, meta: dict[str, Any]) -> None:
    atomic_write_text(tag_dir / META, json.dumps({**meta, "complete": True}, indent=2))


def update_latest(ckpt_dir: Path, tag: str) -> None:
    atomic_write_text(ckpt_dir / "latest", tag)
