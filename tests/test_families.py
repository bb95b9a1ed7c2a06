"""The family table (nitp_ds.models.families) against transformers: each entry builds its own class."""

import subprocess
import sys

import pytest
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from nitp_ds.config import FAMILIES as CONFIG_FAMILIES
from nitp_ds.config import ModelConfig
from nitp_ds.errors import NITPError
from nitp_ds.metrics import MOE_FAMILIES
from nitp_ds.models import build_hf_config, num_experts
from nitp_ds.models.families import FAMILIES, FAMILY_NAMES, family_of


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_each_family_builds_its_hugging_face_class_with_the_recipe_experts(name):
    family = family_of(name)
    assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[name] == family.hf_class
    shape = ModelConfig(family=name, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=6,
                        experts_per_token=2, moe_intermediate_size=16, intermediate_size=64)
    config = build_hf_config(shape, vocab_size=100)
    assert config.model_type == name and num_experts(config) == 6
    assert getattr(config, family.num_experts_key) == 6


def test_config_and_metrics_read_the_one_table():
    assert CONFIG_FAMILIES == MOE_FAMILIES == FAMILY_NAMES == tuple(FAMILIES)
    with pytest.raises(NITPError, match="model family 'llama' is not supported; supported: qwen3_moe, "):
        family_of("llama")


def test_the_table_and_the_config_import_without_torch():
    code = "import sys, nitp_ds.config, nitp_ds.models.families; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
