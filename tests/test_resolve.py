"""Every derived fact of a run in one place (nitp_ds.resolve): HF config, vocabulary, target layer, ds_config."""

from pathlib import Path

import pytest

from nitp_ds.config import load_config
from nitp_ds.ds_config import load_ds_config
from nitp_ds.errors import NITPError
from nitp_ds.models.families import MOE_LAYER_PATTERN
from nitp_ds.resolve import PLACEHOLDER_VOCAB, default_target_layer, resolve_run, resolve_target_layer

REPO = Path(__file__).resolve().parent.parent
CPU_DS = load_ds_config(REPO / "ds_configs" / "zero3_moe_cpu.json")
RECIPE = REPO / "recipes" / "debug.yaml"


def test_a_recipe_model_resolves_to_its_hf_config_target_layer_and_ds_config():
    cfg = load_config(RECIPE, ["model.vocab_size=500", "train.grad_accum=3"])
    run = resolve_run(cfg, CPU_DS, world_size=2)
    assert run.hf_config.model_type == "qwen3_moe" and run.vocab_size == run.hf_config.vocab_size == 500
    assert run.hf_config.num_hidden_layers == 4 and run.num_experts == 4
    assert run.target_layer == default_target_layer(4) == 1
    ds = run.ds_config
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * 3 * 2
    assert ds["expert_parallel"]["moe_layer_pattern"] == MOE_LAYER_PATTERN
    assert run.autoep_size == ds["expert_parallel"]["autoep_size"]


def test_without_data_or_vocab_size_a_placeholder_vocabulary_is_shown():
    run = resolve_run(load_config(RECIPE), CPU_DS, world_size=1)
    assert run.vocab_size == PLACEHOLDER_VOCAB


def test_target_layer_default_is_a_fifth_of_depth_and_never_the_embeddings():
    assert [default_target_layer(n) for n in (2, 16, 17, 24, 28)] == [1, 3, 3, 5, 6]


def test_target_layer_outside_the_model_is_refused_with_its_range():
    cfg = load_config(None, ["nitp.target_layer=4", "model.num_layers=4"], )
    with pytest.raises(NITPError, match=r"^nitp.target_layer \(4\) must be in \[0, 3\] for a 4-layer model "
                                        r"\(0 = embedding output\)$"):
        resolve_target_layer(cfg, 4)
    cfg.model.pretrained = "some/dir"
    with pytest.raises(NITPError, match=r"^nitp.target_layer \(4\) must be in \[0, 3\] for the 4-layer model in "
                                        r"some/dir$"):
        resolve_target_layer(cfg, 4)
    assert resolve_target_layer(cfg, 5) == 4
