"""A run's checkpoints: resume, save on a cadence, the meta that marks a save complete, RNG, pruning.

`CheckpointManager` sits on top of DeepSpeed's `save_checkpoint` / `load_checkpoint`; the file-level pieces
(`nitp_meta.json`, `latest`, finding a complete checkpoint) are in `state.py`, shared with convert and export.
A save is complete when rank 0 has written `nitp_meta.json` after every rank finished writing (with
checkpoint.async_save a thread writes each rank's files, `background.py`, and the step's all-reduce tells the
ranks when all are done); `latest` then names it, and the oldest complete ones beyond checkpoint.keep_last are
deleted. Each rank records the size and CRC-32 of the files it wrote, taken as they were written
(`background.write_file`), before the ranks agree that the save succeeded; the records go into
`nitp_meta.json` (`integrity.py`). `--resume auto` takes the newest complete checkpoint whose files match the
records, skipping damaged ones with a warning.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from nitp_ds.checkpoint import background, integrity
from nitp_ds.checkpoint import state as ckpt
from nitp_ds.config import Config
from nitp_ds.console import debug_enabled
from nitp_ds.distributed import all_gather, barrier, lost_peer, on_every_rank, world
from nitp_ds.errors import NITPError
from nitp_ds.memory import ranks_on_this_node
from nitp_ds.resolve import ResolvedRun


class CheckpointManager:
    """Resume and save for one rank of a run. `progress` is the trainer's RunState (step, consumed_tokens,
    skipped_steps), which a resume restores; `loader` is the training data loader, whose position is saved."""

    def __init__(self, engine, cfg: Config, run: ResolvedRun, data, progress, loader, *, resume_from: Path | None,
                 force: bool, is_main: bool, say: Callable[[str], None]):
        self.engine, self.cfg, self.run, self.data = engine, cfg, run, data
        self.progress, self.loader = progress, loader
        self.resume_from, self.force, self.is_main, self.say = resume_from, force, is_main, say
        self.ckpt_dir = Path(cfg.train.out_dir) / "checkpoints"
        self.rank, self.world_size, _ = world()
        self.save_seconds: list[tuple[int, float]] = []  # (step, seconds training waited), one per periodic save
        self.final_save_seconds: float | None = None
        self.intact_step: int | None = None  # the step of the checkpoint this process resumed from or saved last
        self.pending: tuple[int, Path, background.BackgroundWriter] | None = None  # a save whose files are being written
        self.host_buffers = background.HostBuffers()  # the snapshots' host memory, kept from one save to the next

    # -- resume ------------------------------------------------------------------------------

    def resume(self) -> None:
        """Load the checkpoint that checkpoint.resume names (auto: the newest complete one), if any."""
        mode = self.cfg.checkpoint.resume
        if mode == "never" or self.force:
            return
        if mode == "auto":
            try:  # every rank walks the same directories and agrees on each one's damage: the same choice
                tag_dir = integrity.newest_intact(ckpt.complete_newest_first(self.ckpt_dir, warn=self.say),
                                                  self.damage_on_any_rank, warn=self.say)
                if tag_dir is None:
                    return
                # an explicit --resume PATH was checked at start-up
                ckpt.check_expert_layout(ckpt.read_meta(tag_dir), self.run.ds_config, tag_dir)
            except NITPError as exc:  # every rank reads the same files: rank 0 says it once
                raise on_every_rank(exc) from None
        else:
            tag_dir = self.resume_from
        engine = self.engine
        universal = (tag_dir / "zero").is_dir() and not list(tag_dir.glob("*optim_states.pt"))
        if universal:
            engine._config.load_universal_checkpoint = True
        load_path, client = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_module_strict=True)
        if load_path is None:
            raise NITPError(f"could not load checkpoint {tag_dir}; it may be truncated — resume from an earlier "
                            "global_stepN or pass --resume never")
        if universal:
            # DeepSpeed 0.19's ZeRO-3 universal loader hands every parameter sub-group one shared `step` tensor,
            # which torch's Adam then increments once per sub-group and step (2, 5, 8, … with 3 sub-groups),
            # skewing the bias correction: each sub-group gets its own copy.
            for state in engine.optimizer.optimizer.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()
        client = client or {}
        self.progress.step = int(client.get("step", 0))
        self.progress.consumed_tokens = int(client.get("consumed_tokens", 0))
        self.progress.skipped_steps = int(client.get("skipped", 0))  # not "skipped_steps": DeepSpeed's own key
        if "loader" in client:
            self.loader.load_state_dict(client["loader"])
        if "rng" in client:
            restore_rng(client["rng"])
        if tag_dir.parent.resolve() == self.ckpt_dir.resolve():  # not a checkpoint of another run directory
            self.intact_step = self.progress.step
        self.say(f"resumed from {tag_dir} at step {self.progress.step}")

    def damage_on_any_rank(self, tag_dir: Path) -> str | None:
        """`integrity.find_damage` with the reading shared out: each rank checks the checksums of the files it
        will load itself; the first damage found on any rank, the same answer on every rank."""
        mine = integrity.find_damage(tag_dir, rank=self.rank, world_size=self.world_size)
        return next((damage for damage in all_gather(mine, self.world_size) if damage), None)

    # -- save --------------------------------------------------------------------------------

    def maybe_save(self, step: int, last: bool, writes_done: bool = False) -> None:
        """Save at step `step` when it is due: every checkpoint.every steps inside the run; at its last step
        (`last`: finished or stopped) unless this process resumed from or saved that step's checkpoint (a complete
        one on disk is not enough: it may be the damaged one that resume skipped). `writes_done`: every rank has
        written the files of the save in the background (the step's all-reduce says it): it is marked complete."""
        if writes_done and self.pending is not None:
            self.finish_pending()
        if last:
            self.finish_pending()
            if self.cfg.train.steps and step != self.intact_step:
                self.final_save_seconds = self.save(last=True)
        elif self.cfg.checkpoint.every and step % self.cfg.checkpoint.every == 0 and step < self.cfg.train.steps:
            self.save_seconds.append((step, self.save()))

    def writing(self) -> bool:
        """This rank's files of the last save are still being written in the background."""
        return self.pending is not None and self.pending[2].busy()

    def finish(self) -> None:
        """The run's end: wait for the last save's files and mark it complete."""
        started = time.perf_counter()
        waited = self.pending is not None
        self.finish_pending()
        if waited and self.final_save_seconds is not None:  # the end waited for the final save's files too
            self.final_save_seconds += time.perf_counter() - started

    def save(self, last: bool = False) -> float:
        """Save this step's checkpoint; the seconds training waited for it (a phase of the run's summary).

        With checkpoint.async_save the state is copied to host memory and the files are written by a thread
        (`background.py`); the checkpoint is marked complete once every rank has written its files. The run's
        `last` save is copied and written by the thread as well (no step follows to change the state): the
        final evaluation runs meanwhile."""
        started = time.perf_counter()
        self.finish_pending()  # one save in flight at a time
        step = self.progress.step
        tag = ckpt.tag_for(step)
        tag_dir = self.ckpt_dir / tag
        if self.is_main and tag_dir.exists():
            shutil.rmtree(tag_dir)  # a leftover from an interrupted save of this same step
        barrier()
        client = {"step": step, "consumed_tokens": self.progress.consumed_tokens,
                  "skipped": self.progress.skipped_steps, "loader": self.loader.state_dict(), "rng": capture_rng()}
        budget = (background.host_budget(ranks_on_this_node(self.world_size), self.host_buffers)
                  if self.cfg.checkpoint.async_save else 0)
        writer = background.BackgroundWriter(budget, self.host_buffers, live=last)
        try:
            with writing_through(self.engine, writer):
                self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=client, save_latest=False)
        except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as RuntimeError
            writer.wait()
            self.save_failed(tag_dir, exc)
            self.complete(step, tag_dir, None)
        else:
            if self.cfg.checkpoint.async_save:  # the same on every rank, whether or not its thread is done
                self.pending = (step, tag_dir, writer)
                copied = "" if last else f"{writer.queued_bytes / 2**30:.2f} GiB copied to host memory, "
                self.debug(f"checkpoint {tag}: training waited {time.perf_counter() - started:.1f} s ({copied}"
                           f"{writer.inline_files} file(s) written at once); the rest is written in the background")
            else:
                self.finish_writing(step, tag_dir, writer)
        return time.perf_counter() - started

    def finish_pending(self) -> None:
        """Every rank: wait for the files of the save being written in the background, then mark it complete."""
        if self.pending is None:
            return
        step, tag_dir, writer = self.pending
        self.pending = None
        waiting = time.perf_counter()
        writer.wait()
        self.debug(f"checkpoint {tag_dir.name}: files written; waited {time.perf_counter() - waiting:.1f} s for them")
        self.finish_writing(step, tag_dir, writer)

    def finish_writing(self, step: int, tag_dir: Path, writer: background.BackgroundWriter) -> None:
        """Every rank, its files written: the checkpoint is complete if every rank's were."""
        if writer.error is not None:
            self.save_failed(tag_dir, writer.error)
        self.complete(step, tag_dir, None if writer.error is not None else writer.records)

    def debug(self, text: str) -> None:
        if debug_enabled():
            self.say(text)

    def save_failed(self, tag_dir: Path, exc: BaseException) -> None:
        if lost_peer(exc):
            raise exc  # not this disk: another rank is gone (the trainer ends the run in one line)
        self.say(f"error: checkpoint save to {tag_dir} failed ({getattr(exc, 'strerror', None) or exc}); "
                 "the previous checkpoint is still valid")

    def complete(self, step: int, tag_dir: Path, records: dict | None) -> None:
        """Every rank: agree that every rank wrote its files (`records` of the files it wrote, None where it
        failed); rank 0 then marks the checkpoint complete with every file's record, points `latest` at it and
        prunes."""
        everyone = all_gather(records, self.world_size)
        if any(r is None for r in everyone):
            if self.is_main:
                shutil.rmtree(tag_dir, ignore_errors=True)
            raise on_every_rank(NITPError(
                f"checkpoint save to {tag_dir} failed on at least one rank (disk full or unwritable?); "
                "the previous checkpoint is intact — free space or fix permissions and resume"))
        if self.is_main:
            files = {name: record for rank_records in everyone for name, record in rank_records.items()}
            for path in integrity.checkpoint_files(tag_dir):
                if path.name not in files:  # written around the writer (none, as a rule): read back
                    files[path.name] = integrity.file_record(path)
            ckpt.mark_complete(tag_dir, {**self.meta(step), integrity.FILES_KEY: files})
            ckpt.update_latest(self.ckpt_dir, tag_dir.name)
            prune(self.ckpt_dir, self.cfg.checkpoint.keep_last)
        barrier()
        self.intact_step = step

    def meta(self, step: int) -> dict[str, Any]:
        """nitp_meta.json: what convert, export and eval need to rebuild the model without the recipe."""
        cfg, run = self.cfg, self.run
        return {"step": step, "hf_config": run.hf_config.to_dict(), "model_type": run.hf_config.model_type,
                "seq_len": cfg.data.seq_len,  # the training length, which `nitp eval` scores at
                "nitp": {"head": cfg.nitp.head, "head_mult": cfg.nitp.head_mult,
                         "target_layer": run.target_layer, "weight": cfg.nitp.weight, "loss": cfg.nitp.loss,
                         "offset": cfg.nitp.offset, "stop_grad": cfg.nitp.stop_grad,
                         "weight_warmup_steps": cfg.nitp.weight_warmup_steps},
                "tokenizer_dir": str(self.data.tokenizer_dir.resolve()) if self.data.tokenizer_dir else None,
                "data_dir": str(Path(cfg.data.path).resolve()), "world_size": run.world_size,
                "autoep_size": run.autoep_size, "consumed_tokens": self.progress.consumed_tokens}


@contextlib.contextmanager
def writing_through(engine, writer: background.BackgroundWriter):
    """DeepSpeed's `save_checkpoint` hands its files to `writer` instead of its own engine."""
    own, engine.checkpoint_engine = engine.checkpoint_engine, writer
    try:
        yield
    finally:
        engine.checkpoint_engine = own


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (0 keeps all); incomplete ones are left."""
    if keep_last <= 0:
        return
    complete = [(s, d) for s, d in ckpt.list_tags(ckpt_dir) if ckpt.is_complete(d)]
    for _, tag_dir in complete[:-keep_last]:
        shutil.rmtree(tag_dir, ignore_errors=True)


def capture_rng() -> dict[str, Any]:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
