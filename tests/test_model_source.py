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
