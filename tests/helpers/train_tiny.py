"""Train a tiny MoE model a few steps under ZeRO-3 + AutoEP and save a checkpoint like the trainer does.

Run through the launcher: `DS_ACCELERATOR=cpu deepspeed --num_gpus 2 train_tiny.py --family qwen3_moe --run-dir R`.
Besides the DeepSpeed checkpoint (`R/checkpoints/global_stepN` + `latest`) and `nitp_meta.json`, rank 0
writes `R/reference.pt`: the logits of a fixed batch computed by the engine's module in eval mode, the
eval loss on a fixed batch before and after one more training step (that step is not saved), so that
tests can compare exported and resumed models with the live training model.

`--resume-universal DIR` instead loads a universal checkpoint (`load_universal`) and writes the same
quantities to `--result`, without saving.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from nitp_ds.config import ModelConfig
from nitp_ds.engine import build_engine
from nitp_ds.models import build_model, family_of
from nitp_ds.nitp import MOE_LAYER_PATTERN, NITPModel

VOCAB = 128
TARGET_LAYER = 1
HEAD_MULT = 4


def fixed_batch(rows: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, 17), generator=torch.Generator().manual_seed(seed))


def training_batch(step: int, rank: int, rows: int = 2) -> torch.Tensor:
    x = torch.randint(0, 16, (rows, 17), generator=torch.Generator().manual_seed(1000 * step + rank))
    x[:, 1::2] = x[:, 0::2][:, :8] + 1  # learnable: each odd token follows its predecessor
    return x


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="qwen3_moe")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--autoep-size", type=int, default=0, help="0: the world size")
    ap.add_argument("--resume-universal", default=None)
    ap.add_argument("--result", default=None)
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(0)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    m = ModelConfig(family=args.family, pretrained=args.pretrained, hidden_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, num_experts=4, experts_per_token=2, moe_intermediate_size=32,
                    intermediate_size=96, max_seq_len=64)
    lm = build_model(m, vocab_size=VOCAB)
    model = NITPModel(lm, head="swiglu", head_mult=HEAD_MULT, target_layer=TARGET_LAYER, ce_chunk_tokens=50)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    # Micro-batch 2 per rank at world 2 equals micro-batch 4 at world 1: the universal test compares them.
    micro = 4 // world
    ds = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1, "train_batch_size": 4,
          "gradient_clipping": 1.0, "zero_optimization": {"stage": 3}, "bf16": {"enabled": False},
          "expert_parallel": {"enabled": True, "autoep_size": args.autoep_size or world,
                              "preset_model": family_of(args.family).autoep_preset, "moe_layer_pattern": MOE_LAYER_PATTERN}}
    if args.resume_universal:
        ds["checkpoint"] = {"load_universal": True}
    engine = build_engine(model, ds, opt, sched, nitp_weight=1.0, aux_weight=0.01, z_weight=0.001)
    rank = engine.global_rank

    if args.resume_universal:
        univ = Path(args.resume_universal)
        engine.load_checkpoint(str(univ.parent), tag=univ.name, load_optimizer_states=True,
                               load_lr_scheduler_states=True)
    else:
        for step in range(args.steps):
            loss = engine(*_split(training_batch(step, rank, micro)))
            engine.backward(loss)
            engine.step()
        ckpt = Path(args.run_dir) / "checkpoints"
        tag = f"global_step{engine.global_steps}"
        engine.save_checkpoint(str(ckpt), tag=tag, client_state={"consumed_tokens": 0})
        if rank == 0:
            meta = {"hf_config": engine.module.lm.config.to_dict(), "model_type": args.family,
                    "nitp": {"head": "swiglu", "head_mult": HEAD_MULT, "target_layer": TARGET_LAYER},
                    "tokenizer_dir": None, "step": engine.global_steps, "complete": True}
            (ckpt / tag / "nitp_meta.json").write_text(json.dumps(meta, indent=2, default=str))
            (Path(args.run_dir) / "resolved_config.yaml").write_text(f"model:\n  family: {args.family}\n")

    reference = _reference(engine, rank, world, micro)
    if rank == 0:
        out = Path(args.result) if args.result else Path(args.run_dir) / "reference.pt"
        torch.save(reference, out)


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[:, :-1], x[:, 1:]


def _eval_loss(engine, batch: torch.Tensor) -> float:
    engine.eval()
    with torch.no_grad():
        parts = engine.module(*_split(batch))
    engine.train()
    return float(parts["ntp"])


def _reference(engine, rank: int, world: int, micro: int) -> dict:
    """Quantities every run computes identically on every rank (ZeRO-3 and AutoEP need all ranks)."""
    ids = fixed_batch(2, seed=1234)[:, :16]
    engine.eval()
    with torch.no_grad():
        logits = engine.module.lm(ids).logits.float().clone()
    engine.train()
    probe = fixed_batch(4, seed=99)
    loss_before = _eval_loss(engine, probe)
    # One more training step on a fixed global batch of 4 rows, split across the data-parallel ranks.
    engine.aux_weight = engine.z_weight = 0.0  # per-micro-batch terms would differ between world sizes
    full = torch.cat([training_batch(10_000, r, 2) for r in range(2)])
    mine = full[rank * micro:(rank + 1) * micro]
    loss = engine(*_split(mine))
    engine.backward(loss)
    engine.step()
    loss_after = _eval_loss(engine, probe)
    return {"input_ids": ids, "logits": logits, "loss_before": loss_before, "loss_after": loss_after,
            "world": world}


if __name__ == "__main__":
    main()
