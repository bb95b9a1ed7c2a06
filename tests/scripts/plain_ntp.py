"""The NTP baseline with no NITP machinery: a bare Hugging Face MoE under deepspeed.initialize.

Same seed, data, optimizer, schedule and ds_config as `nitp train`; the loss is transformers'
logits + F.cross_entropy. Prints one JSON list of per-step losses.
"""

import json
import sys

import deepspeed
import torch
import torch.nn.functional as F

from nitp_ds.config import load_config
from nitp_ds.data.dataset import TokenLoader, open_data
from nitp_ds.ds_config import derive_ds_config, load_ds_config
from nitp_ds.models import build_model
from nitp_ds.build import lr_factor, seed_everything
from nitp_ds.distributed import ensure_dist_env

recipe, ds_path, *overrides = sys.argv[1:]
ensure_dist_env()
cfg = load_config(recipe, overrides)
data = open_data(cfg.data.path)
seed_everything(cfg.train.seed)
lm = build_model(cfg.model, data.vocab_size)
ds = derive_ds_config(load_ds_config(ds_path), cfg, world_size=1, num_experts=cfg.model.num_experts,
                      model_type="qwen3_moe")
ds["expert_parallel"]["moe_layer_pattern"] = r"model\.layers\.\d+\.mlp"  # the bare model's own names
decay = [p for p in lm.parameters() if p.ndim >= 2]
no_decay = [p for p in lm.parameters() if p.ndim < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                         {"params": no_decay, "weight_decay": 0.0}], lr=cfg.optim.lr, betas=cfg.optim.betas,
                        eps=cfg.optim.eps, fused=False)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
engine, *_ = deepspeed.initialize(model=lm, optimizer=opt, lr_scheduler=sched, config=ds)
loader = TokenLoader(data, "train", cfg.data.seq_len, cfg.train.micro_batch_size, seed=cfg.train.seed)
losses = []
for _ in range(cfg.train.steps):
    batch = next(loader)
    logits = engine(input_ids=batch["input_ids"]).logits
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))
    engine.backward(loss)
    engine.step()
    losses.append(loss.item())
print("LOSSES " + json.dumps(losses))
