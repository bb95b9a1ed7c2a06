"""The training loop: build, resume, step, evaluate, checkpoint, log — on every rank.

`train(cfg, ds_config_path)` is what `nitp train` runs on each rank (the `deepspeed` launcher
starts one process per GPU, or per CPU slot with DS_ACCELERATOR=cpu). Each step of the loop has a
name: `train_step`, `evaluate`, `save`. Only global rank 0 writes logs and metrics.
"""

from __future__ import annotations

import gc
import math
import os
import random
import shutil
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nitp_ds.checkpoint import state as ckpt
from nitp_ds.config import Config, dump_yaml, from_dict, read_yaml, to_dict, validate
from nitp_ds.ds_config import derive_ds_config, load_ds_config
from nitp_ds.errors import NITPError
from nitp_ds.logging import MetricsLogger, format_train_line

RESOLVED = "resolved_config.yaml"


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------


def lr_factor(step: int, cfg: Config) -> float:
    """Multiplier of optim.lr after `step` optimizer steps (warmup, then cosine / WSD / constant)."""
    s, total = cfg.schedule, max(cfg.train.steps, 1)
    if s.warmup_steps and step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    if s.kind == "constant":
        return 1.0
    floor = s.min_lr_ratio
    if s.kind == "cosine":
        progress = min(1.0, (step - s.warmup_steps) / max(1, total - s.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = total - int(s.decay_ratio * total)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
    return 1.0 - (1.0 - floor) * progress


# ---------------------------------------------------------------------------------------------
# Distributed set-up
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_dist_env() -> None:
    """RANK/WORLD_SIZE/LOCAL_RANK for this process, whatever started it.

    The deepspeed launcher (local, pdsh, --no_ssh) and MPICH set them. OpenMPI's mpirun (`deepspeed
    --launcher openmpi`) sets only OMPI_COMM_WORLD_*: mapped here, since DeepSpeed's own mapping needs
    mpi4py and would come too late (the trainer needs its rank before the process group exists). A single
    process started without a launcher gets a 1-process group.
    """
    if "RANK" in os.environ:
        return
    if "OMPI_COMM_WORLD_RANK" in os.environ:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise NITPError(f"started by mpirun without {' and '.join(missing)}; export MASTER_ADDR=<address of "
                            "the first node> and MASTER_PORT=<free port> to every rank (e.g. in .deepspeed_env)")
        os.environ.update(RANK=os.environ["OMPI_COMM_WORLD_RANK"], WORLD_SIZE=os.environ["OMPI_COMM_WORLD_SIZE"],
                          LOCAL_RANK=os.environ["OMPI_COMM_WORLD_LOCAL_RANK"])
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))


def world() -> tuple[int, int, int]:
    """(global rank, world size, local rank). Only the global rank says "rank 0": on the second of two nodes
    with one process each, LOCAL_RANK is 0 and RANK is 1."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def start_process_group() -> None:
    """Join the process group before anything can fail, so that ranks can agree on start-up errors."""
    from deepspeed import comm
    from deepspeed.accelerator import get_accelerator

    if torch.cuda.is_available():
        torch.cuda.set_device(world()[2])  # object collectives on NCCL use the current device
    comm.init_distributed(dist_backend=get_accelerator().communication_backend_name())


def on_every_rank(exc: NITPError) -> NITPError:
    """Mark an error that every rank raises alike: global rank 0 shows it, the other ranks exit quietly."""
    exc.raised_on_every_rank = True
    return exc


def agree_on_errors(start):
    """Run `start()` on every rank; if it fails on any rank, every rank stops (none is left waiting in a
    collective) and global rank 0 shows each distinct error once, naming the ranks when not all had it."""
    import torch.distributed as dist

    try:
        result, error = start(), None
    except Exception as exc:  # noqa: BLE001 - reported to every rank, then re-raised below
        result, error = None, exc
    mine = None if error is None else str(error) if isinstance(error, NITPError) else f"{type(error).__name__}: {error}"
    messages: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, mine)
    failed: dict[str, list[int]] = {}
    for rank, message in enumerate(messages):
        if message is not None:
            failed.setdefault(message, []).append(rank)
    if not failed:
        return result
    if error is not None and not isinstance(error, NITPError):
        raise error  # not bad input but a bug: its traceback on the rank that hit it
    if len(failed) == 1 and len(next(iter(failed.values()))) == len(messages):
        text = next(iter(failed))
    else:
        text = "; ".join(f"on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} of {len(messages)}: "
                         f"{message}" for message, ranks in failed.items())
    raise on_every_rank(NITPError(text))


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


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


def run_identity(cfg: Config) -> dict[str, Any]:
    """What makes a run directory belong to a config: changing these needs a new out_dir or --force."""
    d = to_dict(cfg)
    return {"model": d["model"], "nitp": d["nitp"], "data": {"path": d["data"]["path"], "seq_len": d["data"]["seq_len"]}}


def prepare_run_dir(cfg: Config, run_dir: Path, force: bool, rank: int) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise NITPError(f"train.out_dir {run_dir} is a file, not a directory; choose another train.out_dir")
    resolved = run_dir / RESOLVED
    if resolved.exists() and not force:
        previous = from_dict(read_yaml(resolved))
        if run_identity(previous) != run_identity(cfg):
            changed = [k for k, v in run_identity(cfg).items() if run_identity(previous)[k] != v]
            raise NITPError(f"run directory {run_dir} belongs to another config (different {', '.join(changed)}); "
                            "choose another train.out_dir or pass --force to start it afresh")
    elif run_dir.exists() and any(run_dir.iterdir()) and not resolved.exists() and not force:
        raise NITPError(f"{run_dir} exists and is not an nitp run directory; choose another train.out_dir "
                        "or pass --force")


def check_pretrained_fits(hf_config, cfg: Config, data) -> None:
    """A model.pretrained directory brings its own vocabulary and context length; the data must fit both."""
    where = cfg.model.pretrained
    if data.vocab_size > hf_config.vocab_size:
        raise NITPError(f"model.pretrained {where} has a vocabulary of {hf_config.vocab_size} tokens but the data in "
                        f"{cfg.data.path} uses {data.vocab_size}; prepare the data with that model's tokenizer "
                        "(nitp prepare-data --tokenizer DIR)")
    limit = getattr(hf_config, "max_position_embeddings", None)
    if limit is not None and cfg.data.seq_len > limit:
        raise NITPError(f"data.seq_len ({cfg.data.seq_len}) exceeds the {limit} positions of model.pretrained "
                        f"{where}; lower data.seq_len")


def build_lm(cfg: Config, vocab_size: int) -> torch.nn.Module:
    """The Hugging Face model to train, built from the recipe or loaded from model.pretrained."""
    from nitp_ds.models import build_model

    lm = build_model(cfg.model, vocab_size)
    # from_pretrained returns a model in eval mode, where Hugging Face layers skip activation checkpointing
    # (and dropout) until the first evaluation switches them back: train from the first step.
    lm.train()
    if cfg.train.activation_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return lm


class Trainer:
    def __init__(self, cfg: Config, ds_config_path: str | Path, *, force: bool = False):
        validate(cfg)
        self.cfg = cfg
        self.run_dir = Path(cfg.train.out_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.rank, self.world_size, self.local_rank = world()
        self.is_main = self.rank == 0
        self.state = RunState()
        self.force = force
        self.ds_raw = load_ds_config(ds_config_path)
        # A --resume path is checked now, before the run directory is written; --force starts afresh.
        self.resume_from = None if force else ckpt.explicit_resume(cfg.checkpoint.resume)

        from nitp_ds.data.dataset import TokenLoader, check_vocab, open_data

        self.data = open_data(cfg.data.path)
        if cfg.model.pretrained:
            from nitp_ds.models import load_pretrained_config

            self.hf_config = load_pretrained_config(cfg.model.pretrained)
            self.vocab_size = self.hf_config.vocab_size
            check_pretrained_fits(self.hf_config, cfg, self.data)
        else:
            self.vocab_size = cfg.model.vocab_size or self.data.vocab_size
            check_vocab(self.data, self.vocab_size)
            self.hf_config = self._hf_config()
        from nitp_ds.models import num_experts

        self.ds_config = derive_ds_config(self.ds_raw, cfg, world_size=self.world_size,
                                          num_experts=num_experts(self.hf_config), model_type=self.hf_config.model_type)
        if self.resume_from is not None:  # refused before the model is built (a `latest` one is checked at resume)
            ckpt.check_expert_layout(ckpt.read_meta(self.resume_from), self.ds_config, self.resume_from)
        self.loader = TokenLoader(self.data, "train", cfg.data.seq_len, cfg.train.micro_batch_size,
                                  dp_rank=self.rank, dp_world_size=self.world_size, seed=cfg.train.seed,
                                  weights=cfg.data.weights or None)
        # Built now (evaluation runs at the end of every run): a too-small val split is refused before
        # training, not after it. `val_batches` is pure, so this one loader serves every evaluation.
        self.val_loader = TokenLoader(self.data, "val", cfg.data.seq_len, cfg.train.micro_batch_size,
                                      dp_rank=self.rank, dp_world_size=self.world_size, seed=cfg.train.seed)

    def _hf_config(self):
        from nitp_ds.models import build_hf_config

        return build_hf_config(self.cfg.model, self.vocab_size)

    # -- build -------------------------------------------------------------------------------

    def build(self) -> None:
        from nitp_ds.engine import build_engine
        from nitp_ds.nitp import NITPModel

        cfg = self.cfg
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(cfg.train.seed)  # identical initial weights on every rank
        lm = build_lm(cfg, self.vocab_size)
        target_layer = cfg.target_layer if cfg.model.pretrained is None else (
            cfg.nitp.target_layer if cfg.nitp.target_layer is not None
            else max(1, round(0.2 * lm.config.num_hidden_layers)))
        if not 0 <= target_layer < lm.config.num_hidden_layers:
            raise on_every_rank(NITPError(f"nitp.target_layer ({target_layer}) must be in [0, {lm.config.num_hidden_layers - 1}] "
                            f"for the {lm.config.num_hidden_layers}-layer model in {cfg.model.pretrained}"))
        self.target_layer = target_layer
        aux_group = None
        if cfg.moe.aux_loss_scope == "global" and self.world_size > 1:
            import torch.distributed as dist

            aux_group = lambda: dist.group.WORLD  # noqa: E731
        model = NITPModel(lm, head=cfg.nitp.head, head_mult=cfg.nitp.head_mult, target_layer=target_layer,
                          ce_chunk_tokens=cfg.train.ce_chunk_tokens, aux_group_fn=aux_group,
                          compile_loss=cfg.train.compile_loss)
        compile_layers = cfg.train.compile_layers if cfg.train.compile_layers is not None else torch.cuda.is_available()
        if compile_layers:
            from nitp_ds.models import compile_decoder_layers

            compile_decoder_layers(lm)
        if cfg.train.zero3_fetch == "layer":
            # One ZeRO-3 fetch unit per decoder layer, as FSDP wraps per block: DeepSpeed then gathers and
            # releases a layer's parameters together and runs none of its Python hooks on the submodules
            # inside (they run around every module, even when its parameters are resident).
            from deepspeed.utils import set_z3_leaf_modules

            set_z3_leaf_modules(model, list({type(layer) for layer in lm.model.layers}))
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        fused = cfg.optim.fused if cfg.optim.fused is not None else torch.cuda.is_available()
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, fused=fused)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
        self.engine = build_engine(model, self.ds_config, optimizer, scheduler, nitp_weight=cfg.nitp.weight,
                                   aux_weight=cfg.moe.aux_loss_weight, z_weight=cfg.moe.z_loss_weight,
                                   fast_zero_step=cfg.train.fast_zero_step)
        self.device = self.engine.device

    # -- checkpoints -------------------------------------------------------------------------

    def resume(self) -> None:
        mode = self.cfg.checkpoint.resume
        if mode == "never" or self.force:
            return
        if mode == "auto":
            tag_dir = ckpt.latest_complete(self.ckpt_dir, warn=self.log_warning)
            if tag_dir is None:
                return
            try:  # an explicit --resume PATH was checked at start-up
                ckpt.check_expert_layout(ckpt.read_meta(tag_dir), self.ds_config, tag_dir)
            except NITPError as exc:  # every rank reads the same files: rank 0 says it once
                raise on_every_rank(exc) from None
        else:
            tag_dir = self.resume_from
        universal = (tag_dir / "zero").is_dir() and not list(tag_dir.glob("*optim_states.pt"))
        if universal:
            self.engine._config.load_universal_checkpoint = True
        load_path, client = self.engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                                        load_module_strict=True)
        if load_path is None:
            raise NITPError(f"could not load checkpoint {tag_dir}; it may be truncated — resume from an earlier "
                            "global_stepN or pass --resume never")
        if universal:
            # DeepSpeed 0.19's ZeRO-3 universal loader hands every parameter sub-group one shared `step` tensor,
            # which torch's Adam then increments once per sub-group and step (2, 5, 8, … with 3 sub-groups),
            # skewing the bias correction: each sub-group gets its own copy.
            for state in self.engine.optimizer.optimizer.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()
        client = client or {}
        self.state.step = int(client.get("step", 0))
        self.state.consumed_tokens = int(client.get("consumed_tokens", 0))
        self.state.skipped_steps = int(client.get("skipped", 0))  # not "skipped_steps": DeepSpeed's own key
        if "loader" in client:
            self.loader.load_state_dict(client["loader"])
        if "rng" in client:
            restore_rng(client["rng"])
        self.log_info(f"resumed from {tag_dir} at step {self.state.step}")

    def save(self) -> None:
        step = self.state.step
        tag = ckpt.tag_for(step)
        tag_dir = self.ckpt_dir / tag
        if self.is_main and tag_dir.exists():
            shutil.rmtree(tag_dir)  # a leftover from an interrupted save of this same step
        self.barrier()
        client = {"step": step, "consumed_tokens": self.state.consumed_tokens,
                  "skipped": self.state.skipped_steps, "loader": self.loader.state_dict(), "rng": capture_rng()}
        try:
            self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=client, save_latest=False)
            ok = 1
        except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as RuntimeError
            self.log_warning(f"error: checkpoint save to {tag_dir} failed ({getattr(exc, 'strerror', None) or exc}); "
                             "the previous checkpoint is still valid")
            ok = 0
        ok = self.all_min(ok)
        if not ok:
            if self.is_main:
                shutil.rmtree(tag_dir, ignore_errors=True)
            raise on_every_rank(NITPError(
                f"checkpoint save to {tag_dir} failed on at least one rank (disk full or unwritable?); "
                "the previous checkpoint is intact — free space or fix permissions and resume"))
        if self.is_main:
            ckpt.mark_complete(tag_dir, self.checkpoint_meta(step))
            ckpt.update_latest(self.ckpt_dir, tag)
            ckpt.prune(self.ckpt_dir, self.cfg.checkpoint.keep_last)
        self.barrier()

    def checkpoint_meta(self, step: int) -> dict[str, Any]:
        return {"step": step, "hf_config": self.hf_config.to_dict(), "model_type": self.hf_config.model_type,
                "nitp": {"head": self.cfg.nitp.head, "head_mult": self.cfg.nitp.head_mult,
                         "target_layer": self.target_layer, "weight": self.cfg.nitp.weight},
                "tokenizer_dir": str(self.data.tokenizer_dir.resolve()) if self.data.tokenizer_dir else None,
                "data_dir": str(Path(self.cfg.data.path).resolve()), "world_size": self.world_size,
                "autoep_size": self.ds_config.get("expert_parallel", {}).get("autoep_size"),
                "consumed_tokens": self.state.consumed_tokens}

    # -- helpers -----------------------------------------------------------------------------

    def barrier(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()

    def all_min(self, value: int) -> int:
        import torch.distributed as dist

        flag = torch.tensor([value], device=self.device, dtype=torch.float32)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return int(flag.item())

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(values)
        return values

    def all_mean(self, values: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(values)
            values = values / self.world_size
        return values

    def check_shared_run_dir(self) -> None:
        """Every rank must see what rank 0 writes in the run directory: all ranks write their checkpoint shards
        there, and rank 0 alone marks checkpoints complete. A node-local disk would resume ranks differently.
        Checked before the model is built, so that a wrong set-up fails in seconds."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        name = [f".shared-check-{os.urandom(6).hex()}" if self.is_main else None]
        if self.is_main:
            (self.run_dir / name[0]).touch()
        dist.broadcast_object_list(name, src=0)  # a fresh name: no cached directory entry can answer for it
        seen: list[bool | None] = [None] * self.world_size
        dist.all_gather_object(seen, (self.run_dir / name[0]).exists())
        if self.is_main:
            (self.run_dir / name[0]).unlink()
        if not all(seen):
            raise on_every_rank(NITPError(
                f"train.out_dir {self.run_dir} is not shared: some rank cannot see what rank 0 writes there "
                "(a node-local disk?); put it on a filesystem that every node mounts at the same path"))

    def log_info(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    def log_warning(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    def install_signal_handlers(self) -> None:
        def request_stop(signum, frame):
            self.state.stop_requested = True

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    # -- the loop ----------------------------------------------------------------------------

    def batch_to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def train_step(self) -> StepResult:
        """One optimizer step over grad_accum micro-batches, or a skipped one.

        Every rank runs forward and backward on every micro-batch, finite or not: ZeRO-3 and AutoEP keep the
        ranks in lockstep through collectives inside both passes. Then one small all-reduce counts the
        non-finite losses of all ranks and micro-batches and the ranks asking to stop: the loop's only wait
        on the device in a step (DeepSpeed's step has its own). If any loss was non-finite, the window's
        gradients are dropped and the optimizer, the lr schedule and the step count stay where they were;
        the data has moved on, so the step is retried on new batches.
        """
        engine, accum = self.engine, self.cfg.train.grad_accum
        attempt = self.state.step + self.state.skipped_steps + 1  # for the fault hook: skipped steps count
        totals: dict[str, torch.Tensor] = {}
        load = None
        nonfinite = torch.zeros((), device=self.device)
        tokens = 0
        for micro in range(1, accum + 1):
            batch = self.batch_to_device(next(self.loader))
            loss = engine(batch["input_ids"], batch["labels"])
            if fault_nan(attempt, micro):
                loss = loss * float("nan")
            nonfinite += (~torch.isfinite(loss.detach())).float()
            for key, value in engine.loss_parts.items():
                if key == "load":
                    load = value if load is None else load + value
                else:
                    totals[key] = totals.get(key, 0) + value.float() / accum
            tokens += batch["input_ids"].numel() * self.world_size
            engine.backward(loss)
            if micro < accum:
                engine.step()  # inside the window: DeepSpeed only counts the micro-batch
        flags = torch.stack([nonfinite, torch.tensor(float(self.state.stop_requested), device=self.device)])
        bad, stopping = self.all_sum(flags).tolist()
        if bad:
            discard_gradients(engine)
            return StepResult(None, int(bad), stopping > 0)
        engine.step()
        self.state.consumed_tokens += tokens
        if load is not None and load.numel():
            totals["load"] = load
        return StepResult(totals, 0, stopping > 0)

    def evaluate(self) -> dict[str, float]:
        self.engine.eval()
        sums = torch.zeros(3, device=self.device)
        with torch.no_grad():
            for batch in self.val_loader.val_batches(self.cfg.train.eval_batches):
                batch = self.batch_to_device(batch)
                self.engine(batch["input_ids"], batch["labels"])
                parts = self.engine.loss_parts
                sums += torch.stack([parts["loss/ntp"].float(), parts["loss/nitp"].float(),
                                     torch.ones((), device=self.device)])
        self.engine.train()
        sums = self.all_mean(sums)
        n = max(sums[2].item(), 1.0)
        ntp = sums[0].item() / n
        return {"val/loss_ntp": ntp, "val/ppl": math.exp(min(ntp, 50)), "val/loss_nitp": sums[1].item() / n}

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.is_main:
            if self.force and self.run_dir.exists():
                shutil.rmtree(self.run_dir)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.atomic_write_text(self.run_dir / RESOLVED, dump_yaml(cfg))
            import json

            ckpt.atomic_write_text(self.run_dir / "ds_config.json", json.dumps(self.ds_config, indent=2))
        self.check_shared_run_dir()
        self.build()
        self.barrier()
        self.resume()
        logger = MetricsLogger(self.run_dir, enabled=self.is_main, tensorboard=cfg.logging.tensorboard,
                               resume_step=self.state.step)
        self.install_signal_handlers()
        flops_per_token, peak = self.flops_model()
        tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * self.world_size * cfg.data.seq_len
        interval: dict[str, torch.Tensor] = {}
        interval_steps, interval_start = 0, time.perf_counter()
        first_loss = None
        status = "finished"
        with PausedGC(cfg.train.gc_every) as paused_gc:
            while self.state.step < cfg.train.steps:
                result = self.train_step()
                parts = result.parts
                if parts is None:
                    self.state.bad_steps += 1
                    self.state.skipped_steps += 1
                    micro_batches = cfg.train.grad_accum * self.world_size
                    self.log_warning(f"warning: step {self.state.step + 1} has a non-finite loss ({result.nonfinite} of "
                                     f"{micro_batches} micro-batches); skipped "
                                     f"({self.state.bad_steps}/{cfg.train.max_bad_steps} in a row)")
                    if self.state.bad_steps >= cfg.train.max_bad_steps:
                        logger.close()
                        raise on_every_rank(NITPError(
                            f"{self.state.bad_steps} consecutive steps had a non-finite loss; stopping. The newest "
                            f"checkpoint in {self.ckpt_dir} is from before the trouble — lower optim.lr or check the "
                            "data, then resume"))
                    continue  # a stop request is still pending on its rank: the next step's all-reduce carries it
                self.state.bad_steps = 0
                self.state.step += 1
                for key, value in parts.items():
                    interval[key] = interval.get(key, 0) + value
                interval_steps += 1
                step = self.state.step
                paused_gc.step(step)
                if step % cfg.logging.every == 0 or step == cfg.train.steps:
                    record = self.interval_record(interval, interval_steps, time.perf_counter() - interval_start,
                                                  tokens_per_step, flops_per_token, peak)
                    if first_loss is None:
                        first_loss = record["loss/ntp"]
                    self.state.last = record
                    logger.log(record)
                    logger.print(format_train_line(record, cfg.train.steps))
                    interval, interval_steps, interval_start = {}, 0, time.perf_counter()
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
                    self.log_eval(logger, step)
                if result.stop:
                    status = "preempted"
                    self.log_info(f"stop requested at step {step}: saving a checkpoint and exiting")
                    self.save()
                    break
                if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < cfg.train.steps:
                    self.save()
        if status == "finished":
            if cfg.train.steps and not ckpt.is_complete(self.ckpt_dir / ckpt.tag_for(self.state.step)):
                self.save()
            final_eval = self.log_eval(logger, self.state.step) if cfg.train.steps else {}
        else:
            final_eval = {}
        logger.close()
        summary = {"status": status, "step": self.state.step, "consumed_tokens": self.state.consumed_tokens,
                   "skipped_steps": self.state.skipped_steps, "first_loss_ntp": first_loss, **self.state.last,
                   **final_eval, "run_dir": str(self.run_dir)}
        if self.is_main:
            import json

            ckpt.atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))
        return summary

    def log_eval(self, logger: MetricsLogger, step: int) -> dict[str, float]:
        record = self.evaluate()
        logger.log({"kind": "eval", "step": step, **record})
        logger.print(f"eval  step {step:>6}  val ntp {record['val/loss_ntp']:.4f}  ppl {record['val/ppl']:.2f}  "
                     f"val nitp {record['val/loss_nitp']:.4f}")
        return record

    def flops_model(self) -> tuple[float | None, float | None]:
        from nitp_ds.metrics import flops_per_token, head_param_count, peak_flops

        head = head_param_count(self.cfg.nitp.head, self.hf_config.hidden_size, self.cfg.nitp.head_mult)
        try:
            fpt = flops_per_token(self.hf_config, self.cfg.data.seq_len, nitp_head_params=head)
            peak = peak_flops(self.device) if torch.cuda.is_available() else None
        except Exception:
            return None, None
        return fpt, peak

    def interval_record(self, interval: dict[str, torch.Tensor], steps: int, seconds: float, tokens_per_step: int,
                        flops_per_token: float | None, peak: float | None) -> dict[str, Any]:
        keys = [k for k in interval if k != "load"]
        values = self.all_mean(torch.stack([interval[k].float().reshape(()) for k in keys]) / steps).tolist()
        record: dict[str, Any] = {"kind": "train", "step": self.state.step, **dict(zip(keys, values))}
        record.pop("tokens", None)
        record["lr"] = self.engine.get_lr()[0]
        grad_norm = self.engine.get_global_grad_norm()
        record["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        record["tokens_per_s"] = tokens_per_step * steps / max(seconds, 1e-9)
        record["consumed_tokens"] = self.state.consumed_tokens
        record["skipped_steps"] = self.state.skipped_steps
        if flops_per_token and peak:
            record["mfu"] = record["tokens_per_s"] * flops_per_token / (peak * self.world_size)
        if torch.cuda.is_available():
            record["memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if self.cfg.logging.expert_load and "load" in interval:
            from nitp_ds.metrics import expert_load_stats

            record.update(expert_load_stats(interval["load"].float().cpu()))
        return record


# ---------------------------------------------------------------------------------------------
# RNG and fault injection
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


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
    ensure_dist_env()
    start_process_group()

    def start() -> Trainer:
        prepare_run_dir(cfg, Path(cfg.train.out_dir), force, world()[0])
        return Trainer(cfg, ds_config_path, force=force)

    try:
        summary = agree_on_errors(start).run()
    except NITPError:
        # Every rank stops here together; leaving the group first spares rank 0 an abort at exit
        # ("terminate called without an active exception") that would replace exit code 2.
        leave_process_group(barrier=False)
        raise
    # The same abort was seen once after a normal finish (the demo, 1 run in 4): leave the group there too.
    leave_process_group(barrier=True)
    return summary


def leave_process_group(barrier: bool) -> None:
    import torch.distributed as dist

    from nitp_ds.launch import remove_shm_buffers

    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
    if "MASTER_PORT" in os.environ and "RANK" in os.environ:  # every rank has mapped the others' by now
        remove_shm_buffers(os.environ["MASTER_PORT"], os.environ["RANK"])
