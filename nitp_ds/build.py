"""What a run trains: the model (the Hugging Face LM inside NITPModel), its optimizer and lr schedule, and the
NITPEngine that holds them — `build_engine_for(cfg, run)`.

Under ZeRO-3 the model is partitioned as it is built (nitp_ds/models/partitioned.py): no rank holds the whole
model, and its initial weights are those of an ordinary build with the run's seed, whatever the world size;
`model.pretrained` is streamed into the partitions (nitp_ds/models/pretrained.py).
"""

from __future__ import annotations

import math
import random
from typing import Callable

import torch

from nitp_ds.config import Config
from nitp_ds.resolve import ResolvedRun


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def build_lm(cfg: Config, vocab_size: int, ds_config: dict | None = None, log=print) -> torch.nn.Module:
    """The Hugging Face model to train, built from the recipe or loaded from model.pretrained; partitioned as it
    is built when `ds_config` is ZeRO-3."""
    from nitp_ds.models.partitioned import build_partitioned_model

    lm = build_partitioned_model(cfg.model, vocab_size, ds_config, log=log)
    # from_pretrained returns a model in eval mode, where Hugging Face layers skip activation checkpointing
    # (and dropout) until the first evaluation switches them back: train from the first step.
    lm.train()
    if cfg.train.activation_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return lm


def build_nitp_model(cfg: Config, run: ResolvedRun) -> torch.nn.Module:
    """The LM wrapped with the NITP head and loss parts; decoder layers compiled and made ZeRO-3 fetch units as
    the recipe asks."""
    from functools import partial

    from nitp_ds.distributed import world
    from nitp_ds.models.partitioned import construction, initialize_module
    from nitp_ds.nitp import NITPModel, init_head

    lm = build_lm(cfg, run.vocab_size, run.ds_config, log=print if world()[0] == 0 else lambda text: None)
    aux_group = None
    if cfg.moe.aux_loss_scope == "global" and run.world_size > 1:
        import torch.distributed as dist

        aux_group = lambda: dist.group.WORLD  # noqa: E731
    with construction(run.ds_config):  # the head is partitioned as it is built, like the LM
        model = NITPModel(lm, head=cfg.nitp.head, head_mult=cfg.nitp.head_mult, target_layer=run.target_layer,
                          ce_chunk_tokens=cfg.train.ce_chunk_tokens, aux_group_fn=aux_group,
                          compile_loss=cfg.train.compile_loss, loss=cfg.nitp.loss, stop_grad=cfg.nitp.stop_grad,
                          offset=cfg.nitp.offset)
    if model.nitp_head is not None:  # its draws follow the LM's, as in an ordinary build
        initialize_module(model.nitp_head, partial(init_head, init_std=lm.config.initializer_range),
                          on_host=cfg.model.init_on_host)
    compile_layers = cfg.train.compile_layers if cfg.train.compile_layers is not None else torch.cuda.is_available()
    if compile_layers:  # the decoder layers and the NITP head, each compiled as it is called
        from nitp_ds.models import compile_decoder_layers, compile_forward

        compile_decoder_layers(lm)
        if model.nitp_head is not None:
            compile_forward(model.nitp_head)
    if cfg.train.zero3_fetch == "layer":
        # One ZeRO-3 fetch unit per decoder layer (and one for the NITP head), as FSDP wraps per block:
        # DeepSpeed then gathers and releases a unit's parameters together and runs none of its Python hooks
        # on the submodules inside (they run around every module, even when its parameters are resident).
        from deepspeed.utils import set_z3_leaf_modules, set_z3_leaf_modules_by_name

        set_z3_leaf_modules(model, list({type(layer) for layer in lm.model.layers}))
        if model.nitp_head is not None:  # by name: a linear head's class is every nn.Linear's
            set_z3_leaf_modules_by_name(model, ["nitp_head"])
    return model


def build_optimizer(cfg: Config, model: torch.nn.Module, ds_config: dict | None = None) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on norms and biases); DeepSpeedCPUAdam when the ds_config
    offloads the optimizer step to the CPU (nitp_ds/offload.py)."""
    from nitp_ds.models.partitioned import full_ndim
    from nitp_ds.offload import make_optimizer

    decay = [p for p in model.parameters() if full_ndim(p) >= 2]  # a partitioned parameter is flat: its full shape
    no_decay = [p for p in model.parameters() if full_ndim(p) < 2]
    fused = cfg.optim.fused if cfg.optim.fused is not None else torch.cuda.is_available()
    return make_optimizer(
        [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        cfg.optim, ds_config or {}, fused=fused)


def build_schedule(cfg: Config, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


def build_engine_for(cfg: Config, run: ResolvedRun, on_built: Callable[[], None] = lambda: None):
    """The NITPEngine of the run: seeded model (identical initial weights on every rank), optimizer, schedule.
    `on_built()` is called once the model is built and initialised, before `deepspeed.initialize`."""
    from nitp_ds.engine import build_engine

    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed_everything(cfg.train.seed)  # identical initial weights on every rank
    model = build_nitp_model(cfg, run)
    on_built()
    optimizer = build_optimizer(cfg, model, run.ds_config)
    return build_engine(model, run.ds_config, optimizer, build_schedule(cfg, optimizer), nitp_weight=cfg.nitp.weight,
                        aux_weight=cfg.moe.aux_loss_weight, z_weight=cfg.moe.z_loss_weight,
                        fast_zero_step=cfg.train.fast_zero_step,
                        nitp_weight_warmup_steps=cfg.nitp.weight_warmup_steps)
