"""ZeRO-Offload with the toolkit: which optimizer runs the offloaded step, and what the run says about it.

A ds_config with `zero_optimization.offload_optimizer.device: cpu` keeps the fp32 master weights, Adam's
moments and the fp32 gradients in host memory and runs the optimizer step on the CPU; `offload_param`
(cpu) keeps the parameter partitions there too (`ds_configs/zero3_moe_offload.json` does both).

- The step runs in DeepSpeed's `DeepSpeedCPUAdam` (AdamW mode, the recipe's optim.* values), which needs
  DeepSpeed's compiled `cpu_adam` op: prebuilt (`DS_BUILD_CPU_ADAM=1 pip install deepspeed`) or built by
  DeepSpeed on first use with the machine's C++ compiler (a few minutes, then cached under
  TORCH_EXTENSIONS_DIR). The op is loaded at start-up, before anything is written, so that a machine
  without it is told so in one line.
- With `"zero_force_ds_cpu_optimizer": false` in the ds_config, DeepSpeed accepts a client optimizer
  instead, and the trainer's torch AdamW runs the step on the host tensors (no compiled op; slower).
- `train.fast_zero_step` rewrites passes of the on-device ZeRO-3 step; DeepSpeed's offloaded step is
  left as it is (`nitp_ds.engine.streamline_zero3_step` skips it), and the run says so in one line.
- NVMe offload is refused: DeepSpeed cannot checkpoint an NVMe-swapped optimizer.
"""

from __future__ import annotations

from typing import Any

import torch

from nitp_ds.errors import NITPError


def offload_devices(ds: dict[str, Any]) -> tuple[str | None, str | None]:
    """(optimizer device, parameter device) of a ds_config's ZeRO offload; None where nothing is offloaded."""
    zero = ds.get("zero_optimization", {})

    def device(key: str) -> str | None:
        value = (zero.get(key) or {}).get("device", "none")
        return None if value in (None, "none") else str(value)

    return device("offload_optimizer"), device("offload_param")


def uses_cpu_adam(ds: dict[str, Any]) -> bool:
    """Whether the offloaded step runs in DeepSpeedCPUAdam (DeepSpeed's default) or in torch's AdamW."""
    return offload_devices(ds)[0] is not None and ds.get("zero_force_ds_cpu_optimizer", True) is not False


def check_offload(ds: dict[str, Any]) -> None:
    """Refuse an offload this toolkit cannot run, and load the cpu_adam op where the step needs it."""
    optimizer, param = offload_devices(ds)
    for key, device in (("offload_optimizer", optimizer), ("offload_param", param)):
        if device not in (None, "cpu"):
            raise NITPError(f"ds_config zero_optimization.{key}.device is '{device}'; nitp-ds supports \"cpu\" "
                            "(DeepSpeed cannot checkpoint an NVMe-swapped optimizer): set it to \"cpu\" or \"none\"")
    stage = ds.get("zero_optimization", {}).get("stage")
    if (optimizer or param) and stage != 3:
        raise NITPError(f"ds_config offloads with zero_optimization.stage {stage}; nitp-ds trains with ZeRO stage 3: "
                        "set \"stage\": 3")
    if uses_cpu_adam(ds):
        load_cpu_adam()


def load_cpu_adam() -> None:
    from deepspeed.ops.op_builder import CPUAdamBuilder

    builder = CPUAdamBuilder()
    try:
        builder.load(verbose=False)
    except BaseException as exc:  # noqa: BLE001 - a failed JIT build raises anything from SystemExit to OSError
        if isinstance(exc, KeyboardInterrupt):
            raise
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise NITPError("ds_config offloads the optimizer to the CPU, which needs DeepSpeed's cpu_adam op, but it "
                        f"cannot be loaded or built here ({reason}); install a C++ compiler and ninja (DeepSpeed "
                        "builds it on first use), or reinstall with DS_BUILD_CPU_ADAM=1 pip install deepspeed, or set "
                        "\"zero_force_ds_cpu_optimizer\": false in the ds_config to run torch's AdamW on the CPU "
                        "(slower)") from None


def make_optimizer(groups: list[dict[str, Any]], optim: Any, ds: dict[str, Any], *, fused: bool):
    """AdamW for the recipe's parameter groups: DeepSpeedCPUAdam when the offloaded step needs it."""
    if uses_cpu_adam(ds):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                weight_decay=optim.weight_decay, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                             weight_decay=optim.weight_decay, fused=fused)


def fast_zero_step_notice(cfg: Any, ds: dict[str, Any]) -> str | None:
    """One line when train.fast_zero_step is asked for but DeepSpeed's offloaded step runs instead."""
    if cfg.train.fast_zero_step and offload_devices(ds)[0] is not None:
        return ("notice: train.fast_zero_step does not apply with offload_optimizer (DeepSpeed's own step runs on "
                "the CPU); it is off for this run (set train.fast_zero_step=false to silence this)")
    return None
