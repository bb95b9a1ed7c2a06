"""Measurements: active-parameter FLOPs and MFU, hidden-state geometry, expert load.

Every function here is pure (no global state, no I/O) so the trainer, `nitp eval` and the
benchmarks compute the same numbers. The formulas are written out in `docs/metrics.md`.

FLOPs count **active** parameters: the weights one token is multiplied by on its way through
the model (attention projections, the k routed experts it is sent to, shared experts or dense
MLPs, routers, the LM head, and the NITP head when training with one), plus the attention
scores, which grow with the sequence. Embedding look-ups, norms, biases, activations and
softmaxes are not counted (they are O(d) per token, not O(d²)).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from nitp_ds.errors import NITPError
from nitp_ds.models.families import FAMILY_NAMES as MOE_FAMILIES

# Dense bf16 peak per device used as the MFU denominator. 790 TFLOP/s for H100/H200 is the
# project's default (about 80% of the 989 TFLOP/s datasheet figure of an SXM H100/H200), so
# MFU reads against what the chip sustains on large GEMMs; NITP_PEAK_FLOPS overrides it.
PEAK_BF16_FLOPS = {
    "H200": 790e12,
    "H100": 790e12,
    "H800": 790e12,
    "A100": 312e12,
    "A800": 312e12,
}
PEAK_FLOPS_ENV = "NITP_PEAK_FLOPS"



# ---------------------------------------------------------------------------------------------
# Active parameters, FLOPs per token, MFU
# ---------------------------------------------------------------------------------------------


def head_param_count(kind: str, hidden_size: int, head_mult: int = 4) -> int:
    """Parameters of an NITP head (all of them are active for every token while training).

    swiglu: 3·mult·d² (the paper's head: 12d² at mult 4); mlp: 2·mult·d²; linear: d²; none: 0.
    """
    d = hidden_size
    counts = {"swiglu": 3 * head_mult * d * d, "mlp": 2 * head_mult * d * d, "linear": d * d, "none": 0}
    if kind not in counts:
        raise NITPError(f"NITP head '{kind}' is not one of {', '.join(counts)}")
    return counts[kind]


def _get(config: Any, key: str, default: Any = None) -> Any:
    value = getattr(config, key, default)
    return default if value is None else value


def _attention(config: Any) -> tuple[int, int, int]:
    """(projection parameters per layer, n_heads·qk_head_dim, n_heads·v_head_dim)."""
    d = config.hidden_size
    heads = config.num_attention_heads
    if config.model_type in ("deepseek_v2", "deepseek_v3"):
        # Multi-head latent attention: queries directly (or through a low-rank q_lora), keys and
        # values through a shared kv_lora latent plus a decoupled RoPE key of qk_rope_head_dim.
        qk_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        q_rank = config.q_lora_rank
        q = d * heads * qk_dim if q_rank is None else d * q_rank + q_rank * heads * qk_dim
        kv_a = d * (config.kv_lora_rank + config.qk_rope_head_dim)
        kv_b = config.kv_lora_rank * heads * (config.qk_nope_head_dim + config.v_head_dim)
        o = heads * config.v_head_dim * d
        return q + kv_a + kv_b + o, heads * qk_dim, heads * config.v_head_dim
    head_dim = _get(config, "head_dim", d // heads)
    kv_heads = _get(config, "num_key_value_heads", heads)
    q_and_o = 2 * d * heads * head_dim
    k_and_v = 2 * d * kv_heads * head_dim
    return q_and_o + k_and_v, heads * head_dim, heads * head_dim


def _mlp(config: Any, layer: int) -> dict[str, int]:
    """Active MLP parameters of one decoder layer, split into routed / shared / dense / router."""
    d = config.hidden_size
    family = config.model_type
    k = config.num_experts_per_tok
    swiglu = 3 * d  # gate, up and down projections: 3·d·width parameters
    if family in ("qwen3_moe", "qwen2_moe"):
        sparse = (layer not in _get(config, "mlp_only_layers", [])
                  and config.num_experts > 0 and (layer + 1) % _get(config, "decoder_sparse_step", 1) == 0)
        if not sparse:
            return {"dense_mlp": swiglu * config.intermediate_size}
        parts = {"routed_experts": k * swiglu * config.moe_intermediate_size, "router": d * config.num_experts}
        if family == "qwen2_moe":
            parts["shared_experts"] = swiglu * config.shared_expert_intermediate_size
            parts["router"] += d  # the shared expert's sigmoid gate, d -> 1
        return parts
    if family == "mixtral":
        return {"routed_experts": k * swiglu * config.intermediate_size, "router": d * config.num_local_experts}
    if family in ("deepseek_v2", "deepseek_v3"):
        if layer < _get(config, "first_k_dense_replace", 0):
            return {"dense_mlp": swiglu * config.intermediate_size}
        shared = _get(config, "n_shared_experts", 0)
        return {"routed_experts": k * swiglu * config.moe_intermediate_size,
                "shared_experts": shared * swiglu * config.moe_intermediate_size,
                "router": d * config.n_routed_experts}
    raise NITPError(f"model family '{family}' has no FLOP formula; supported: {', '.join(MOE_FAMILIES)}")


def active_params(hf_config: Any, nitp_head_params: int = 0, nitp_head_mult: int = 0) -> dict[str, int]:
    """Parameters one token is multiplied by, per component, summed over layers, and their total.

    Keys: attention (q/k/v/o projections, or MLA's q, kv_a, kv_b, o), routed_experts (the k
    experts a token is sent to), shared_experts, dense_mlp (dense layers, e.g. DeepSeek's first
    `first_k_dense_replace` layers or Qwen's `mlp_only_layers`), router, lm_head (d·V, counted
    even when tied to the embedding: it is still a matmul), nitp_head, total. Embeddings, norms
    and biases are not counted.

    `nitp_head_params` is the NITP head's parameter count (see `head_param_count()`), or give
    `nitp_head_mult` for the paper's SwiGLU head of width mult·d (3·mult·d² parameters).
    """
    if nitp_head_params and nitp_head_mult:
        raise NITPError("give either nitp_head_params or nitp_head_mult, not both")
    if nitp_head_mult:
        nitp_head_params = head_param_count("swiglu", hf_config.hidden_size, nitp_head_mult)
    if hf_config.model_type not in MOE_FAMILIES:
        raise NITPError(f"model family '{hf_config.model_type}' has no FLOP formula; "
                        f"supported: {', '.join(MOE_FAMILIES)}")
    attention, _, _ = _attention(hf_config)
    counts = {"attention": 0, "routed_experts": 0, "shared_experts": 0, "dense_mlp": 0, "router": 0}
    for layer in range(hf_config.num_hidden_layers):
        counts["attention"] += attention
        for key, value in _mlp(hf_config, layer).items():
            counts[key] += value
    counts["lm_head"] = hf_config.hidden_size * hf_config.vocab_size
    counts["nitp_head"] = int(nitp_head_params)
    counts["total"] = sum(counts.values())
    return counts


def attention_flops_per_token(hf_config: Any, seq_len: int) -> float:
    """Training FLOPs of the attention scores and weighted values per token, causal.

    Per layer and token, QKᵀ costs 2·seq·H·d_qk and AV 2·seq·H·d_v in the forward pass; the
    backward pass doubles it (×3 in all) and the causal mask halves it (a token attends to
    seq/2 positions on average): 3·seq·H·(d_qk + d_v) per layer. With d_qk = d_v = head_dim and
    H·head_dim = d this is 6·d·seq per layer, i.e. 12·L·d·seq/2 for the model.
    """
    _, qk, v = _attention(hf_config)
    return 3.0 * hf_config.num_hidden_layers * seq_len * (qk + v)


def flops_per_token(hf_config: Any, seq_len: int, nitp_head_params: int = 0, nitp_head_mult: int = 0) -> float:
    """Training (forward + backward) FLOPs per token: 6·N_active + 3·L·seq·H·(d_qk + d_v).

    N_active is `active_params(...)["total"]` (2 FLOPs per weight forward, 4 backward); the
    second term is `attention_flops_per_token` (= 6·L·d·seq for standard attention with
    H·head_dim = d). Pass the NITP head's size when training with one.
    """
    active = active_params(hf_config, nitp_head_params=nitp_head_params, nitp_head_mult=nitp_head_mult)
    return 6.0 * active["total"] + attention_flops_per_token(hf_config, seq_len)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float | None) -> float:
    """Model FLOPs utilisation: tokens_per_s · flops_per_token / peak_flops.

    `tokens_per_s` and `peak_flops` must cover the same devices (both per GPU, or both summed
    over the job). Returns NaN when the peak is unknown (CPU, unlisted GPU).
    """
    if not peak_flops or peak_flops <= 0:
        return float("nan")
    return tokens_per_s * flops_per_token / peak_flops


def peak_flops(device: str | torch.device | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of one device, for the MFU denominator; None when unknown.

    NITP_PEAK_FLOPS (e.g. `989e12`) overrides the table for every device. Otherwise the CUDA
    device name is matched against PEAK_BF16_FLOPS (H100/H200/H800: 790e12, A100/A800: 312e12).
    `device` may be a device, a device string, or a GPU name such as "NVIDIA H200"; None means
    the current CUDA device. CPUs return None.
    """
    override = os.environ.get(PEAK_FLOPS_ENV)
    if override:
        try:
            return float(override)
        except ValueError:
            raise NITPError(f"{PEAK_FLOPS_ENV}={override!r} is not a number; set it like 989e12") from None
    name = _device_name(device)
    if name is None:
        return None
    upper = name.upper()
    for key, value in PEAK_BF16_FLOPS.items():
        if key in upper:
            return value
    return None


def _device_name(device: str | torch.device | None) -> str | None:
    if isinstance(device, str) and not device.startswith(("cuda", "cpu", "mps", "xpu")):
        return device  # already a device name
    if device is None:
        if not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_name()
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(device)


# ---------------------------------------------------------------------------------------------
# Hidden-state geometry
# ---------------------------------------------------------------------------------------------


def effective_rank(states: torch.Tensor, spectrum: str = "covariance") -> float:
    """exp(entropy) of the normalised spectrum of mean-centred token states [N, d].

    spectrum="covariance" (default, the NITP paper's definition): λ_i = eigenvalues of the
    covariance of the centred states = σ_i² (squared singular values of the centred matrix, up
    to a constant); p_i = λ_i / Σλ; erank = exp(−Σ p_i log p_i).
    spectrum="singular" (Roy & Vetterli 2007): p_i = σ_i / Σσ instead. It weights small
    directions more, so it is never below the covariance version.

    A rank-1 set (after centring) gives 1; a set spread equally over r orthogonal directions
    gives r. Zero variance (all states equal, or fewer than 2) gives 0.
    """
    if spectrum not in ("covariance", "singular"):
        raise NITPError(f"spectrum '{spectrum}' is not 'covariance' or 'singular'")
    x = _as_matrix(states)
    if x.shape[0] < 2:
        return 0.0
    x = x - x.mean(dim=0, keepdim=True)
    sigma = torch.linalg.svdvals(x)
    weights = sigma ** 2 if spectrum == "covariance" else sigma
    total = weights.sum()
    if total <= 0 or not torch.isfinite(total):
        return 0.0
    p = weights / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def anisotropy(states: torch.Tensor, num_pairs: int | None = None, seed: int = 0) -> float:
    """Mean cosine similarity of distinct pairs of ℓ2-normalised token states [N, d].

    num_pairs=None: exactly, over all N(N−1)/2 distinct pairs, as (‖Σ u_i‖² − Σ‖u_i‖²) / (N(N−1))
    with u_i = x_i/‖x_i‖ (O(N·d), so no sampling is needed). num_pairs=n: the mean over n pairs
    (i, j), i ≠ j, drawn uniformly with a generator seeded by `seed` (the paper's "random pairs").
    Orthogonal states give 0, identical ones 1. All-zero states count as zero vectors.
    """
    x = _as_matrix(states)
    n = x.shape[0]
    if n < 2:
        raise NITPError(f"anisotropy needs at least 2 states, got {n}")
    u = torch.nn.functional.normalize(x, dim=-1, eps=1e-12)
    if num_pairs is None:
        total = u.sum(dim=0)
        norms = (u * u).sum()
        return float((total @ total - norms) / (n * (n - 1)))
    if num_pairs < 1:
        raise NITPError(f"num_pairs must be >= 1, got {num_pairs}")
    generator = torch.Generator().manual_seed(seed)
    i = torch.randint(0, n, (num_pairs,), generator=generator)
    j = (i + torch.randint(1, n, (num_pairs,), generator=generator)) % n  # j != i, uniform over the rest
    return float((u[i] * u[j]).sum(dim=-1).mean())


def _as_matrix(states: torch.Tensor) -> torch.Tensor:
    if not isinstance(states, torch.Tensor):
        states = torch.as_tensor(states)
    if states.dim() != 2:
        states = states.reshape(-1, states.shape[-1])
    return states.detach().to(device="cpu", dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Expert load
# ---------------------------------------------------------------------------------------------


def expert_load_stats(load: torch.Tensor, per_layer: bool = False) -> dict[str, float]:
    """Load-imbalance scalars from tokens-per-expert counts [L, E] (one row per MoE layer).

    Per layer: max_over_mean = max_e c_e / mean_e c_e (1 when perfectly balanced, E when one
    expert takes everything), min_over_mean = min_e c_e / mean_e c_e, dead = #{e : c_e = 0}.
    Returned: moe/max_over_mean (mean over layers), moe/max_over_mean_max (worst layer),
    moe/min_over_mean (mean over layers), moe/dead_experts (sum over layers),
    moe/dead_experts_max (worst layer); with per_layer, also moe/layer{i}/max_over_mean and
    moe/layer{i}/dead_experts. Layers that saw no tokens are left out; no load gives {}.
    """
    load = torch.as_tensor(load).detach().to("cpu", torch.float64)
    if load.dim() == 1:
        load = load.unsqueeze(0)
    if load.numel() == 0:
        return {}
    mean = load.mean(dim=1)
    seen = mean > 0
    if not bool(seen.any()):
        return {}
    layers = torch.nonzero(seen).flatten().tolist()
    max_over_mean = load.max(dim=1).values[seen] / mean[seen]
    min_over_mean = load.min(dim=1).values[seen] / mean[seen]
    dead = (load[seen] == 0).sum(dim=1).double()
    stats = {
        "moe/max_over_mean": float(max_over_mean.mean()),
        "moe/max_over_mean_max": float(max_over_mean.max()),
        "moe/min_over_mean": float(min_over_mean.mean()),
        "moe/dead_experts": float(dead.sum()),
        "moe/dead_experts_max": float(dead.max()),
    }
    if per_layer:
        for index, layer in enumerate(layers):
            stats[f"moe/layer{layer}/max_over_mean"] = float(max_over_mean[index])
            stats[f"moe/layer{layer}/dead_experts"] = float(dead[index])
    return stats


def perplexity(loss: float) -> float:
    """exp(loss), or inf when it overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")
