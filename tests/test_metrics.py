"""Metrics against hand-computed cases: active parameters per family, MFU, geometry, expert load."""

from __future__ import annotations

import math

import pytest
import torch

from nitp_ds.config import ModelConfig
from nitp_ds.errors import NITPError
from nitp_ds.metrics import (active_params, anisotropy, attention_flops_per_token, effective_rank,
                             expert_load_stats, flops_per_token, head_param_count, mfu, peak_flops)
from nitp_ds.models import build_model

FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v2", "deepseek_v3"]


def tiny_model(family: str, **extra):
    m = ModelConfig(family=family, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, num_experts=6,
                    experts_per_token=2, moe_intermediate_size=32, intermediate_size=96, extra=extra)
    return build_model(m, vocab_size=101)


def hand_count(model) -> int:
    """Weight-matrix entries on one token's path, read off the instantiated modules.

    Attention: every ≥2-D parameter of self_attn. MLP: a dense layer's matrices in full; a MoE
    layer's router, shared experts in full, and k/E of the stacked expert weights.
    """
    k = model.config.num_experts_per_tok
    total = model.lm_head.weight.numel()
    for layer in model.model.layers:
        total += sum(p.numel() for p in layer.self_attn.parameters() if p.dim() >= 2)
        mlp = layer.mlp
        if not hasattr(mlp, "experts"):
            total += sum(p.numel() for p in mlp.parameters() if p.dim() >= 2)
            continue
        for name, p in mlp.named_parameters():
            if p.dim() < 2:
                continue
            if name.startswith("experts."):
                total += p.numel() // p.shape[0] * k  # stacked [E, ...]: k of the E experts
            else:
                total += p.numel()  # router, shared expert(s), shared-expert gate
    return total


@pytest.mark.parametrize("family", FAMILIES)
def test_active_params_match_a_hand_count_of_the_instantiated_model(family):
    model = tiny_model(family)
    counts = active_params(model.config)
    assert counts["total"] == hand_count(model)
    assert counts["total"] == sum(v for key, v in counts.items() if key != "total")


def test_deepseek_first_dense_layer_and_shared_expert_are_counted():
    config = tiny_model("deepseek_v3").config
    d = 64
    counts = active_params(config)
    assert counts["dense_mlp"] == 3 * d * 96  # first_k_dense_replace = 1 dense layer
    assert counts["shared_experts"] == 2 * 3 * d * 32  # one shared expert in each of the 2 MoE layers
    assert counts["routed_experts"] == 2 * 2 * 3 * d * 32


def test_deepseek_q_lora_attention_is_counted():
    model = tiny_model("deepseek_v2", q_lora_rank=24)
    assert active_params(model.config)["total"] == hand_count(model)


def test_qwen3_mlp_only_layers_are_dense():
    model = tiny_model("qwen3_moe", mlp_only_layers=[0])
    counts = active_params(model.config)
    assert counts["dense_mlp"] == 3 * 64 * 96
    assert counts["total"] == hand_count(model)


def test_flops_per_token_is_6n_plus_causal_attention():
    config = tiny_model("qwen3_moe").config  # head_dim 16, 4 heads: H·head_dim = d = 64
    seq, layers, d = 128, 3, 64
    head = head_param_count("swiglu", d, 4)
    assert head == 12 * d * d
    n = active_params(config)["total"] + head
    assert attention_flops_per_token(config, seq) == 12 * layers * d * seq / 2
    assert flops_per_token(config, seq, nitp_head_params=head) == 6 * n + 6 * layers * d * seq
    assert flops_per_token(config, seq, nitp_head_mult=4) == flops_per_token(config, seq, nitp_head_params=head)


def test_mla_attention_flops_use_qk_and_v_head_dims():
    config = tiny_model("deepseek_v2").config
    qk = config.qk_nope_head_dim + config.qk_rope_head_dim
    expected = 3 * config.num_hidden_layers * 64 * config.num_attention_heads * (qk + config.v_head_dim)
    assert attention_flops_per_token(config, 64) == expected


def test_mfu_and_peak_flops(monkeypatch):
    assert mfu(1000.0, 1e9, 1e13) == pytest.approx(0.1)
    assert math.isnan(mfu(1000.0, 1e9, None))
    monkeypatch.delenv("NITP_PEAK_FLOPS", raising=False)
    assert peak_flops("NVIDIA H200") == 790e12
    assert peak_flops("NVIDIA H100 80GB HBM3") == 790e12
    assert peak_flops("cpu") is None
    monkeypatch.setenv("NITP_PEAK_FLOPS", "989e12")
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    monkeypatch.setenv("NITP_PEAK_FLOPS", "fast")
    with pytest.raises(NITPError, match="NITP_PEAK_FLOPS"):
        peak_flops("NVIDIA H100")


def test_effective_rank_of_a_rank_one_set_is_one():
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(32, generator=gen)
    states = torch.randn(200, 1, generator=gen) * direction + 3.0  # offset removed by centring
    assert effective_rank(states) == pytest.approx(1.0, abs=1e-6)


def test_effective_rank_of_d_balanced_orthogonal_directions_is_d():
    d = 16
    eye = torch.eye(d)
    assert effective_rank(torch.cat([eye, -eye])) == pytest.approx(d, rel=1e-9)
    # d orthonormal vectors alone span only d-1 directions once their mean is removed.
    assert effective_rank(eye) == pytest.approx(d - 1, rel=1e-9)


def test_effective_rank_singular_spectrum_is_at_least_the_covariance_one():
    x = torch.randn(300, 20, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 3.0, 20)
    cov, sing = effective_rank(x), effective_rank(x, spectrum="singular")
    assert 1.0 < cov < sing <= 20.0
    assert effective_rank(torch.ones(5, 4)) == 0.0
    with pytest.raises(NITPError, match="spectrum"):
        effective_rank(x, spectrum="eigen")


def test_anisotropy_of_orthogonal_identical_and_opposite_states():
    assert anisotropy(torch.eye(8) * 5.0) == pytest.approx(0.0, abs=1e-12)
    assert anisotropy(torch.ones(10, 4)) == pytest.approx(1.0)
    assert anisotropy(torch.tensor([[1.0, 0.0], [-2.0, 0.0]])) == pytest.approx(-1.0)
    with pytest.raises(NITPError, match="at least 2"):
        anisotropy(torch.ones(1, 4))


def test_anisotropy_sampled_pairs_estimate_the_exact_mean():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(400, 16, generator=gen) + 1.0
    u = torch.nn.functional.normalize(x.double(), dim=-1)
    cos = u @ u.t()
    brute = float((cos.sum() - cos.diagonal().sum()) / (400 * 399))
    assert anisotropy(x) == pytest.approx(brute, abs=1e-12)
    assert anisotropy(x, num_pairs=20000, seed=0) == pytest.approx(brute, abs=0.01)
    assert anisotropy(x, num_pairs=100, seed=3) == anisotropy(x, num_pairs=100, seed=3)


def test_expert_load_stats_per_layer_and_summaries():
    load = torch.tensor([[4.0, 4.0, 4.0, 4.0],  # balanced
                         [12.0, 4.0, 0.0, 0.0],  # max/mean = 12/4 = 3, two dead
                         [0.0, 0.0, 0.0, 0.0]])  # saw no tokens: left out
    stats = expert_load_stats(load, per_layer=True)
    assert stats["moe/max_over_mean"] == pytest.approx(2.0)
    assert stats["moe/max_over_mean_max"] == pytest.approx(3.0)
    assert stats["moe/min_over_mean"] == pytest.approx(0.5)
    assert stats["moe/dead_experts"] == 2.0
    assert stats["moe/dead_experts_max"] == 2.0
    assert stats["moe/layer1/max_over_mean"] == pytest.approx(3.0)
    assert "moe/layer2/max_over_mean" not in stats
    assert expert_load_stats(torch.zeros(0, 0)) == {}
