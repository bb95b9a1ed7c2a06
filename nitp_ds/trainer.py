"""The training loop: build, resume, step, evaluate, checkpoint, log — on every rank.

`train(cfg, ds_config_path)` is what `nitp train` runs on each rank (the `deepspeed` launcher
starts one process per GPU, or per CPU slot with DS_ACCELERATOR=cpu). `Trainer.run` reads top to bottom:
set up, then per step `step_or_skip` and the cadences by name (`maybe_log`, `maybe_eval`, the checkpoint
manager's `maybe_save`). What the run derives from the recipe is in `resolve.py`, what it builds in
`build.py`, its checkpoints in `checkpoint/manager.py`, its process group in `distributed.py`. Only global
rank 0 writes logs and metrics.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nitp_ds.build import build_engine_for
from nitp_ds.checkpoint import state as ckpt
from nitp_ds.checkpoint.manager import CheckpointManager
from nitp_ds.console import debug_enabled
from nitp_ds.config import Config, dump_yaml, from_dict, read_yaml, to_dict, validate
from nitp_ds.distributed import (agree_on_errors, all_mean, all_sum_read_later, barrier, check_shared_run_dir,
                                 ensure_dist_env, leave_process_group, lost_peer, lost_peer_error, on_every_rank,
                                 start_process_group, world)
from nitp_ds.ds_config import load_ds_config
from nitp_ds.errors import NITPError
from nitp_ds.evaluate import summary_line, validation_loss, validation_windows
from nitp_ds.logs import MetricsLogger, format_train_line
from nitp_ds.metrics import mfu
from nitp_ds.memory import check_run
from nitp_ds.offload import check_offload, fast_zero_step_notice
from nitp_ds.phases import Phases
from nitp_ds.resolve import resolve_run

RESOLVED = "resolved_config.yaml"


@dataclass
class RunState:
    step: int = 0
    consumed_tokens: int = 0
    bad_steps: int = 0
    skipped_steps: int = 0
    stop_requested: bool = False
    last: dict[str, float] = field(default_factory=dict)


@dataclass
class StepResult:
    parts: dict[str, torch.Tensor] | None  # the step's loss parts (device tensors); None when it was skipped
    nonfinite: int  # micro-batches with a non-finite loss, summed over ranks
    stop: bool  # some rank was asked to stop (SIGTERM/SIGINT)
    writes_done: bool = False  # no rank is still writing a checkpoint in the background


def run_identity(cfg: Config) -> dict[str, Any]:
    """What makes a run directory belong to a config: changing these needs a new out_dir or --force."""
    d = to_dict(cfg)
    return {"model": d["model"], "nitp": d["nitp"], "data": {"path": d["data"]["path"], "seq_len": d["data"]["seq_len"]}}


def prepare_run_dir(cfg: Config, run_dir: Path, force: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise NITPError(f"train.out_dir {run_dir} is a file, not a directory; choose another train.out_dir")
    resolved = run_dir / RESOLVED
    if resolved.exists() and not force:
        previous = from_dict(read_yaml(resolved), drop_replaced=True)
        if run_identity(previous) != run_identity(cfg):
            changed = [k for k, v in run_identity(cfg).items() if run_identity(previous)[k] != v]
            raise NITPError(f"run directory {run_dir} belongs to another config (different {', '.join(changed)}); "
                            "choose another train.out_dir or pass --force to start it afresh")
    elif run_dir.exists() and any(run_dir.iterdir()) and not resolved.exists() and not force:
        raise NITPError(f"{run_dir} exists and is not an nitp run directory; choose another train.out_dir "
                        "or pass --force")


class Trainer:
    def __init__(self, cfg: Config, ds_config_path: str | Path, *, force: bool = False,
                 entered: float | None = None):
        """`entered`: when `train` was called, the end of the start-up's imports (default: now)."""
        validate(cfg)
        self.cfg = cfg
        self.run_dir = Path(cfg.train.out_dir)
        self.rank, self.world_size, self.local_rank = world()
        self.is_main = self.rank == 0
        self.state = RunState()
        self.phases = Phases(say=self.say if debug_enabled() else None,
                             wait=torch.cuda.synchronize if torch.cuda.is_available() else None)
        self.phases.mark("imports", entered)
        self.force = force
        ds_raw = load_ds_config(ds_config_path)
        # A --resume path is checked now, before the run directory is written; --force starts afresh.
        self.resume_from = None if force else ckpt.explicit_resume(cfg.checkpoint.resume, self.rank, self.world_size)

        from nitp_ds.data.dataset import TokenLoader, open_data

        self.data = open_data(cfg.data.path)
        self.resolved = resolve_run(cfg, ds_raw, self.world_size, self.data)
        check_offload(self.resolved.ds_config)  # before anything is written: the offloaded step's needs
        self.memory_plan = check_run(cfg, self.resolved, local_rank=self.local_rank)  # refuses what cannot fit
        if self.resume_from is not None:  # refused before the model is built (a `latest` one is checked at resume)
            ckpt.check_expert_layout(ckpt.read_meta(self.resume_from), self.resolved.ds_config, self.resume_from)
        self.loader = TokenLoader(self.data, "train", cfg.data.seq_len, cfg.train.micro_batch_size,
                                  dp_rank=self.rank, dp_world_size=self.world_size, seed=cfg.train.seed,
                                  weights=cfg.data.weights or None)
        # Drawn now (evaluation runs at the end of every run): a too-small val split is refused before
        # training, not after it.
        validation_windows(self.data, cfg.data.seq_len, cfg.train.eval_tokens)
        self.first_loss: float | None = None  # the first logged loss/ntp, for the summary
        self.tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * self.world_size * cfg.data.seq_len

    def build(self) -> None:
        """The engine (model, optimizer, schedule) and the checkpoint manager that saves and resumes it."""
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
        notice = fast_zero_step_notice(self.cfg, self.resolved.ds_config)
        if notice:
            self.say(notice)
        self.phases.mark("setup")
        self.engine = build_engine_for(self.cfg, self.resolved, on_built=lambda: self.phases.mark("model"))
        self.phases.mark("engine")
        self.device = self.engine.device
        self.checkpoints = CheckpointManager(self.engine, self.cfg, self.resolved, self.data, self.state, self.loader,
                                             resume_from=self.resume_from, force=self.force, is_main=self.is_main,
                                             say=self.say)

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.write_run_dir()
        check_shared_run_dir(self.run_dir, self.world_size, self.is_main)
        self.build()
        barrier()
        self.checkpoints.resume()
        self.phases.mark("resume")
        self.logger = MetricsLogger(self.run_dir, enabled=self.is_main, tensorboard=cfg.logging.tensorboard,
                                    resume_step=self.state.step, wandb_config=cfg.logging.wandb,
                                    run_config=to_dict(cfg))
        self.install_signal_handlers()
        self.flops = self.flops_model()
        self.start_interval()
        status = "finished"
        gc.enable()  # off for the start-up (`train`); the loop's own pause (`train.gc_every`) begins with a collection
        try:  # the loggers close on every way out (W&B's run finished, TensorBoard flushed)
            with PausedGC(cfg.train.gc_every) as paused_gc:
                while self.state.step < cfg.train.steps:
                    result = self.step_or_skip()
                    if result.parts is None:
                        continue  # a stop request still pending on its rank: the next step's all-reduce carries it
                    self.phases.step_done()
                    step = self.state.step
                    paused_gc.step(step)
                    self.maybe_log(step, result.parts)
                    self.maybe_eval(step)
                    if result.stop:
                        status = "preempted"
                        self.say(f"stop requested at step {step}: saving a checkpoint and exiting")
                        break
                    self.checkpoints.maybe_save(step, last=False, writes_done=result.writes_done)
            self.checkpoints.maybe_save(self.state.step, last=True)  # its files are written during the evaluation
            final_eval = self.log_eval(self.state.step) if status == "finished" and cfg.train.steps else {}
            self.checkpoints.finish()
        except NITPError as exc:
            if getattr(exc, "raised_on_every_rank", False):  # every rank stops here: the save in flight completes
                self.checkpoints.finish_pending()
            raise
        finally:
            self.logger.close()
        return self.write_summary(status, final_eval)

    def write_run_dir(self) -> None:
        """Rank 0 (re)creates the run directory with the resolved recipe and the completed ds_config."""
        if not self.is_main:
            return
        if self.force and self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(self.run_dir / RESOLVED, dump_yaml(self.cfg))
        ckpt.atomic_write_text(self.run_dir / "ds_config.json", json.dumps(self.resolved.ds_config, indent=2))

    def write_summary(self, status: str, final_eval: dict[str, float]) -> dict[str, Any]:
        summary = {"status": status, "step": self.state.step, "consumed_tokens": self.state.consumed_tokens,
                   "skipped_steps": self.state.skipped_steps, "first_loss_ntp": self.first_loss, **self.state.last,
                   **final_eval, "run_dir": str(self.run_dir),
                   "phases": self.phases.summary(self.checkpoints.save_seconds, self.checkpoints.final_save_seconds)}
        summary["step"] = self.state.step  # the last logged record's own "step" may be older (logging.every > 1)
        if self.is_main:
            ckpt.atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))
        return summary

    # -- cadences ----------------------------------------------------------------------------

    def start_interval(self) -> None:
        """Loss parts are summed on the device between two log lines."""
        self.interval: dict[str, torch.Tensor] = {}
        self.interval_steps, self.interval_start = 0, time.perf_counter()

    def maybe_log(self, step: int, parts: dict[str, torch.Tensor]) -> None:
        """Add the step's parts to the interval; every logging.every steps and at the last, log the interval."""
        for key, value in parts.items():
            self.interval[key] = self.interval.get(key, 0) + value
        self.interval_steps += 1
        if step % self.cfg.logging.every and step != self.cfg.train.steps:
            return
        record = self.interval_record(self.interval, self.interval_steps, time.perf_counter() - self.interval_start)
        if self.first_loss is None:
            self.first_loss = record["loss/ntp"]
        self.state.last = record
        self.logger.log(record)
        self.logger.print(format_train_line(record, self.cfg.train.steps))
        self.start_interval()

    def maybe_eval(self, step: int) -> None:
        """Every train.eval_every steps inside the run (the run's end has its own, final evaluation)."""
        if self.cfg.train.eval_every and step % self.cfg.train.eval_every == 0 and step < self.cfg.train.steps:
            self.log_eval(step)

    # -- one step, or a skipped one ------------------------------------------------------------

    def step_or_skip(self) -> StepResult:
        """`train_step`, and the count of steps skipped for a non-finite loss: max_bad_steps in a row stop the run."""
        result = self.train_step()
        if result.parts is not None:
            self.state.bad_steps = 0
            self.state.step += 1
            return result
        self.state.bad_steps += 1
        self.state.skipped_steps += 1
        micro_batches = self.cfg.train.grad_accum * self.world_size
        self.say(f"warning: step {self.state.step + 1} has a non-finite loss ({result.nonfinite} of "
                 f"{micro_batches} micro-batches); skipped "
                 f"({self.state.bad_steps}/{self.cfg.train.max_bad_steps} in a row)")
        if self.state.bad_steps >= self.cfg.train.max_bad_steps:
            raise on_every_rank(NITPError(
                f"{self.state.bad_steps} consecutive steps had a non-finite loss; stopping. The newest "
                f"checkpoint in {self.checkpoints.ckpt_dir} is from before the trouble — lower optim.lr or check the "
                "data, then resume"))
        return result

    def batch_to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """On CUDA copied from pinned memory, so that the copy does not wait for the device's queue."""
        if self.device.type == "cuda":
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def train_step(self) -> StepResult:
        """One optimizer step over grad_accum micro-batches, or a skipped one.

        Every rank runs forward and backward on every micro-batch, finite or not: ZeRO-3 and AutoEP keep the
        ranks in lockstep through collectives inside both passes. One small all-reduce counts the non-finite
        losses of all ranks and micro-batches, the ranks asking to stop and those still writing a checkpoint
        in the background. It is queued after the last forward and read after the last backward is queued:
        the loop's own only wait on the device in a step, and it waits for the forward alone. (DeepSpeed's
        ZeRO-3 step then waits for the backward, to check the gradient norm on the host; the host queues the
        update and the next forward while the device runs the update.) If any loss was
        non-finite, the window's gradients are dropped and the optimizer, the lr schedule and the step count
        stay where they were; the data has moved on, so the step is retried on new batches.
        """
        engine, accum = self.engine, self.cfg.train.grad_accum
        attempt = self.state.step + self.state.skipped_steps + 1  # for the fault hook: skipped steps count
        totals: dict[str, torch.Tensor] = {}
        load = None
        nonfinite = torch.zeros((), device=self.device)
        tokens = 0
        for micro in range(1, accum + 1):
            batch = self.batch_to_device(next(self.loader))
            loss, parts = engine(batch["input_ids"], batch["labels"])
            if fault_nan(attempt, micro):
                loss = loss * float("nan")
            nonfinite += (~torch.isfinite(loss.detach())).float()
            for key, value in parts.items():
                if key == "load":
                    load = value if load is None else load + value
                else:
                    totals[key] = totals.get(key, 0) + value.float() / accum
            tokens += batch["input_ids"].numel() * self.world_size
            if micro == accum:  # made on the device (a tensor from host values would wait for it)
                votes = torch.stack([nonfinite, nonfinite.new_full((), float(self.state.stop_requested)),
                                     nonfinite.new_full((), float(self.checkpoints.writing()))])
                read_votes = all_sum_read_later(votes, self.world_size)
            engine.backward(loss)
            if micro < accum:
                engine.step()  # inside the window: DeepSpeed only counts the micro-batch
        bad, stopping, writing = read_votes()
        if bad:
            discard_gradients(engine)
            return StepResult(None, int(bad), stopping > 0)
        engine.step()
        self.state.consumed_tokens += tokens
        if load is not None and load.numel():
            totals["load"] = load
        return StepResult(totals, 0, stopping > 0, writes_done=writing == 0)

    def say(self, text: str) -> None:
        """Rank 0 prints a status line (info, warning, or a save error that the run goes past)."""
        if self.is_main:
            print(text, flush=True)

    def install_signal_handlers(self) -> None:
        def request_stop(signum, frame):
            self.state.stop_requested = True

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    # -- evaluation and records ----------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """The validation loss by the function `nitp eval` calls (nitp_ds.evaluate): the ranks split its sample.
        It runs the engine's module, whose ZeRO-3 hooks gather the parameters, for its per-sequence losses."""
        cfg = self.cfg
        return validation_loss(self.engine.module, self.data, seq_len=cfg.data.seq_len,
                               max_tokens=cfg.train.eval_tokens, batch_size=cfg.train.micro_batch_size,
                               device=self.device, rank=self.rank, world_size=self.world_size, pad=True).record()

    def log_eval(self, step: int) -> dict[str, float]:
        record = self.evaluate()
        self.logger.log({"kind": "eval", "step": step, **record})
        self.logger.print(f"eval  step {step:>6}  {summary_line(record)}")
        return record

    def flops_model(self) -> tuple[float | None, float | None]:
        from nitp_ds.metrics import flops_per_token, head_param_count, peak_flops

        head = head_param_count(self.cfg.nitp.head, self.resolved.hf_config.hidden_size, self.cfg.nitp.head_mult)
        try:
            fpt = flops_per_token(self.resolved.hf_config, self.cfg.data.seq_len, nitp_head_params=head)
            peak = peak_flops(self.device) if torch.cuda.is_available() else None
        except Exception:
            return None, None
        return fpt, peak

    def interval_record(self, interval: dict[str, torch.Tensor], steps: int, seconds: float) -> dict[str, Any]:
        """The train record of the last `steps` steps: loss parts averaged over steps and ranks, throughput."""
        keys = [k for k in interval if k != "load"]
        values = all_mean(torch.stack([interval[k].float().reshape(()) for k in keys]) / steps, self.world_size).tolist()
        record: dict[str, Any] = {"kind": "train", "step": self.state.step, **dict(zip(keys, values))}
        record.pop("tokens", None)
        record["lr"] = self.engine.get_lr()[0]
        grad_norm = self.engine.get_global_grad_norm()
        record["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        record["tokens_per_s"] = self.tokens_per_step * steps / max(seconds, 1e-9)
        record["consumed_tokens"] = self.state.consumed_tokens
        record["skipped_steps"] = self.state.skipped_steps
        flops_per_token, peak = self.flops
        if flops_per_token and peak:
            record["mfu"] = mfu(record["tokens_per_s"], flops_per_token, peak * self.world_size)
        if torch.cuda.is_available():
            record["memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if self.cfg.logging.expert_load and "load" in interval:
            from nitp_ds.metrics import expert_load_stats

            record.update(expert_load_stats(interval["load"].float().cpu()))
        return record


# ---------------------------------------------------------------------------------------------
# GC, fault injection, discarding a step
# ---------------------------------------------------------------------------------------------


class PausedGC:
    """Python's automatic cyclic garbage collection paused for the training loop, as torchtitan does: an
    automatic collection can land in any step and stall the host thread that feeds the device (host-bound steps
    showed ±20% jitter). `step(n)` collects the young generations every `every` steps; 0 leaves Python's own GC.
    The pause goes through DeepSpeed's process-wide GC manager (the one its `disable_python_gc` option uses),
    which collects once, disables, and restores the previous state when its last holder releases it."""

    def __init__(self, every: int):
        self.every, self.generation = every, None

    def __enter__(self) -> "PausedGC":
        if self.every:
            from deepspeed.runtime.python_gc import python_gc_manager

            self.generation = python_gc_manager.acquire()
        return self

    def step(self, step: int) -> None:
        if self.every and step % self.every == 0:
            gc.collect(1)

    def __exit__(self, *exc) -> None:
        if self.generation is not None:
            from deepspeed.runtime.python_gc import python_gc_manager

            python_gc_manager.release(self.generation)


def fault_nan(attempt: int, micro_batch: int = 1) -> bool:
    """Test hook: NITP_FAULT_NAN_STEPS makes chosen losses NaN (skip-and-stop tests).

    Each comma-separated entry is a step attempt, "3" (every micro-batch of the 3rd attempt) or "3:2" (only
    its 2nd micro-batch, 1-based). Attempts count skipped steps too, so "3" skips one step and training goes
    on, while "3,4,5" is three bad steps in a row.
    """
    spec = os.environ.get("NITP_FAULT_NAN_STEPS")
    if not spec:
        return False
    entries = spec.split(",")
    return str(attempt) in entries or f"{attempt}:{micro_batch}" in entries


def discard_gradients(engine) -> None:
    """End an accumulation window without an optimizer step: drop its gradients, keep DeepSpeed's count of
    micro-batches in step, leave the optimizer, the lr schedule and DeepSpeed's step counter untouched."""
    optimizer = engine.optimizer
    clean_up = getattr(optimizer, "_overflow_clean_up", None)
    if clean_up is not None:
        # ZeRO-3's own discard after an fp16 overflow: gradients, partitioned buffers, accumulation counter.
        clean_up(getattr(optimizer, "loss_scale", 1.0))
    elif hasattr(optimizer, "zero_grad"):
        optimizer.zero_grad(set_to_none=True)
    engine.zero_grad()
    engine.micro_steps += 1  # the window's last micro-batch, which engine.step() would have counted


def train(cfg: Config, ds_config_path: str | Path, *, force: bool = False) -> dict[str, Any]:
    entered = time.time()  # the start-up's imports end here
    # Python's cyclic GC is off until the training loop starts: the start-up allocates millions of objects
    # (imports, the model, the engine) and each automatic full collection walks all of them; `nitp train` turns
    # it off before its imports too. It is on again whichever way `train` ends.
    gc.disable()
    try:
        return _train(cfg, ds_config_path, force, entered)
    finally:
        gc.enable()


def _train(cfg: Config, ds_config_path: str | Path, force: bool, entered: float) -> dict[str, Any]:
    ensure_dist_env()
    start_process_group()

    def start() -> Trainer:
        prepare_run_dir(cfg, Path(cfg.train.out_dir), force)
        return Trainer(cfg, ds_config_path, force=force, entered=entered)

    try:
        summary = agree_on_errors(start).run()
    except NITPError:
        # Every rank stops here together; leaving the group first spares rank 0 an abort at exit
        # ("terminate called without an active exception") that would replace exit code 2.
        leave_process_group(barrier=False)
        raise
    except RuntimeError as exc:
        if not lost_peer(exc) or os.environ.get("NITP_DEBUG"):
            raise  # a bug, or --debug: the traceback
        # Another rank is gone (killed, crashed, its node lost): a collective failed here. One line, no
        # traceback; its checkpoints were never at risk (a save is complete only once every rank wrote its part).
        raise lost_peer_error(exc, ckpt.resume_hint(Path(cfg.train.out_dir) / "checkpoints")) from None
    # The same abort was seen once after a normal finish (the demo, 1 run in 4): leave the group there too.
    leave_process_group(barrier=True)
    return summary
