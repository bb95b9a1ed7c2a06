"""Building a model that ZeRO-3 partitions as it is built, with the weights of an ordinary build.

Under ZeRO-3 each rank keeps only its 1/N partition of every parameter. `construction(ds_config)` builds
the modules inside DeepSpeed's `zero.Init`, which partitions each module's parameters as soon as its
constructor returns, so no rank ever holds the whole model; initialisation is switched off while it runs
(transformers' `no_init_weights`), because an init that runs on partitioned parameters silently does
nothing (they are empty placeholders).

`initialize_like_from_config` then writes the initial weights one module at a time, each module's
parameters gathered, computed in float32 and copied back into the partitions: the same draws, in the same
order, as an ordinary `from_config`. There, each torch layer draws as its constructor ends (`reset_parameters`
of nn.Linear, nn.Embedding), and each PreTrainedModel's constructor ends with `post_init`, transformers'
`initialize_weights` over its subtree (the base model is initialised before the LM head is even constructed);
the weights are tied last. The draws come from the generator of the device the parameters live on (a GPU's:
fast), or with `on_host` from the one global CPU generator (~120M values/s): then the weights are bit for bit
those of an unpartitioned build on the host with the same seed. Either way they are the same on any world size.
A rank holds one module's full parameters at a time (and their float32 copy while they are drawn).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn


def zero3_enabled(ds_config: dict[str, Any] | None) -> bool:
    return bool(ds_config) and int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3


@contextlib.contextmanager
def construction(ds_config: dict[str, Any] | None) -> Iterator[None]:
    """Modules built in this context are partitioned as they are built (ZeRO-3) and left uninitialised.

    Without ZeRO-3 in `ds_config` the modules are built whole, still uninitialised. `zero.Init` also installs
    DeepSpeed's memory-efficient linear as the process's `F.linear` when the ds_config's
    `zero_optimization.memory_efficient_linear` says so (DeepSpeed's default; its own argument is overridden by
    the config): it saves a linear layer's input, not its gathered weight, for backward.
    """
    from transformers.initialization import no_init_weights

    partitioning = (_trimming_zero_init()(config_dict_or_path=ds_config)
                    if zero3_enabled(ds_config) else contextlib.nullcontext())
    with no_init_weights(), partitioning:
        yield
    release_freed_memory()


@functools.cache
def _trimming_zero_init():
    import deepspeed

    class TrimmingInit(deepspeed.zero.Init):
        """zero.Init that hands the freed whole tensors of each module back to the system as soon as the module is
        partitioned (see `release_freed_memory`): the build's peak is then one module, not one module plus holes."""

        def _post_init_method(self, module):
            super()._post_init_method(module)
            release_freed_memory()

    return TrimmingInit


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def full_ndim(param: torch.Tensor) -> int:
    """The dimensions of a parameter as the model sees it: a partitioned one is a flat placeholder (`ndim` 1)."""
    return len(getattr(param, "ds_shape", param.shape))


@contextlib.contextmanager
def gathered(params: Iterable[nn.Parameter], modifier_rank: int | None = 0) -> Iterator[list[nn.Parameter]]:
    """The full values of `params` (partitioned or not) for the duration of the context.

    With `modifier_rank` r, what rank r writes into them is what every rank keeps afterwards (DeepSpeed
    broadcasts it and partitions again); with None, writes are discarded.
    """
    params = list(params)
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        yield params
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield params


@contextlib.contextmanager
def float32_values(params: Iterable[nn.Parameter], on_host: bool = False) -> Iterator[None]:
    """Gather `params` and let code write them as float32 tensors; the values then go back into them.

    Initial values are computed in float32 whatever the dtype of the training model, on the parameters' own
    device, or with `on_host` on the host: the CPU generator's draws, those of an ordinary build on the host.
    """
    params = list(dict.fromkeys(params))  # a parameter shared by two names is written once
    with gathered(params) as full:
        stored = [p.data for p in full]
        # a float32 parameter on the drawing device is written in place; any other gets a float32 copy there
        devices = [torch.device("cpu") if on_host else data.device for data in stored]
        copied = [data.device != device or data.dtype != torch.float32 for data, device in zip(stored, devices)]
        try:
            for p, data, device, copy in zip(full, stored, devices, copied):
                if copy:
                    p.data = data.detach().to(device, torch.float32, copy=True)
            yield
            for p, data, copy in zip(full, stored, copied):
                if copy:
                    data.copy_(p.data)
        finally:
            for p, data in zip(full, stored):
                p.data = data
    release_freed_memory()


def release_freed_memory() -> None:
    """Give the host memory that freed tensors leave behind back to the system (glibc's `malloc_trim`).

    Tensors below glibc's mmap threshold (which rises to 32 MB as large tensors are freed) come from the heap,
    and a freed one stays resident until something reuses its pages: gathering and releasing one module after
    another leaves such holes between the partitions that stay, and the resident set grows with the model
    (+85 MB on a 62 MB model at 2 ranks, measured). No-op where the C library is not glibc.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def own_parameters(module: nn.Module) -> list[nn.Parameter]:
    return list(module.parameters(recurse=False))


def replay_constructors(root: nn.Module, on_built: Callable[[nn.Module], None] | None = None,
                        on_host: bool = False) -> None:
    """What the constructors of `root`'s modules drew in an ordinary build, in the order they drew it.

    A module's constructor builds its children first (in the order it registers them, which is how the supported
    families build theirs), then ends: a torch layer with `reset_parameters` (nn.Linear, nn.Embedding) draws its
    initial values there, and `on_built(module)` stands for whatever else a constructor's end does.
    """
    for child in root.children():
        replay_constructors(child, on_built, on_host)
    reset = getattr(root, "reset_parameters", None)
    params = own_parameters(root)
    if callable(reset) and params:
        with float32_values(params, on_host):
            reset()
    if on_built is not None:
        on_built(root)


def hf_init_order(model: nn.Module) -> Iterator[tuple[nn.Module, Callable]]:
    """(module, init function) in the order of transformers' `initialize_weights`: its `smart_apply` visits
    children before their parent, and each PreTrainedModel inits its subtree with its own `_initialize_weights`."""
    from transformers import PreTrainedModel

    def visit(module: nn.Module, init: Callable) -> Iterator[tuple[nn.Module, Callable]]:
        for child in module.children():
            yield from visit(child, child._initialize_weights if isinstance(child, PreTrainedModel) else init)
        yield module, init

    yield from visit(model, model._initialize_weights)


def initialize_like_from_config(model, on_host: bool = False) -> None:
    """Initialise a Hugging Face model built in `construction()` exactly as `from_config` would have, then tie it.

    In an ordinary build every PreTrainedModel's constructor ends with `post_init()`, which initialises its subtree
    (transformers' `initialize_weights`, skipping modules already initialised, which it flags): the base model is
    initialised before the LM head is even constructed. That interleaving is replayed here. The caller seeds the
    generators first, as before an ordinary build; every rank draws the same numbers and rank 0's are kept.
    """
    from transformers import PreTrainedModel
    from transformers import initialization as hf_init

    custom_code = model.is_custom_code()

    def post_init(module: nn.Module) -> None:
        if not isinstance(module, PreTrainedModel):
            return
        with torch.no_grad(), hf_init.guard_torch_init_functions():
            for target, init in hf_init_order(module):
                if not getattr(target, "_is_hf_initialized", False):
                    with float32_values(own_parameters(target), on_host):
                        init(target, custom_code)

    replay_constructors(model, post_init, on_host)
    model.tie_weights()


def initialize_module(module: nn.Module, init: Callable[[nn.Module], None], on_host: bool = False) -> None:
    """Initialise a plain module built in `construction()`: its constructors' draws, then `init(module)` with
    all of its parameters gathered (for small modules, such as the NITP head)."""
    replay_constructors(module, on_host=on_host)
    with torch.no_grad(), float32_values(module.parameters(), on_host):
        init(module)


def build_partitioned_model(m, vocab_size: int, ds_config: dict[str, Any] | None, log: Callable[[str], None] = print):
    """`nitp_ds.models.build_model` without ever holding the whole model: built partitioned under ZeRO-3 (whole
    without it), then initialised as `from_config` would (the caller seeds first) or streamed from
    `model.pretrained` (`nitp_ds.models.pretrained`)."""
    from transformers import AutoModelForCausalLM

    from nitp_ds.models import build_hf_config
    from nitp_ds.models.pretrained import load_pretrained

    config = build_hf_config(m, vocab_size)
    with construction(ds_config):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=m.attn_implementation)
    if m.pretrained:
        model.tie_weights()  # before loading, as from_pretrained does: a tied checkpoint stores the tensor once
        plan = load_pretrained(model, m.pretrained)
        if plan.unexpected:
            log(f"notice: {len(plan.unexpected)} tensor(s) in model.pretrained {m.pretrained} are not part of the "
                f"model and were skipped, as from_pretrained skips them (e.g. {plan.unexpected[0]})")
    else:
        initialize_like_from_config(model, on_host=m.init_on_host)
    model.config.use_cache = False
    model.config.output_router_logits = False  # router logits are captured with hooks (nitp_ds.losses)
    return model
