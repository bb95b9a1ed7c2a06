"""Building stock Hugging Face MoE models, per family, from a recipe or a local directory.

nitp-ds does not fork modeling code: each family is an entry of the table in `families.py` that says how
the recipe's shape fields map onto the family's Hugging Face config, which AutoEP preset serves it, and how
AutoEP's parameter names map back onto the Hugging Face ones (used by `nitp convert`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from nitp_ds.errors import NITPError
from nitp_ds.models.families import FAMILIES, FAMILY_NAMES, Family, family_of  # noqa: F401 - the family table

if TYPE_CHECKING:
    import torch

    from nitp_ds.config import ModelConfig


def build_hf_config(m: ModelConfig, vocab_size: int):
    """The Hugging Face config for a recipe's model section (random init) or its pretrained directory."""
    from transformers import AutoConfig

    if m.pretrained:
        return load_pretrained_config(m.pretrained)
    family = family_of(m.family)
    keys: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
        max_position_embeddings=m.max_seq_len, rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings,
        initializer_range=m.init_std, use_cache=False, output_router_logits=False,
    )
    if m.head_dim is not None:
        keys["head_dim"] = m.head_dim
    keys.update(family.shape_keys(m))
    keys.update(m.extra)
    try:
        config = AutoConfig.for_model(family.name, **keys)
    except (TypeError, ValueError) as exc:
        raise NITPError(f"model.extra or the model shape is not valid for {family.name}: {exc}") from None
    config._attn_implementation = m.attn_implementation
    return config


def load_pretrained_config(path: str):
    from transformers import AutoConfig

    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise NITPError(f"model.pretrained {path} is not a Hugging Face model directory (no config.json); "
                        "point it at a local directory written by save_pretrained or `nitp export`")
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    family_of(config.model_type)
    return config


def hf_config_from_dict(hf_config: dict[str, Any]):
    """A Hugging Face config back from its `to_dict()` (nitp_meta.json's hf_config), family checked; the
    caller checks that it names a model_type."""
    from transformers import AutoConfig

    keys = {k: v for k, v in hf_config.items()
            if k not in ("model_type", "transformers_version", "architectures", "_name_or_path")}
    family_of(hf_config["model_type"])
    return AutoConfig.for_model(hf_config["model_type"], **keys)


def build_model(m: ModelConfig, vocab_size: int, dtype: torch.dtype | None = None):
    """A stock Hugging Face causal LM (float32 unless `dtype`): loaded from `model.pretrained` or randomly
    initialised."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32

    config = build_hf_config(m, vocab_size)
    if m.pretrained:
        model = AutoModelForCausalLM.from_pretrained(m.pretrained, config=config, dtype=dtype, local_files_only=True,
                                                     attn_implementation=m.attn_implementation)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=m.attn_implementation)
    model.config.use_cache = False
    model.config.output_router_logits = False  # router logits are captured with hooks (nitp_ds.losses)
    return model


def model_from_tensors(config, tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None,
                       *, source: str = "the weights", fix: str = "the weights do not match the config"):
    """The stock HF model of `config` (float32 unless `dtype`), its weights copied in one (name, tensor) at a
    time: every parameter and persistent buffer exactly once (tied output embeddings from the input ones),
    or one line naming the first weight of `source` that is missing, unknown or misshapen, and `fix`."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    kind = type(model).__name__
    targets = model.state_dict()
    tied = getattr(config, "tie_word_embeddings", False)
    if tied:
        targets.pop("lm_head.weight", None)
    missing = set(targets)
    with torch.no_grad():
        for name, tensor in tensors:
            if name not in missing:
                raise NITPError(f"weight '{name}' of {source} is {'given twice' if name in targets else 'not in'} "
                                f"the {kind} of its config; {fix}")
            if tuple(tensor.shape) != tuple(targets[name].shape):
                raise NITPError(f"weight '{name}' of {source} has shape {tuple(tensor.shape)}, the {kind} of its "
                                f"config expects {tuple(targets[name].shape)}; {fix}")
            targets[name].copy_(tensor)
            missing.discard(name)
    if missing:
        raise NITPError(f"{source} lacks {len(missing)} weight(s) of the {kind} of its config, e.g. "
                        f"'{sorted(missing)[0]}'; {fix}")
    if tied:
        model.tie_weights()
    return model.eval()


def num_experts(config) -> int:
    return int(getattr(config, family_of(config.model_type).num_experts_key))


def experts_per_token(config) -> int:
    return int(config.num_experts_per_tok)


def compile_decoder_layers(lm, backend: str = "inductor") -> None:
    """`torch.compile` each decoder layer's forward in place (module names and state dicts unchanged).

    Hooks stay outside the compiled code (ZeRO-3's fetch hooks and the NITP target capture are on the
    layer's `__call__`), so the layers are compiled as they run. Layers of one class share their
    compiled code: dynamo treats parameters as inputs, so one compilation serves all of them.

    The compiled layers call torch's own `F.linear`, not DeepSpeed's memory-efficient linear that `zero.Init`
    may have installed: dynamo, tracing that one's backward, guards on each weight's `ds_id` (torch 2.11), so
    every layer was compiled anew. What the memory-efficient linear is for holds in compiled code anyway: the
    compiled backward saves the weight parameter itself, not a view of its gathered data (tested).
    """
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for layer in lm.model.layers:
        compile_forward(layer, backend)


def compile_forward(module, backend: str = "inductor") -> None:
    """`torch.compile` one module's forward in place, with torch's own `F.linear` (see `compile_decoder_layers`)."""
    import torch

    module.forward = with_torch_linear(torch.compile(module.forward, dynamic=False, backend=backend))


def with_torch_linear(fn):
    """`fn`, called with `torch.nn.functional.linear` set to torch's own for the call."""
    import functools

    import torch
    import torch.nn.functional as F

    @functools.wraps(fn)
    def call(*args, **kwargs):
        installed, F.linear = F.linear, torch._C._nn.linear
        try:
            return fn(*args, **kwargs)
        finally:
            F.linear = installed

    return call
