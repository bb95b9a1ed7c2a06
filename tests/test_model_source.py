"""Reading a checkpoint's NITP settings: what `nitp eval` scores the head with must be what training used."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from nitp_ds.errors import NITPError
from nitp_ds.model_source import nitp_settings

CONFIG = SimpleNamespace(num_hidden_layers=10)


def test_ablation_settings_reach_the_evaluation():
    meta = {"nitp": {"head": "swiglu", "head_mult": 2, "target_layer": 3, "loss": "mse", "offset": 0}}
    assert nitp_settings(meta, Path("ckpt"), CONFIG) == {"head": "swiglu", "head_mult": 2, "target_layer": 3,
                                                         "loss": "mse", "offset": 0}


def test_checkpoints_from_before_the_ablation_options_score_cosine_next_token():
    settings = nitp_settings({"nitp": {"head": "swiglu", "target_layer": None}}, Path("ckpt"), CONFIG)
    assert settings == {"head": "swiglu", "head_mult": 4, "target_layer": 2, "loss": "cosine", "offset": 1}


def test_no_nitp_block_means_no_head():
    assert nitp_settings({}, Path("ckpt"), CONFIG) is None


def test_a_malformed_nitp_block_is_refused_with_the_fix():
    with pytest.raises(NITPError, match="re-run `nitp convert`"):
        nitp_settings({"nitp": "swiglu"}, Path("ckpt"), CONFIG)


def small_lm(tied: bool):
    import torch

    from nitp_ds.config import ModelConfig
    from nitp_ds.models import build_model

    torch.manual_seed(0)
    m = ModelConfig(family="qwen3_moe", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4,
                    experts_per_token=2, moe_intermediate_size=16, intermediate_size=64, max_seq_len=64,
                    tie_embeddings=tied)
    return build_model(m, vocab_size=50)


@pytest.mark.parametrize("tied", [False, True])
def test_converted_weights_load_tensor_by_tensor_into_the_stock_model(tmp_path, tied):
    """A directory of safetensors files under other names than transformers' (what `nitp convert` writes)."""
    import torch
    from safetensors.torch import save_file

    from nitp_ds.model_source import load_language_model

    lm = small_lm(tied)
    state = {k: v.contiguous() for k, v in lm.state_dict().items() if not (tied and k == "lm_head.weight")}
    names = sorted(state)
    save_file({k: state[k] for k in names[::2]}, str(tmp_path / "part-00001.safetensors"))
    save_file({k: state[k] for k in names[1::2]}, str(tmp_path / "part-00002.safetensors"))
    loaded = load_language_model(tmp_path, lm.config, torch.float32)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in lm.state_dict().items())
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    tokens = torch.randint(0, 50, (2, 9))
    assert torch.equal(loaded(tokens).logits, lm.eval()(tokens).logits)

    (tmp_path / "part-00002.safetensors").unlink()  # half the weights gone: one line, the first one named
    with pytest.raises(NITPError, match=rf"^{tmp_path} lacks {len(names[1::2])} weight\(s\) of the "
                                        rf"Qwen3MoeForCausalLM of its config, e.g. '{names[1]}'; re-run `nitp convert`"):
        load_language_model(tmp_path, lm.config, torch.float32)
    save_file({"extra.weight": torch.zeros(2)}, str(tmp_path / "part-00002.safetensors"))
    with pytest.raises(NITPError, match="weight 'extra.weight' of .* is not in the Qwen3MoeForCausalLM"):
        load_language_model(tmp_path, lm.config, torch.float32)
