"""`nitp train` against plain Hugging Face + DeepSpeed ZeRO-3, on the GPU performance issue's shapes.

Usage (one device call runs the whole table):
    python bench/gpu_compare.py --data DIR [--shapes A B] [--steps 20] [--variants baseline ntp nitp ...]
        [--repeats 3] [--deadline 540] [--profile] [--out DIR]

Every variant runs in a fresh child process on the same device, one after the other, repeated --repeats times
interleaved (A B C A B C ...: the machine's drift hits every variant alike); each row reports the median and
the min-max over the repeats, and the ratio to the baseline of the same repeat. No run starts after
--deadline seconds (the rest are reported as not run), a variant whose first run failed is not run again,
and NITP_BENCH_TIMEOUT bounds each run. The host's CPU
model and the GPU are printed with the table (shape A is host-bound: its figures follow the CPU).
- `baseline`: the stock model under `deepspeed.initialize` (ZeRO-3, bf16, fused torch AdamW), loss =
  the model's own CE + 0.001 · its router aux loss, random tokens: what a user gets without nitp-ds.
- `ntp`: `nitp train` with λ = 0 and no head; `nitp`: `nitp train` with the default SwiGLU head, λ = 1.
- further `nitp` variants change the recipe (`--set`) or the ds_config (see VARIANTS).
Tokens/s is the median of the logged intervals after the first (warm-up); MFU counts active parameters
(nitp_ds.metrics.flops_per_token, the issue's formula) at the device's bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The reference shapes (HF Qwen3-MoE, bf16, ZeRO-3, one GPU).
SHAPES = {
    "A": {"model.hidden_size": 1024, "model.num_layers": 16, "model.num_heads": 16, "model.num_kv_heads": 4,
          "model.head_dim": 64, "model.num_experts": 32, "model.experts_per_token": 4,
          "model.moe_intermediate_size": 512, "model.intermediate_size": 4096, "model.vocab_size": 32000,
          "model.max_seq_len": 2048, "data.seq_len": 2048, "train.micro_batch_size": 8, "nitp.target_layer": 3},
    "B": {"model.hidden_size": 2048, "model.num_layers": 4, "model.num_heads": 16, "model.num_kv_heads": 4,
          "model.head_dim": 128, "model.num_experts": 128, "model.experts_per_token": 8,
          "model.moe_intermediate_size": 768, "model.intermediate_size": 6144, "model.vocab_size": 151936,
          "model.max_seq_len": 4096, "data.seq_len": 4096, "train.micro_batch_size": 2, "nitp.target_layer": 1},
    # a smoke-test shape that runs on a CPU in seconds (DS_ACCELERATOR=cpu, --ds-config ds_configs/zero3_moe_cpu.json)
    "tiny": {"model.hidden_size": 64, "model.num_layers": 2, "model.num_heads": 4, "model.num_kv_heads": 2,
             "model.num_experts": 4, "model.experts_per_token": 2, "model.moe_intermediate_size": 32,
             "model.intermediate_size": 128, "model.vocab_size": 16384, "model.max_seq_len": 128, "data.seq_len": 128,
             "train.micro_batch_size": 2, "nitp.target_layer": 1},
}

# A4, B4: the same shapes with 4 micro-batches per optimizer step (baseline too), the step's fixed costs amortised
SHAPES.update({f"{name}4": {**SHAPES[name], "train.grad_accum": 4} for name in ("A", "B")})

NTP = {"nitp.head": "none", "nitp.weight": 0.0}
ONE_GPU = "ds_configs/zero3_moe_1gpu.json"
# name -> (recipe overrides, ds_config overrides merged into the ds_config, or a whole ds_config file)
VARIANTS: dict[str, tuple[dict, dict | str]] = {
    "ntp": (NTP, {}),
    "nitp": ({}, {}),
    # ZeRO-3's default: only parameters under 1e5 elements stay resident; the rest are gathered and
    # released around every module (what the ds_config's "auto" gives with several ranks).
    "ntp-gather": (NTP, {"zero_optimization": {"stage3_param_persistence_threshold": 100_000}}),
    "nitp-gather": ({}, {"zero_optimization": {"stage3_param_persistence_threshold": 100_000}}),
    "nitp-ce32k": ({"train.ce_chunk_tokens": 32768}, {}),
    # the cross-entropy's softmax gradient in eager PyTorch instead of torch.compile'd kernels
    "nitp-eagerce": ({"train.compile_loss": "false"}, {}),
    # decoder layers in eager PyTorch instead of torch.compile'd
    "nitp-eagerlayers": ({"train.compile_layers": "false"}, {}),
    # ZeRO-3's F.linear replacement off (it saves inputs, not gathered weights, for backward)
    "nitp-mel": ({}, {"zero_optimization": {"memory_efficient_linear": False}}),
    # DeepSpeed's per-module ZeRO-3 hooks instead of one fetch unit per decoder layer
    "nitp-module": ({"train.zero3_fetch": "module"}, {}),
    # no AutoEP: transformers' own experts (grouped_mm on a GPU) under ZeRO-3, for one GPU
    "ntp-noep": (NTP, {"expert_parallel": {"enabled": False}}),
    "nitp-noep": ({}, {"expert_parallel": {"enabled": False}}),
    # ds_configs/zero3_moe_1gpu.json: the one-GPU config (no AutoEP, plain F.linear under ZeRO-3)
    "ntp-1gpu": (NTP, ONE_GPU),
    "nitp-1gpu": ({}, ONE_GPU),
    # the one-GPU config with Python's automatic garbage collection left on during the loop
    "ntp-1gpu-autogc": ({**NTP, "train.gc_every": 0}, ONE_GPU),
    "nitp-1gpu-autogc": ({"train.gc_every": 0}, ONE_GPU),
    # the one-GPU config with DeepSpeed's own ZeRO-3 optimizer step (fp64 norms, flatten, unscale pass)
    "nitp-1gpu-dsstep": ({"train.fast_zero_step": "false"}, ONE_GPU),
    # the one-GPU config with gradients accumulated in fp32 even over one micro-batch ("auto": only over several)
    "nitp-1gpu-fp32acc": ({}, {"__file__": ONE_GPU, "data_types": {"grad_accum_dtype": "fp32"}}),
    # AutoEP's fused options: gate and up projections in one grouped GEMM, fused weighted combine
    "nitp-fusedep": ({}, {"expert_parallel": {"gate_up_impl": "fused", "combine_impl": "fused_weighted_sum"}}),
    "nitp-fusedgu": ({}, {"expert_parallel": {"gate_up_impl": "fused"}}),
    "nitp-fusedcomb": ({}, {"expert_parallel": {"combine_impl": "fused_weighted_sum"}}),
}


def merged(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


TIMEOUT_S = float(os.environ.get("NITP_BENCH_TIMEOUT", "0")) or None  # per variant, so one hang spares the rest


def child(cmd: list[str], env: dict, work: Path) -> None:
    log = work / "child.log"
    with log.open("w") as f:
        try:
            code = subprocess.run(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            code = f"timed out after {TIMEOUT_S:.0f} s"
    if code != 0:
        text = log.read_text()
        if os.environ.get("NITP_BENCH_LOGS"):  # keep the first traceback of a failed child for inspection
            first = text.find("Traceback")
            Path(os.environ["NITP_BENCH_LOGS"]).write_text(text[max(first, 0):][:60_000])
        lines = [l for l in text.splitlines() if "warn" not in l.lower()]
        raise RuntimeError(f"exit {code}: " + " | ".join(lines[-6:]))


def run_nitp(args, shape: dict, variant: tuple[dict, dict], work: Path, profile: bool) -> dict:
    recipe_sets, ds_extra = variant
    if isinstance(ds_extra, str):  # a whole ds_config file instead of overrides
        ds_extra = {"__file__": ds_extra}
    ds_extra = dict(ds_extra)
    ds = merged(json.loads((REPO / ds_extra.pop("__file__", args.ds_config)).read_text()), ds_extra)
    ds_path = work / "ds_config.json"
    ds_path.write_text(json.dumps(ds))
    sets = {**shape, "data.path": args.data, "train.out_dir": str(work / "run"), "train.steps": args.steps,
            "train.eval_every": 0, "checkpoint.every": 0, "checkpoint.resume": "never", "logging.every": 5,
            "logging.tensorboard": False, "optim.lr": 1e-4, "schedule.warmup_steps": 0, **recipe_sets}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NITP_BENCH_PROFILE": str(work / "profile.txt") if profile else ""}
    child([sys.executable, str(Path(__file__).with_name("_nitp_child.py")), "recipes/qwen3_moe_small.yaml",
           str(ds_path), *[f"{k}={v}" for k, v in sets.items()]], env, work)
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("kind") == "train"][1:]
    result = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in train),
              "mfu": statistics.median(r.get("mfu", float("nan")) for r in train),
              "memory_gib": max(r.get("memory_gib", 0.0) for r in train), "loss": train[-1]["loss/ntp"],
              "intervals": [round(r["tokens_per_s"]) for r in train]}
    summary = work / "run" / "summary.json"
    if summary.exists():  # start-up: seconds to the first step, and its parts
        phases = json.loads(summary.read_text()).get("phases", {})
        result["startup_s"] = phases.get("startup_s") and round(phases["startup_s"], 1)
        result["startup_parts"] = {k: round(v, 1) for k, v in (phases.get("startup_parts") or {}).items()}
    if profile and (work / "profile.txt").exists():
        result["profile"] = (work / "profile.txt").read_text()
    return result


def run_baseline(args, shape: dict, work: Path, experts: str | None) -> dict:
    out = work / "baseline.json"
    child([sys.executable, str(Path(__file__).with_name("_baseline_child.py")), json.dumps(shape), str(args.steps),
           str(out), *([experts] if experts else [])], {**os.environ, "PYTHONUNBUFFERED": "1"}, work)
    return json.loads(out.read_text())


def machine() -> dict[str, str]:
    """The CPU model and the GPU, recorded with every table."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cpu": f"{cpu} ({os.cpu_count()} cores)", "gpu": gpu}


def run_one(args, shape_name: str, variant: str) -> dict:
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if variant.startswith("baseline"):  # baseline, baseline-eager, baseline-grouped_mm
                experts = variant.split("-", 1)[1] if "-" in variant else None
                result = run_baseline(args, SHAPES[shape_name], Path(tmp), experts)
            else:
                result = run_nitp(args, SHAPES[shape_name], VARIANTS[variant], Path(tmp), variant in args.profile)
        except RuntimeError as exc:
            result = {"error": str(exc)[-1500:]}
    result["wall_s"] = round(time.time() - start, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--shapes", nargs="+", default=["A", "B"])
    parser.add_argument("--variants", nargs="+", default=["baseline", "ntp", "nitp"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="runs of every variant, interleaved")
    parser.add_argument("--deadline", type=float, default=540, help="seconds after which no run starts")
    parser.add_argument("--ds-config", default="ds_configs/zero3_moe.json")
    parser.add_argument("--profile", nargs="*", default=[], help="variants to profile (torch.profiler, 3 steps)")
    parser.add_argument("--out", default=None, help="write results.json (and profiles) here")
    args = parser.parse_args()
    out = Path(args.out) if args.out else None
    started = time.time()
    host = machine()
    print(f"machine: {host['cpu']}; GPU: {host['gpu']}", flush=True)
    runs: dict[str, dict[str, list[dict]]] = {shape: {variant: [] for variant in args.variants} for shape in args.shapes}
    for repeat in range(args.repeats):
        for shape_name in args.shapes:
            for variant in args.variants:
                if time.time() - started > args.deadline:
                    continue
                if runs[shape_name][variant] and "error" in runs[shape_name][variant][0]:
                    continue  # it failed on its first run: the time goes to the variants that run
                result = run_one(args, shape_name, variant)
                runs[shape_name][variant].append(result)
                if out:
                    out.mkdir(parents=True, exist_ok=True)
                    if "profile" in result:
                        (out / f"profile_{shape_name}_{variant}_{repeat}.txt").write_text(result.pop("profile"))
                    (out / "results.json").write_text(json.dumps({"machine": host, "runs": runs}, indent=2))
                print(f"[{shape_name}/{variant} #{repeat + 1}] "
                      f"{json.dumps({k: v for k, v in result.items() if k != 'profile'})}", flush=True)
    print_table(runs, host)


def spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    """median [min to max] of the repeats."""
    if not values:
        return "-"
    text = fmt.format(statistics.median(values))
    return text if len(values) == 1 else f"{text} [{fmt.format(min(values))} to {fmt.format(max(values))}]"


def print_table(runs: dict[str, dict[str, list[dict]]], host: dict[str, str]) -> None:
    print(f"\nmachine: {host['cpu']}; GPU: {host['gpu']}; median [min to max] over the repeats")
    print(f"{'shape':<6}{'variant':<19}{'runs':>5}  {'tokens/s':<26}{'vs baseline (same repeat)':<28}{'MFU':>7}"
          f"{'peak GiB':>10}{'loss':>8}")
    for shape_name, rows in runs.items():
        base = [r.get("tokens_per_s") for r in rows.get("baseline", [])]
        for name, results in rows.items():
            good = [r for r in results if "error" not in r]
            failed = [r for r in results if "error" in r]
            if not good:
                reason = failed[0]["error"][:300] if failed else "not run (deadline)"
                print(f"{shape_name:<6}{name:<19}{len(results):>5}  failed: {reason}")
                continue
            ratios = [r["tokens_per_s"] / b for r, b in zip(results, base) if "error" not in r and b]
            print(f"{shape_name:<6}{name:<19}{len(good):>5}  {spread([r['tokens_per_s'] for r in good]):<26}"
                  f"{spread(ratios, '{:.2f}x') if ratios and name != 'baseline' else '-':<28}"
                  f"{100 * statistics.median(r['mfu'] for r in good):>6.1f}%"
                  f"{max(r['memory_gib'] for r in good):>10.1f}{good[-1]['loss']:>8.3f}")
        for suffix in ("", "-1gpu"):
            ntp, nitp = rows.get("ntp" + suffix, []), rows.get("nitp" + suffix, [])
            pairs = [a["tokens_per_s"] / b["tokens_per_s"] - 1 for a, b in zip(ntp, nitp)
                     if "error" not in a and "error" not in b]
            if pairs:
                print(f"{shape_name:<6}NITP overhead in step time (ntp{suffix} -> nitp{suffix}, same repeat): "
                      f"{spread([100 * x for x in pairs], '{:+.1f}%')}")


if __name__ == "__main__":
    main()
