"""NITPEngine: a DeepSpeedEngine that owns the composite loss L = L_NTP + λ·L_NITP + α·L_aux + β·L_z.

`deepspeed.initialize` always builds the base class, so `build_engine` constructs the subclass
the way `initialize` does (distributed init, zero.Init context switched off, DeepSpeedConfig,
engine, context restored). Everything else (ZeRO-3, AutoEP, checkpoints) is DeepSpeed's own.
"""

from __future__ import annotations

from typing import Any

import torch
from deepspeed.runtime.engine import DeepSpeedEngine


class NITPEngine(DeepSpeedEngine):
    def __init__(self, *args: Any, nitp_weight: float = 1.0, aux_weight: float = 0.0, z_weight: float = 0.0,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.nitp_weight = nitp_weight
        self.aux_weight = aux_weight
        self.z_weight = z_weight
        self.loss_parts: dict[str, torch.Tensor] = {}
        self.module.attach_hooks()  # after AutoEP has replaced the MoE blocks

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        parts = super().forward(input_ids=input_ids, labels=labels)
        total = parts["ntp"].float()
        if self.nitp_weight:
            total = total + self.nitp_weight * parts["nitp"].float()
        if self.aux_weight:
            total = total + self.aux_weight * parts["aux"].float()
        if self.z_weight:
            total = total + self.z_weight * parts["z"].float()
        self.loss_parts = {
            "loss/ntp": parts["ntp"].detach(),
            "loss/nitp": parts["nitp"].detach(),
            "loss/aux": parts["aux"].detach(),
            "loss/z": parts["z"].detach(),
            "loss/total": total.detach(),
            "tokens": parts["tokens"].detach(),
            "load": parts["load"],
        }
        return total


def build_engine(model: torch.nn.Module, ds_config: dict[str, Any], optimizer: torch.optim.Optimizer,
                 lr_scheduler: Any, *, nitp_weight: float, aux_weight: float, z_weight: float) -> NITPEngine:
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
                        nitp_weight=nitp_weight, aux_weight=aux_weight, z_weight=z_weight)
    partition_parameters.restore_init_context()
    engine._configure_python_gc()
    return engine
