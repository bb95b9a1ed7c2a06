"""What nitp-ds knows about each model family, in one table: one `Family` entry per Hugging Face MoE class.

An entry says which Hugging Face class and `model_type` it is, how the recipe's shape fields map onto the
family's config keys, which AutoEP preset serves it, which config key counts the routed experts, which module
is the router, and how AutoEP's parameter names map back onto the Hugging Face ones (read by `nitp convert`).
The config, the ds_config, the FLOP counter, the model builder and NITPModel's router hooks all read this
table. It imports neither torch nor transformers: `nitp_ds.config` reads the family names from here at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from nitp_ds.errors import NITPError

if TYPE_CHECKING:
    from nitp_ds.config import ModelConfig

# AutoEP's `moe_layer_pattern`: the MoE blocks it replaces, as named inside NITPModel (`lm` is the HF model).
# Every supported family keeps its MoE block at `model.layers.N.mlp`.
MOE_LAYER_PATTERN = r"lm\.model\.layers\.\d+\.mlp"

# (AutoEP suffix, Hugging Face suffix) of single tensors, in every family; the fused expert pair
# (AutoEP's w1/w3 ↔ Hugging Face's gate_up_proj) is handled apart by `nitp convert`. The routers are the
# modules these names live in: AutoEP's `mlp.router.gate` (a linear) and Hugging Face's `mlp.gate`.
# The module whose output is the router logits, under a decoder layer whose MoE block AutoEP has replaced
# (a linear); a Hugging Face block's router is the family's `router_module` (its output's first part).
AUTOEP_ROUTER = "mlp.router.gate"

AUTOEP_RENAMES: list[tuple[str, str]] = [
    (".mlp.router.gate.weight", ".mlp.gate.weight"),
    (".mlp.router.e_score_correction_bias", ".mlp.gate.e_score_correction_bias"),
    (".mlp.experts.w2", ".mlp.experts.down_proj"),
]


@dataclass(frozen=True)
class Family:
    name: str  # also the Hugging Face model_type
    hf_class: str  # the transformers causal-LM class that AutoModelForCausalLM builds for it
    autoep_preset: str
    shape_keys: Callable[[ModelConfig], dict[str, Any]]  # recipe shape -> family-specific HF config keys
    num_experts_key: str  # the HF config key holding the number of routed experts
    autoep_renames: list[tuple[str, str]] = field(default_factory=list)  # family-only, on top of AUTOEP_RENAMES
    router_module: str = "mlp.gate"  # the Hugging Face MoE block's router, under a decoder layer


def _qwen3_moe(m: ModelConfig) -> dict[str, Any]:
    return dict(num_experts=m.num_experts, num_experts_per_tok=m.experts_per_token,
                moe_intermediate_size=m.moe_intermediate_size, norm_topk_prob=True)


def _qwen2_moe(m: ModelConfig) -> dict[str, Any]:
    return dict(num_experts=m.num_experts, num_experts_per_tok=m.experts_per_token,
                moe_intermediate_size=m.moe_intermediate_size, shared_expert_intermediate_size=m.intermediate_size,
                norm_topk_prob=True)


def _mixtral(m: ModelConfig) -> dict[str, Any]:
    # Mixtral's experts use intermediate_size; the recipe's moe_intermediate_size is the expert width.
    return dict(num_local_experts=m.num_experts, num_experts_per_tok=m.experts_per_token,
                intermediate_size=m.moe_intermediate_size)


def _deepseek(m: ModelConfig) -> dict[str, Any]:
    head_dim = m.head_dim or m.hidden_size // m.num_heads
    return dict(n_routed_experts=m.num_experts, num_experts_per_tok=m.experts_per_token,
                moe_intermediate_size=m.moe_intermediate_size, n_shared_experts=1, first_k_dense_replace=1,
                q_lora_rank=None, kv_lora_rank=max(16, head_dim), qk_rope_head_dim=max(8, head_dim // 2),
                qk_nope_head_dim=max(8, head_dim // 2), v_head_dim=head_dim, n_group=1, topk_group=1,
                num_key_value_heads=m.num_heads)


# AutoEP names every shared expert `shared_experts`; Qwen2-MoE's Hugging Face class says `shared_expert`.
_QWEN2_SHARED = [(".mlp.shared_experts_gate.", ".mlp.shared_expert_gate."),
                 (".mlp.shared_experts.", ".mlp.shared_expert.")]

FAMILIES: dict[str, Family] = {
    "qwen3_moe": Family("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3_moe", _qwen3_moe, "num_experts"),
    "qwen2_moe": Family("qwen2_moe", "Qwen2MoeForCausalLM", "qwen3_moe", _qwen2_moe, "num_experts", _QWEN2_SHARED),
    "mixtral": Family("mixtral", "MixtralForCausalLM", "mixtral", _mixtral, "num_local_experts"),
    "deepseek_v2": Family("deepseek_v2", "DeepseekV2ForCausalLM", "deepseek_v2", _deepseek, "n_routed_experts"),
    "deepseek_v3": Family("deepseek_v3", "DeepseekV3ForCausalLM", "deepseek_v3", _deepseek, "n_routed_experts"),
}
FAMILY_NAMES: tuple[str, ...] = tuple(FAMILIES)


def family_of(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise NITPError(f"model family '{model_type}' is not supported; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]
