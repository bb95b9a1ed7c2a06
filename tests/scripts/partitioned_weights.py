"""Compare, on every rank, the weights of partitioned builds with those of ordinary (whole) builds.

argv: DS_CONFIG PRETRAINED_DIR... Built for every family (and one with tied embeddings): the Hugging Face
model and the NITP head from a seed, partitioned (the trainer's build) against `from_config` + NITPModel
whole. Then each pretrained directory streamed into a partitioned model against `from_pretrained`. Rank 0
prints one JSON object: for each case, the names of the parameters that differ (bitwise) on any rank.
"""

import json
import sys
from functools import partial

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from nitp_ds.config import ModelConfig
from nitp_ds.models import FAMILIES, build_model, load_pretrained_config, num_experts
from nitp_ds.models.partitioned import build_partitioned_model, construction, gathered, initialize_module
from nitp_ds.nitp import NITPModel, init_head
from nitp_ds.build import seed_everything
from nitp_ds.distributed import ensure_dist_env, exit_process, start_process_group

SHAPE = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4, experts_per_token=2,
             moe_intermediate_size=16, intermediate_size=48, max_seq_len=64)


def ds_config(path: str, model_type: str, experts: int) -> dict:
    from nitp_ds.config import from_dict
    from nitp_ds.ds_config import derive_ds_config, load_ds_config

    cfg = from_dict({"model": {"family": model_type}, "train": {"micro_batch_size": 1}})
    return derive_ds_config(load_ds_config(path), cfg, world_size=dist.get_world_size(), num_experts=experts,
                            model_type=model_type)


def differing(model, reference) -> list[str]:
    expected = dict(reference.named_parameters())
    names = []
    for name, param in model.named_parameters():
        with gathered([param], modifier_rank=None):
            if not torch.equal(param.data, expected[name].data):
                names.append(name)
    return names


ensure_dist_env()
start_process_group()
ds_path, *pretrained_dirs = sys.argv[1:]
results: dict[str, list[str]] = {}
for family, tied in [(family, False) for family in FAMILIES] + [("qwen3_moe", True)]:
    m = ModelConfig(family=family, tie_embeddings=tied, **SHAPE)
    ds = ds_config(ds_path, family, m.num_experts)
    seed_everything(5)
    whole = NITPModel(build_model(m, 100), head="swiglu", target_layer=1)
    seed_everything(5)
    lm = build_partitioned_model(m, 100, ds)
    with construction(ds):
        model = NITPModel(lm, head="swiglu", target_layer=1)
    initialize_module(model.nitp_head, partial(init_head, init_std=m.init_std))
    partitioned = all(hasattr(p, "ds_id") for p in model.parameters())
    results[f"init/{family}{'/tied' if tied else ''}"] = differing(model, whole) + ([] if partitioned else ["<whole>"])
for directory in pretrained_dirs:
    config = load_pretrained_config(directory)
    m = ModelConfig(family=config.model_type, pretrained=directory)
    lm = build_partitioned_model(m, config.vocab_size, ds_config(ds_path, config.model_type, num_experts(config)))
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True)
    results[f"pretrained/{directory}"] = differing(lm, reference)
everyone: list = [None] * dist.get_world_size()
dist.all_gather_object(everyone, results)
if dist.get_rank() == 0:
    merged = {case: sorted({name for rank in everyone for name in rank[case]}) for case in results}
    print("RESULTS " + json.dumps({"world_size": dist.get_world_size(), "cases": merged}), flush=True)
dist.destroy_process_group()
exit_process(0)  # past the group's native threads, which can abort the interpreter's own exit
