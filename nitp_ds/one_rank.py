"""ZeRO-3 on a single rank: DeepSpeed's work that moves data nowhere, skipped (part of `train.fast_zero_step`).

With one rank in all and every parameter resident (`stage3_param_persistence_threshold: "auto"` resolves to
that on one rank), ZeRO-3 still runs its multi-rank machinery every step, and on one GPU its Python bounds the
step (docs/benchmarks.md: shape A's GPU sat idle half of each step):
- each gradient is copied into a bucket, the bucket concatenated into a new buffer, divided by the world size
  of 1, "reduce-scattered" over the one rank, and copied into ZeRO-3's gradient buffer;
- hooks around every module gather and release parameters that are never released;
- every optimizer step releases every parameter and gathers it again (at world size 1 a view of the same
  memory).
`streamline_one_rank` replaces these with what they amount to on one rank: each gradient goes straight into
its slot of the gradient buffer as its hook fires (added to it inside an accumulation window); the module
hooks are removed; the release and gather around the step are skipped while each parameter still views its
ZeRO-3 partition, which the optimizer updates in place. DeepSpeed's gradient hooks, its optimizer and its
checkpoints stay as they are. deepspeed is pinned; tests/test_train_options.py trains the same model with
and without these and compares losses, gradient norms and parameters.
"""

from __future__ import annotations

from typing import Any


def streamline_one_rank(zero: Any) -> list[str]:
    """Apply the one-rank shortcuts to a ZeRO-3 optimizer; the names of those applied (none with several
    ranks, offloading, ZenFlow or a gradient pre-divide factor)."""
    from deepspeed import comm as dist
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    if not isinstance(zero, DeepSpeedZeroOptimizer_Stage3) or dist.get_world_size() != 1 or \
            zero.offload_optimizer or zero.offload_param or zero.swap_optimizer or zero.zenflow or \
            zero.gradient_predivide_factor != 1.0:
        return []
    hand_off_gradients(zero)
    if stay_gathered(zero):
        return ["hand_off_gradients", "remove_module_hooks", "keep_parameters_between_steps"]
    return ["hand_off_gradients"]


def hand_off_gradients(zero: Any) -> None:
    """Each gradient straight into its slot of ZeRO-3's gradient buffer, as DeepSpeed's bucket path leaves it
    there on one rank. A gradient whose communication dtype differs from its own keeps DeepSpeed's path, so
    that it is rounded as DeepSpeed rounds it."""
    slots = zero._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition
    bucket_path = zero.reduce_independent_p_g_buckets_and_remove_grads

    def hand_off(param):
        grad = param.grad
        if not getattr(param, "ds_grad_is_ready", True) or zero.get_param_comm_dtype(param) != grad.dtype:
            return bucket_path(param)
        slot = slots[param.ds_id]
        if zero.micro_step_id == 0:
            slot.copy_(grad.reshape(-1))
        else:
            slot.add_(grad.reshape(-1))
        param.grad = None

    zero.reduce_independent_p_g_buckets_and_remove_grads = hand_off


def stay_gathered(zero: Any) -> bool:
    """With every parameter resident: the module hooks removed, every parameter gathered now (what the hooks
    would do on first use; compiled layers read parameters without ZeRO-3's getter) and kept gathered between
    steps. False, and nothing done, when some parameter is not resident."""
    offload = zero.parameter_offload
    params = list(offload.module.parameters())
    if len(offload.persistent_parameters) != len(params):
        return False
    remove_module_hooks(offload)
    params[0].all_gather(params)
    keep_parameters_between_steps(zero, params)
    return True


def remove_module_hooks(offload: Any) -> None:
    """DeepSpeed's fetch and release hooks around every module (and the autograd nodes they add to each
    module's inputs and outputs): with every parameter resident they fetch nothing and release nothing once
    each parameter is gathered (`stay_gathered`). The hook that starts each forward stays."""
    for handle in offload.forward_hooks + offload.backward_hooks:
        handle.remove()
    offload.forward_hooks, offload.backward_hooks = [], []


def keep_parameters_between_steps(zero: Any, params: list) -> None:
    """Skip the release of every parameter that opens each optimizer step (and so the gather that closes it)
    while every parameter's data is a view of its ZeRO-3 partition, which the step updates in place; when one
    is not, DeepSpeed's release and gather run as before.

    Checkpoints are saved and loaded as DeepSpeed does it, every parameter released (its module state then holds
    no weights), and gathered again afterwards: without the module hooks nothing else would gather them."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    release_all = zero._partition_all_parameters
    checkpoint_done = zero.checkpoint_event_epilogue

    def partition_all_parameters():
        for p in params:
            if p.ds_status != ZeroParamStatus.AVAILABLE or p.data.data_ptr() != p.ds_tensor.data_ptr() or \
                    p.data.numel() != p.ds_tensor.numel():
                return release_all()

    def checkpoint_event_epilogue():
        checkpoint_done()
        params[0].all_gather(params)

    zero._partition_all_parameters = partition_all_parameters
    zero.checkpoint_event_prologue = release_all
    zero.checkpoint_event_epilogue = checkpoint_event_epilogue
