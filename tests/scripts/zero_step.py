"""Train one tiny model with `train.fast_zero_step` on, then again with it off, in this one process; for
each gradient clip in CLIPS (comma-separated `optim.grad_clip` values).

argv: RECIPE DS_CONFIG STEPS CLIPS KEY=VALUE...; prints one JSON object per clip: its clip, and per arm
whether the ZeRO-3 optimizer's step was streamlined, which one-rank shortcuts were applied, the per-step
total loss and gradient norm; plus the largest difference between the two arms' final parameters.
`train.compile_layers=true` compiles the decoder layers and the NITP head with torch.compile's aot_eager
backend (inductor refuses AutoEP's fp32 grouped GEMM on CPU): a compiled module reads its parameters without
ZeRO-3's getter, as on a GPU.
"""

import json
import sys

import torch

import nitp_ds.models
from nitp_ds.config import load_config
from nitp_ds.distributed import ensure_dist_env
from nitp_ds.trainer import Trainer

compile_forward = nitp_ds.models.compile_forward
nitp_ds.models.compile_forward = lambda module, backend="inductor": compile_forward(module, backend="aot_eager")
recipe, ds_path, steps, clips, *overrides = sys.argv[1:]
ensure_dist_env()
for clip in clips.split(","):
    arms, params = {}, {}
    for fast in (True, False):
        cfg = load_config(recipe, [*overrides, f"optim.grad_clip={clip}", f"train.fast_zero_step={str(fast).lower()}"])
        trainer = Trainer(cfg, ds_path, force=True)
        trainer.build()
        engine = trainer.engine
        losses, norms = [], []
        for _ in range(int(steps)):
            result = trainer.train_step()
            losses.append(float(result.parts["loss/total"]))
            norms.append(float(engine.get_global_grad_norm()))
        with torch.no_grad():
            flat = torch.cat([p.ds_tensor.detach().float().flatten() for p in engine.module.parameters()])
        params[fast] = flat
        optimizer = vars(engine.optimizer)
        arms["fast" if fast else "deepspeed"] = {
            "streamlined": "unscale_and_clip_grads" in optimizer or "get_grad_norm_direct" in optimizer,
            "unscale_in_adam": getattr(engine.optimizer.unscale_and_clip_grads, "__name__", "") == "unscale_in_adam",
            "one_pass_adamw": getattr(engine.optimizer._optimizer_step, "__name__", "") == "one_pass_step",
            "one_rank": engine.one_rank_shortcuts,
            "loss": losses, "grad_norm": norms}
        engine.destroy()
    print(json.dumps({"clip": float(clip), **arms, "max_param_diff": float((params[True] - params[False]).abs().max()),
                      "param_scale": float(params[False].abs().max())}), flush=True)
