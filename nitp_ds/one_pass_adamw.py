"""AdamW's update of a ZeRO-3 sub-group in one pass over memory (part of `train.fast_zero_step`).

DeepSpeed's ZeRO-3 step, for each parameter sub-group, converts its bf16 gradients into a new fp32 buffer, runs
torch's fused AdamW over the fp32 master weights, then copies the master weights into the bf16 partition the
model computes with: 6 + 28 + 6 bytes of memory traffic per parameter, and a transient fp32 buffer the size of
the sub-group. On shape B of the GPU benchmark (3.1B parameters, one H200) these passes took ~45 ms of a
~120 ms step. `adamw_update` does the same arithmetic as torch's fused kernel (ATen's fused_adam_utils.cuh)
in one pointwise function: it reads the gradient in the dtype it was reduced in, updates the master weights and
both moments, and writes the partition (28 bytes per parameter, no buffer); on a GPU torch.compile makes it one
kernel, elsewhere it runs eagerly (bench/one_pass_adamw.py, one H200: 7.0 ms instead of 13.7 ms per billion
parameters; shape B's step went from ~122 to ~100 ms). The optimizer state stays torch AdamW's own (`adam.state[master]`: step,
exp_avg, exp_avg_sq), so checkpoints are unchanged: DeepSpeed's step resumes them, and this one resumes
DeepSpeed's. It applies to fused torch Adam/AdamW without amsgrad or maximize; any other optimizer keeps
DeepSpeed's path. tests/test_train_options.py checks losses, gradient norms and parameters against DeepSpeed's
own step, tests/test_reliability.py resumes checkpoints across the two, and tests/test_one_pass_adamw.py checks
the arithmetic against torch's fused AdamW, compiled too.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch


def adamw_update(master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 out: torch.Tensor, step: torch.Tensor, lr: torch.Tensor, grad_scale: torch.Tensor,
                 beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool) -> None:
    """One Adam(W) step in place: `master`, the moments and `step` updated, `out` (the low-precision copy the
    model reads) written from the new master weights. `grad` is divided by `grad_scale` (the clip scale) first;
    `lr`, `step` and `grad_scale` are 0-d tensors on the device, so a new learning rate needs no new kernel."""
    step.add_(1)
    g = grad.to(master.dtype) / grad_scale
    if weight_decay != 0.0:
        if decoupled:
            master.sub_(master * (lr * weight_decay))
        else:
            g = g + master * weight_decay
    exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).add_(g * g, alpha=1 - beta2)
    bias_correction1 = 1 - torch.pow(beta1, step)
    bias_correction2_sqrt = (1 - torch.pow(beta2, step)).sqrt()
    denom = exp_avg_sq.sqrt() / bias_correction2_sqrt + eps
    master.sub_((lr / bias_correction1) * exp_avg / denom)
    out.copy_(master)


@functools.cache
def _compiled_update() -> Callable[..., None]:
    return torch.compile(adamw_update, fullgraph=True, dynamic=True)


def update_for(device: torch.device) -> Callable[..., None]:
    """`adamw_update` compiled into one kernel on a GPU with Triton; as it is elsewhere (`train.fast_zero_step=false`
    leaves the whole step to DeepSpeed where compiling fails)."""
    from torch.utils._triton import has_triton

    return _compiled_update() if device.type == "cuda" and has_triton() else adamw_update


def applies(zero: Any) -> bool:
    """Whether the ZeRO-3 optimizer's step can run in one pass (the streamlined step's conditions hold)."""
    adam = zero.optimizer
    if type(adam) not in (torch.optim.Adam, torch.optim.AdamW) or not adam.defaults.get("fused"):
        return False
    if any(g.get("amsgrad") or g.get("maximize") or g.get("differentiable") for g in adam.param_groups):
        return False
    if getattr(zero, "offload_param", False):  # partitions in host memory: DeepSpeed's copy crosses devices
        return False
    return all(flat is not None and flat.device == master.device  # none swapped to NVMe
               for flat, master in zip(zero.fp16_partitioned_groups_flat, zero.fp32_partitioned_groups_flat))


def install(zero: Any, back_to_back: Callable[[list[torch.Tensor]], torch.Tensor | None]) -> bool:
    """Replace the sub-group step of a ZeRO-3 optimizer (`applies`) with the one-pass update; False where it
    is left as it is. `back_to_back` gives one flat view of a sub-group's gradients where they lie back to back
    in ZeRO-3's gradient buffer (else None: that sub-group takes DeepSpeed's path)."""
    if not applies(zero):
        return False
    adam = zero.optimizer
    device = zero.fp32_partitioned_groups_flat[0].device  # every sub-group's, as ZeRO-3 places them
    update = update_for(device)
    no_scale = torch.ones((), dtype=torch.float32, device=device)
    prepare_grad, optimizer_step = zero._prepare_fp32_grad_for_sub_group, zero._optimizer_step
    reassign = zero._reassign_or_swap_out_partitioned_parameters
    pending: dict[int, torch.Tensor] = {}  # sub-group -> its flat gradient, between prepare and step
    updated: set[int] = set()  # sub-groups whose partition the update wrote

    def keep_gradient(sub_group_id: int) -> None:
        master = zero.fp32_partitioned_groups_flat[sub_group_id]
        flat = back_to_back(zero.averaged_gradients[sub_group_id])
        if flat is None or flat.numel() != master.numel():
            return prepare_grad(sub_group_id)
        pending[sub_group_id] = flat
        zero.averaged_gradients[sub_group_id] = None

    @torch.no_grad()
    def one_pass_step(sub_group_id: int) -> None:
        grad = pending.pop(sub_group_id, None)
        if grad is None:
            return optimizer_step(sub_group_id)
        group = adam.param_groups[zero.sub_group_to_group_id[sub_group_id]]
        master = zero.fp32_partitioned_groups_flat[sub_group_id]
        state = adam.state[master]
        if not state:  # torch's lazy initialisation of a fused Adam(W)'s state
            state["step"] = torch.zeros((), dtype=torch.float32, device=master.device)
            state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
        if state["step"].device != master.device or state["step"].dtype != torch.float32:
            state["step"] = state["step"].to(master.device, torch.float32)
        lr = group["lr"]
        lr = lr.to(master.device, torch.float32) if torch.is_tensor(lr) else \
            torch.full((), lr, dtype=torch.float32, device=master.device)
        scale = adam.grad_scale if getattr(adam, "grad_scale", None) is not None else no_scale
        beta1, beta2 = group["betas"]
        update(master, grad, state["exp_avg"], state["exp_avg_sq"], zero.fp16_partitioned_groups_flat[sub_group_id],
               state["step"], lr, scale.reshape(()), float(beta1), float(beta2), float(group["eps"]),
               float(group["weight_decay"]), bool(group.get("decoupled_weight_decay", type(adam) is torch.optim.AdamW)))
        updated.add(sub_group_id)

    def reassign_updated(sub_group_id: int) -> None:
        if sub_group_id in updated:  # the update wrote the partition: only its parameters' views are renewed
            updated.discard(sub_group_id)
            return zero._unflatten_partitioned_parameters(sub_group_id)
        return reassign(sub_group_id)

    zero._prepare_fp32_grad_for_sub_group = keep_gradient
    zero._optimizer_step = one_pass_step
    zero._reassign_or_swap_out_partitioned_parameters = reassign_updated
    return True
