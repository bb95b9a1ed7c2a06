"""Child of bench/gpu_compare.py: the plain Hugging Face + DeepSpeed ZeRO-3 baseline.

argv: SHAPE_JSON STEPS OUT_JSON. A step is `train.grad_accum` micro-batches (default 1). The stock model class built from the same config as `nitp train`
builds, `deepspeed.initialize` with ZeRO-3 and bf16, fused torch AdamW, loss = CE + 0.001 · router aux
loss (the model's own `output_router_logits`), random tokens. Writes tokens/s, MFU and peak memory.
"""

import json
import os
import statistics
import sys
import time

import deepspeed
import torch


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()

from transformers import AutoModelForCausalLM

from nitp_ds.config import load_config
from nitp_ds.metrics import flops_per_token, peak_flops
from nitp_ds.models import build_hf_config

shape, steps, out = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
cfg = load_config("recipes/qwen3_moe_small.yaml", [f"{k}={v}" for k, v in shape.items()])
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29533")
os.environ.setdefault("RANK", "0")
os.environ.setdefault("LOCAL_RANK", "0")
os.environ.setdefault("WORLD_SIZE", "1")
hf_config = build_hf_config(cfg.model, cfg.model.vocab_size)
hf_config.output_router_logits = True
hf_config.router_aux_loss_coef = 0.001
if len(sys.argv) > 4:  # the experts implementation: eager, grouped_mm, batched_mm (default: transformers')
    hf_config._experts_implementation = sys.argv[4]
torch.manual_seed(0)
# built directly on the device (initialising billions of parameters on the host takes minutes; the steps timed
# below are the same either way)
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)
seq, mbs, accum = cfg.data.seq_len, cfg.train.micro_batch_size, cfg.train.grad_accum
ds_config = {"train_micro_batch_size_per_gpu": mbs, "gradient_accumulation_steps": accum, "gradient_clipping": 1.0,
             "bf16": {"enabled": torch.cuda.is_available()},
             "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True}}
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                              fused=torch.cuda.is_available())
engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
device = engine.device
times = []
for step in range(steps):
    batches = [torch.randint(0, hf_config.vocab_size, (mbs, seq), device=device) for _ in range(accum)]
    sync()
    start = time.perf_counter()
    for ids in batches:
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary
    sync()
    times.append(time.perf_counter() - start)
step_s = statistics.median(times[3:])
tps = mbs * seq * accum / step_s
fpt = flops_per_token(hf_config, seq)
result = {"tokens_per_s": tps, "step_s": step_s, "mfu": tps * fpt / (peak_flops(device) or float("inf")),
          "memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0, "loss": loss.item(),
          "experts_implementation": str(getattr(hf_config, "_experts_implementation", None))}
with open(out, "w") as f:
    json.dump(result, f)
