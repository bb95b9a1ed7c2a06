"""NITPEngine: a DeepSpeedEngine that owns the composite loss L = L_NTP + λ·L_NITP + α·L_aux + β·L_z.

λ is `nitp.weight`, or with `nitp.weight_warmup_steps` a linear ramp from 0 over that many optimizer steps,
read from DeepSpeed's own step counter (`global_steps`, which its checkpoints restore).

`deepspeed.initialize` always builds the base class, so `build_engine` constructs the subclass
the way `initialize` does (distributed init, zero.Init context switched off, DeepSpeedConfig,
engine, context restored). Everything else (ZeRO-3, AutoEP, checkpoints) is DeepSpeed's own, except, with
`train.fast_zero_step`, three passes of ZeRO-3's optimizer step that `streamline_zero3_step` removes and, on a
single rank, the multi-rank work that `nitp_ds.one_rank` skips.
"""

from __future__ import annotations

from typing import Any

import torch
from deepspeed.runtime.engine import DeepSpeedEngine

from nitp_ds import one_pass_adamw
from nitp_ds.one_rank import streamline_one_rank


class NITPEngine(DeepSpeedEngine):
    def __init__(self, *args: Any, nitp_weight: float = 1.0, aux_weight: float = 0.0, z_weight: float = 0.0,
                 fast_zero_step: bool = True, nitp_weight_warmup_steps: int = 0, **kwargs: Any):
        self.fast_zero_step = fast_zero_step  # read by _configure_zero_optimizer, inside DeepSpeedEngine.__init__
        super().__init__(*args, **kwargs)
        self.nitp_weight = nitp_weight
        self.nitp_weight_warmup_steps = nitp_weight_warmup_steps
        self.aux_weight = aux_weight
        self.z_weight = z_weight
        self.module.attach_hooks()  # after AutoEP has replaced the MoE blocks
        self.one_rank_shortcuts = streamline_one_rank(self.optimizer) if fast_zero_step else []

    def _configure_zero_optimizer(self, optimizer: Any) -> Any:
        from deepspeed.runtime.zero import stage3

        own = stage3.defragment
        stage3.defragment = defragment_on_device  # ZeRO-3's flat bf16 parameter buffer, built on the device
        try:
            zero = super()._configure_zero_optimizer(optimizer)
        finally:
            stage3.defragment = own
        if self.fast_zero_step:
            streamline_zero3_step(zero)
        return zero

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # type: ignore[override]
        """(total, parts): the composite loss to back-propagate, and its parts for logging (detached, apart from
        `load`, the tokens per expert): loss/ntp, loss/nitp, loss/aux, loss/z, loss/total, tokens, load."""
        parts = super().forward(input_ids=input_ids, labels=labels)
        total = parts["ntp"].float()
        if self.nitp_weight:  # the configured λ, so that a ramp starting at 0 keeps the head in the graph
            weight = nitp_weight_at(self.global_steps, self.nitp_weight, self.nitp_weight_warmup_steps)
            total = total + weight * parts["nitp"].float()
        if self.aux_weight:
            total = total + self.aux_weight * parts["aux"].float()
        if self.z_weight:
            total = total + self.z_weight * parts["z"].float()
        return total, {
            "loss/ntp": parts["ntp"].detach(),
            "loss/nitp": parts["nitp"].detach(),
            "loss/aux": parts["aux"].detach(),
            "loss/z": parts["z"].detach(),
            "loss/total": total.detach(),
            "tokens": parts["tokens"].detach(),
            "load": parts["load"],
        }


def nitp_weight_at(step: int, weight: float, warmup_steps: int) -> float:
    """λ after `step` optimizer steps: weight · step / warmup_steps during the ramp, `weight` itself after it."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return weight
    return weight * step / warmup_steps


def defragment_on_device(tensors: list[torch.Tensor]) -> torch.Tensor:
    """DeepSpeed's `zero.utils.defragment` without its round trip through host memory: ZeRO-3 moves every
    parameter partition into one flat buffer by copying them all to a new pageable host buffer and back (5.8 s of
    shape B's 6.5 s engine start-up on an H200, 3.1B parameters). Here each partition is copied into the flat
    buffer on its own device, the same layout and values. That holds the partitions twice for a moment, so a GPU
    without that much free memory takes DeepSpeed's way."""
    from deepspeed.runtime.zero.utils import defragment

    device, dtype = tensors[0].device, tensors[0].dtype
    numel = sum(t.numel() for t in tensors)
    headroom = 1 << 30
    if any(t.device != device or t.dtype != dtype for t in tensors) or \
            (device.type == "cuda" and torch.cuda.mem_get_info(device)[0] < numel * tensors[0].element_size() + headroom):
        return defragment(tensors)
    flat = torch.empty(numel, dtype=dtype, device=device)
    offset = 0
    for t in tensors:
        n = t.numel()
        flat.narrow(0, offset, n).copy_(t.data.reshape(-1))
        t.data = flat.narrow(0, offset, n)
        offset += n
    return flat


# -- ZeRO-3's optimizer step without its extra passes over every gradient ------------------------------------
#
# DeepSpeed 0.19.8's ZeRO-3 step, per parameter sub-group, (1) takes each gradient's norm after copying it to
# fp64, (2) copies the sub-group's gradients into one new flat buffer with torch.cat and then to fp32, (3)
# multiplies that buffer by 1/clip-scale, then runs the optimizer. With one GPU and billions of parameters these
# memory-bound passes cost more than the optimizer itself (shape B of the GPU benchmark: ~25 ms of a 149 ms
# step). Here (1) reduces the gradients in fp32 as they are (torch's clip_grad_norm_ does the same), all of a
# sub-group's in one reduction where they lie back to back, and hands DeepSpeed the result in fp64, (2) views
# the gradients where they already lie back to back in ZeRO-3's gradient buffer, and (3) hands the clip scale
# to fused AdamW (`grad_scale`, the hook torch.amp's GradScaler uses), which divides inside its one pass;
# with fused torch AdamW, (2) and the optimizer and the copy of the master weights into the bf16 partition
# become one pass that reads the gradients where they lie (nitp_ds/one_pass_adamw.py).
# Every other path (CPU offload, NVMe swap, Muon, fp16 loss scaling, non-fused optimizers for (3), the
# inf-norm) is left to DeepSpeed unchanged. deepspeed is pinned, and tests/test_train_options.py checks
# losses, gradient norms and parameters against DeepSpeed's own step.


class _GradForNorm:
    """A gradient as ZeRO-3's norm reads it, `g.to(device).to(dtype).norm(p)`: the norm is reduced in fp32 from
    the gradient in place and returned in `dtype`, instead of reducing a materialised fp64 copy."""

    def __init__(self, grad: torch.Tensor, dtype: torch.dtype | None = None):
        self.grad, self.norm_dtype = grad, dtype

    @property
    def dtype(self) -> torch.dtype:
        return self.grad.dtype

    def to(self, target: Any, non_blocking: bool = False) -> "_GradForNorm":
        return _GradForNorm(self.grad, target) if isinstance(target, torch.dtype) else self

    def norm(self, p: float) -> torch.Tensor:
        norm = torch.linalg.vector_norm(self.grad, p, dtype=torch.float32)
        return norm.to(self.norm_dtype) if self.norm_dtype is not None else norm


def _back_to_back(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """One flat view of `tensors` when they are contiguous and lie back to back in one storage, else None."""
    if not tensors or any(not t.is_contiguous() for t in tensors):
        return None
    first = tensors[0]
    storage = first.untyped_storage().data_ptr()
    end = first.data_ptr()
    for t in tensors:
        if t.data_ptr() != end or t.dtype != first.dtype or t.untyped_storage().data_ptr() != storage:
            return None
        end += t.numel() * t.element_size()
    return first.as_strided((sum(t.numel() for t in tensors),), (1,), first.storage_offset())


def streamline_zero3_step(zero: Any) -> bool:
    """Replace three passes of a ZeRO-3 optimizer's step (see above); False where it is left as it is."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    if not isinstance(zero, DeepSpeedZeroOptimizer_Stage3):
        return False
    if zero.offload_optimizer or zero.swap_optimizer or getattr(zero, "use_muon", False) or \
            zero.torch_autocast_gradscaler or zero.dtype == torch.float16:
        return False
    adam = zero.optimizer
    fused = isinstance(adam, torch.optim.Adam | torch.optim.AdamW) and bool(adam.defaults.get("fused"))
    norm_direct = zero.get_grad_norm_direct
    prepare_grad = zero._prepare_fp32_grad_for_sub_group

    def get_grad_norm_direct(gradients, params, norm_type=2):
        if float(norm_type) == float("inf"):
            return norm_direct(gradients, params, norm_type)
        # Without tensor parallelism every gradient of the sub-group counts, and where they lie back to back
        # (ZeRO-3's gradient buffer) their norm is one reduction instead of a kernel per parameter.
        flat = _back_to_back(gradients) if zero.model_parallel_rank == 0 else None
        if flat is not None:
            return norm_direct([_GradForNorm(flat)], params, norm_type)
        return norm_direct([_GradForNorm(g) for g in gradients], params, norm_type)

    def prepare_fp32_grad(sub_group_id):
        fp32 = zero.fp32_partitioned_groups_flat[sub_group_id]
        flat = _back_to_back(zero.averaged_gradients[sub_group_id])
        if flat is None or flat.numel() != fp32.numel():
            return prepare_grad(sub_group_id)
        fp32.grad = flat.to(fp32.dtype)  # a view when gradients accumulate in fp32, else one conversion
        zero.averaged_gradients[sub_group_id] = None

    def unscale_in_adam(sub_group_id, total_norm):
        # DeepSpeed's formula, in the norm's own dtype on the device as DeepSpeed computes it, handed to AdamW as
        # its grad_scale instead of a pass over the gradients. Nothing here waits on the device: reading the norm
        # on the host made the CPU wait for every sub-group's update before queueing the next one.
        device = zero.fp32_partitioned_groups_flat[sub_group_id].device
        if zero.clip_grad <= 0.0:  # the loss scale alone, a number on the host (1 in bf16: no scale at all)
            scale = zero.loss_scale
            adam.grad_scale = None if scale == 1.0 else torch.full((1,), float(scale), device=device)
            return
        clip = torch.clamp((torch.as_tensor(total_norm, device=device) / zero.loss_scale + 1e-6) / zero.clip_grad,
                           min=1.0)
        adam.grad_scale = (clip * zero.loss_scale).to(torch.float32).reshape(1)

    zero.get_grad_norm_direct = get_grad_norm_direct
    zero._prepare_fp32_grad_for_sub_group = prepare_fp32_grad
    if fused:
        zero.unscale_and_clip_grads = unscale_in_adam
        one_pass_adamw.install(zero, _back_to_back)  # AdamW, its gradient read and its bf16 copy in one pass
    return True


def build_engine(model: torch.nn.Module, ds_config: dict[str, Any], optimizer: torch.optim.Optimizer,
                 lr_scheduler: Any, *, nitp_weight: float, aux_weight: float, z_weight: float,
                 fast_zero_step: bool = True, nitp_weight_warmup_steps: int = 0) -> NITPEngine:
    """Construct an NITPEngine exactly as `deepspeed.initialize` constructs a DeepSpeedEngine."""
    import deepspeed
    from deepspeed import comm as dist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero import partition_parameters

    partition_parameters.shutdown_init_context()
    dist.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    config_class = DeepSpeedConfig(ds_config)
    deepspeed.set_optimizer_flags(config_class, model)
    engine = NITPEngine(args=None, model=model, optimizer=optimizer, model_parameters=None,
                        lr_scheduler=lr_scheduler, config=ds_config, config_class=config_class,
                        nitp_weight=nitp_weight, aux_weight=aux_weight, z_weight=z_weight,
                        fast_zero_step=fast_zero_step, nitp_weight_warmup_steps=nitp_weight_warmup_steps)
    partition_parameters.restore_init_context()
    engine._configure_python_gc()
    return engine
