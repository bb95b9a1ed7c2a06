"""Host memory of one rank while the training model is built and handed to DeepSpeed, without data or steps.

argv: MODE DS_CONFIG KEY=VALUE... (recipe overrides on the debug recipe, model.vocab_size among them).
MODE is `partitioned` (the trainer's build, nitp_ds.build) or `whole` (every rank builds the whole model
first, as nitp-ds did before it built under zero.Init), with `-build` appended to stop before the engine.
Rank 0 prints one JSON line: resident set sizes in MB (from /proc/self/status) before the build, the peak
during the build and at its end, during AutoEP's repacking, the peak while `deepspeed.initialize` builds the
engine and after it; the model's parameter count and fp32 size; and every rank's figures.
"""

import json
import sys
from pathlib import Path

import torch

from nitp_ds.build import build_nitp_model, build_optimizer, build_schedule, seed_everything
from nitp_ds.config import load_config
from nitp_ds.distributed import ensure_dist_env, exit_process, start_process_group
from nitp_ds.ds_config import load_ds_config
from nitp_ds.engine import build_engine
from nitp_ds.models import build_model
from nitp_ds.nitp import NITPModel
from nitp_ds.resolve import resolve_run

MB = 2**20


def status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / MB
    raise KeyError(field)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS, so the next peak is this phase's


mode, ds_path, *overrides = sys.argv[1:]
build_only = mode.endswith("-build")  # no engine: the build alone
mode = mode.removesuffix("-build")
ensure_dist_env()
start_process_group()
import torch.distributed as dist  # noqa: E402

cfg = load_config(str(Path(__file__).resolve().parents[2] / "recipes" / "debug.yaml"), overrides)
world = dist.get_world_size()
run = resolve_run(cfg, load_ds_config(ds_path), world)
ds, vocab = run.ds_config, run.vocab_size
figures = {"mode": mode, "world_size": world, "autoep": bool(ds.get("expert_parallel", {}).get("enabled", False))}
with torch.device("meta"):  # the modeling code imported before the baseline: it is not the model's memory
    NITPModel(build_model(cfg.model, vocab), head=cfg.nitp.head, head_mult=cfg.nitp.head_mult, target_layer=1)
reset_peak()
figures["before_mb"] = status("VmRSS")
figures["before_anon_mb"], figures["before_shmem_mb"] = status("RssAnon"), status("RssShmem")
seed_everything(cfg.train.seed)
if mode == "partitioned":
    model = build_nitp_model(cfg, run)
else:
    model = NITPModel(build_model(cfg.model, vocab), head=cfg.nitp.head, head_mult=cfg.nitp.head_mult, target_layer=1)
figures["params"] = sum(int(torch.Size(getattr(p, "ds_shape", p.shape)).numel()) for p in model.parameters())
figures["build_peak_mb"], figures["build_end_mb"] = status("VmHWM"), status("VmRSS")
figures["build_end_anon_mb"], figures["build_end_shmem_mb"] = status("RssAnon"), status("RssShmem")
engine = None
if not build_only and figures["autoep"]:
    # AutoEP's repacking inside initialize: one MoE layer's experts gathered at a time (the transient)
    from deepspeed.module_inject.auto_ep import AutoEP

    replace = AutoEP.replace_moe_layers

    def measured_replace(*args, **kwargs):
        reset_peak()
        start = status("VmRSS")
        result = replace(*args, **kwargs)
        figures["autoep_repack_start_mb"], figures["autoep_repack_peak_mb"] = start, status("VmHWM")
        figures["autoep_repack_end_mb"] = status("VmRSS")
        return result

    AutoEP.replace_moe_layers = measured_replace
if not build_only:
    reset_peak()
    optimizer = build_optimizer(cfg, model)
    engine = build_engine(model, ds, optimizer, build_schedule(cfg, optimizer), nitp_weight=1.0, aux_weight=0.0,
                          z_weight=0.0)
    figures["initialize_peak_mb"], figures["initialize_end_mb"] = status("VmHWM"), status("VmRSS")
    if "autoep_repack_peak_mb" in figures:  # the repack reset the peak: the larger of before and after it counts
        figures["initialize_peak_mb"] = max(figures["initialize_peak_mb"], figures["autoep_repack_peak_mb"])
figures["fp32_weights_mb"] = figures["params"] * 4 / MB
peaks = [None] * world
dist.all_gather_object(peaks, {k: figures[k] for k in figures if k.endswith("_mb")})
if dist.get_rank() == 0:
    figures["ranks"] = peaks
    print("FIGURES " + json.dumps(figures), flush=True)
if engine is not None:
    engine.destroy()
dist.destroy_process_group()
exit_process(0)  # past the group's native threads, which can abort the interpreter's own exit
