"""The memory plan (nitp_ds/memory.py): its arithmetic against numbers computed by hand, its activation counts
against the tensors PyTorch really saves for backward in stock Hugging Face layers, its parameter counts against
real models, and the one-line refusal of a plan that cannot fit. Whole runs against the plan: bench/memory.py
and docs/benchmarks.md."""

from __future__ import annotations

import pytest
import torch

from nitp_ds.errors import NITPError
from nitp_ds.memory import (GIB, LayerShape, ModelShape, Settings, activation_bytes, check_fits,
                            layer_activation_elements, model_shape, plan_memory, settings_from)

# Two MoE layers of 1,000 parameters (800 in 4 routed experts), embeddings of 800 each, a final norm of 8.
LAYER = LayerShape(params=1000, expert_params=800, q_dim=8, kv_dim=4, q_heads=2, qk_norm=False, experts=4,
                   top_k=2, expert_ffn=16)
SHAPE = ModelShape(hidden=8, head_dim=4, vocab=100, layers=(LAYER, LAYER), embedding=800, lm_head=800,
                   other_params=8, param_numels=(800, 800, 8, 200, 800, 200, 800))
BF16_4_RANKS = Settings(world_size=4, ranks_per_node=4, micro_batch=2, seq_len=8, compute_bytes=2, grad_bytes=2,
                        autoep_size=2, persistence_threshold=100, on_gpu=True)


def test_plan_of_bf16_zero3_on_4_ranks_matches_hand_computed_bytes():
    plan = plan_memory(SHAPE, BF16_4_RANKS)
    # 3,608 parameters over 4 ranks: 902 each; only the final norm (8) is under the persistence threshold.
    assert SHAPE.total == 3608 and SHAPE.experts == 1600
    assert plan.params == 2 * (902 + 8)
    assert plan.grads == 2 * 902
    assert plan.optimizer == (8 + 4 + 4) * 902  # moments, fp32 master, one sub-group's fp32 gradients
    # Per token and layer: 6h + 2q + 2kv + 2·heads = 76, experts E + k(2h + 4I + 9) = 4 + 178; fp32 norms and router
    # 2h + 4E = 32 elements at 2 extra bytes. Outside the layers: 2(2h + head_dim) + 2h = 56 bytes.
    # Loss: dL/dh 16·8·2, dL/dW 100·8·2, one chunk of logits 16·100·12.
    tokens, per_layer = 16, 2 * (76 + 4 + 178) + 2 * 32
    assert per_layer == 580
    loss = 16 * 8 * 2 + 100 * 8 * 2 + 16 * 100 * 12
    assert plan.activations == tokens * (2 * per_layer + 56) + loss
    assert plan.activations_other == tokens * (2 * 2 * 8 + per_layer + 56) + loss  # checkpointing: inputs + 1 layer
    # Gathered: the largest unit (an embedding, 800 > 200 + 800/2) twice and the LM head; a layer's gradients
    # (200 + 400); the gradient bucket (every parameter, under reduce_bucket_size).
    assert plan.working == 2 * (800 + 800 + 800) + 2 * 600 + 2 * 3608
    assert plan.device == plan.params + plan.grads + plan.optimizer + plan.activations + plan.working
    assert plan.build == 4 * 3608  # every rank builds the whole model in fp32 today


def test_offload_moves_parameters_and_optimizer_to_the_host():
    from dataclasses import replace

    plan = plan_memory(SHAPE, replace(BF16_4_RANKS, offload_optimizer="cpu", offload_param="cpu"))
    assert plan.optimizer == (8 + 4 + 4) * 902  # moments, master copy, the fp32 gradient the CPU step reads
    assert plan.device == plan.activations + plan.working
    assert plan.host == plan.host_baseline + plan.build + plan.params + plan.grads + plan.optimizer
    assert plan.build_peak == plan.host
    assert plan.host_per_node == 4 * plan.host


def test_fp32_on_one_rank_keeps_every_parameter_whole_and_updates_it_in_place():
    plan = plan_memory(SHAPE, Settings(persistence_threshold=10**12, reduce_bucket=1000))
    assert plan.params == 4 * 3608  # the partition is the whole model: no second, resident copy
    assert plan.optimizer == 8 * 3608  # no master copy in fp32
    assert plan.working == 4 * 1000 + 4 * 1000  # nothing to gather; a layer's gradients (ep 1) and the bucket
    assert plan.device == 0 and plan.host == plan.host_baseline + plan.build + plan.on("host")
    assert plan.build_peak == plan.host_baseline + 4 * 3608 + plan.params + plan.grads + plan.optimizer


def test_expert_parallelism_divides_the_gathered_experts():
    from dataclasses import replace

    one = plan_memory(SHAPE, replace(BF16_4_RANKS, autoep_size=1)).working
    four = plan_memory(SHAPE, replace(BF16_4_RANKS, autoep_size=4)).working
    # ep 1: a layer is the largest unit (200 + 800, gathered twice, and its gradients); ep 4: 200 + 200, so the
    # embedding (800) is the largest gathered unit and a layer's gradients are 400.
    assert one - four == 2 * (2 * 1000 - 2 * 800) + 2 * (1000 - 400)


def _tiny(family: str, layers: int, head_dim: int = 32):
    from transformers import AutoConfig

    keys = dict(vocab_size=300, hidden_size=128, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, head_dim=head_dim, use_cache=False, num_experts_per_tok=2)
    if family == "mixtral":
        keys.update(num_local_experts=8, intermediate_size=96)
    else:
        keys.update(num_experts=8, moe_intermediate_size=96, intermediate_size=256)
    if family == "qwen2_moe":
        keys.update(shared_expert_intermediate_size=192)
    config = AutoConfig.for_model(family, **keys)
    config._attn_implementation = "sdpa"
    return config


def _saved_bytes_per_token(config, dtype, tokens=128) -> float:
    """Bytes of the activations autograd saves in one forward of the decoder (parameters excluded)."""
    from torch.autograd.graph import saved_tensors_hooks
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=torch.randint(0, 300, (2, tokens // 2)))
    return sum(saved.values()) / tokens


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layer_activations_match_what_autograd_saves(family, dtype):
    """One decoder layer's saved bytes per token (a 2-layer model minus a 1-layer one) against the formula."""
    c = 2 if dtype == torch.bfloat16 else 4
    for head_dim in (32, 64):
        one, two = (_saved_bytes_per_token(_tiny(family, n, head_dim), dtype) for n in (1, 2))
        layer = model_shape(_tiny(family, 1, head_dim), head="none").layers[0]
        elements, fp32 = layer_activation_elements(layer, 128)
        assert two - one == pytest.approx(c * elements + (4 - c) * fp32, rel=0.03), (family, head_dim)


def test_model_shape_counts_the_parameters_of_the_real_model():
    from transformers import AutoModelForCausalLM

    config = _tiny("qwen2_moe", 2)
    real = AutoModelForCausalLM.from_config(config)
    shape = model_shape(config, head="swiglu", head_mult=4)
    assert shape.total == sum(p.numel() for p in real.parameters()) + 12 * 128 * 128
    assert shape.experts == sum(p.numel() for n, p in real.named_parameters() if ".experts." in n)
    assert sum(shape.param_numels) == shape.total
    assert [l.experts for l in shape.layers] == [8, 8] and shape.layers[0].dense_ffn == 192
    assert shape.layers[0].q_dim == 128 and shape.layers[0].kv_dim == 64


def test_activation_checkpointing_keeps_only_layer_inputs_and_one_layer():
    from dataclasses import replace

    shape = model_shape(_tiny("qwen3_moe", 8), head="swiglu")
    s = Settings(micro_batch=4, seq_len=512)
    off, on = activation_bytes(shape, s, checkpointing=False), activation_bytes(shape, s, checkpointing=True)
    per_layer = 4 * layer_activation_elements(shape.layers[0], 128)[0]  # fp32: no extra fp32 copies
    assert off - on == 2048 * (8 * per_layer - 8 * 4 * 128 - per_layer)
    assert plan_memory(shape, replace(s, activation_checkpointing=True)).activations == on


def test_settings_come_from_the_derived_ds_config():
    from nitp_ds.config import load_config

    cfg = load_config(None, ["train.micro_batch_size=3", "data.seq_len=128", "train.activation_checkpointing=true"])
    ds = {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"},
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 10**12,
                                "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "none"}},
          "expert_parallel": {"enabled": True, "autoep_size": 2}}
    s = settings_from(cfg, ds, world_size=8, ranks_per_node=4, on_gpu=True)
    assert (s.compute_bytes, s.grad_bytes, s.autoep_size, s.persistence_threshold) == (2, 4, 2, 10**12)
    assert (s.offload_optimizer, s.offload_param, s.micro_batch, s.seq_len) == ("cpu", None, 3, 128)
    assert s.activation_checkpointing and s.ranks_per_node == 4 and s.reduce_bucket == 500_000_000


def test_a_plan_over_the_gpu_is_refused_in_one_line_with_the_numbers_and_the_fixes():
    plan = plan_memory(SHAPE, BF16_4_RANKS)
    check_fits(plan, device_bytes=plan.device, host_bytes=None)  # exactly fits
    with pytest.raises(NITPError) as refused:
        check_fits(plan, device_bytes=plan.device - 1, host_bytes=None)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("the memory plan needs ")
    assert "per GPU (params" in message and "but GPU 0 has" in message
    for fix in ("more GPUs", "ds_configs/zero3_moe_offload.json", "a smaller train.micro_batch_size",
                "train.activation_checkpointing=true"):
        assert fix in message
    # Past what offload or the activations could free, only more GPUs remain.
    with pytest.raises(NITPError) as refused:
        check_fits(plan, device_bytes=plan.device - plan.activations - 1, host_bytes=None)
    assert "GiB; use more GPUs (the plan is an estimate: train.memory_check=false skips this check)" in \
        str(refused.value)


def test_a_plan_over_the_host_memory_counts_every_rank_of_the_node():
    from dataclasses import replace

    plan = plan_memory(SHAPE, replace(BF16_4_RANKS, on_gpu=False))
    check_fits(plan, device_bytes=None, host_bytes=4 * plan.host)
    with pytest.raises(NITPError, match=r"of host memory per node \(4 rank\(s\) × .* but this node has"):
        check_fits(plan, device_bytes=None, host_bytes=4 * plan.host - 1)
    assert plan.host > GIB / 2  # the process's own baseline counts
