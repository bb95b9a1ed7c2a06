"""Recipe loading, overrides and validation: every bad config names the problem and the fix."""

from pathlib import Path

import pytest

from nitp_ds.config import Config, apply_override, dump_yaml, from_dict, load_config, read_yaml, validate
from nitp_ds.errors import NITPError
from nitp_ds.resolve import resolve_target_layer

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_bundled_recipe_loads_and_validates(recipe):
    cfg = validate(load_config(recipe))
    assert cfg.model.num_layers >= 1


def test_overrides_are_coerced_to_the_field_type():
    cfg = load_config(RECIPES / "debug.yaml", ["train.steps=7", "optim.lr=1e-4", "nitp.target_layer=2",
                                               "optim.betas=[0.8, 0.9]", "logging.tensorboard=false",
                                               "model.extra={rope_scaling: null}", "data.path=some/dir"])
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.nitp.target_layer == 2
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.logging.tensorboard is False
    assert cfg.model.extra == {"rope_scaling": None}
    assert cfg.data.path == "some/dir"


def test_optional_override_accepts_none():
    cfg = load_config(None, ["nitp.target_layer=3", "nitp.target_layer=none"])
    assert cfg.nitp.target_layer is None


def test_yaml_round_trip_is_lossless():
    cfg = load_config(RECIPES / "qwen3_moe_small.yaml", ["train.steps=11"])
    import yaml

    again = from_dict(yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg


def test_default_target_layer_is_a_fifth_of_depth():
    for layers, k in ((24, 5), (16, 3), (2, 1)):
        cfg = load_config(None, [f"model.num_layers={layers}"])
        assert resolve_target_layer(cfg, cfg.model.num_layers) == k


BAD = [
    (["train.stepz=3"], "did you mean 'train.steps'"),
    (["modle.hidden_size=3"], "did you mean 'model'"),
    (["train.steps=many"], "train.steps must be an integer"),
    (["optim.lr=-1"], "optim.lr must be > 0"),
    (["model.family=llama"], "model.family 'llama' is not supported"),
    (["nitp.head=transformer"], "nitp.head 'transformer' is not one of"),
    (["nitp.target_layer=9"], "nitp.target_layer (9) must be in [0, 3]"),
    (["nitp.head=none"], "set nitp.weight=0 for plain next-token prediction"),
    (["model.experts_per_token=9"], "model.experts_per_token (9) must be between 1 and model.num_experts (4)"),
    (["model.num_heads=3"], "must be divisible by model.num_heads (3)"),
    (["model.num_kv_heads=3"], "must be a multiple of model.num_kv_heads (3)"),
    (["data.seq_len=1024"], "data.seq_len (1024) exceeds model.max_seq_len (256)"),
    (["schedule.kind=linear"], "schedule.kind 'linear' is not one of"),
    (["optim.betas=[0.9]"], "optim.betas must have 2 items"),
    (["logging.tensorboard=maybe"], "logging.tensorboard must be true or false"),
    (["train.micro_batch_size=0"], "train.micro_batch_size must be >= 1"),
    (["train.zero3_fetch=block"], "train.zero3_fetch must be 'layer' or 'module'"),
    (["train.compile_loss=sometimes"], "train.compile_loss must be true or false"),
    (["train.fast_zero_step=maybe"], "train.fast_zero_step must be true or false"),
    (["train.gc_every=-1"], "train.gc_every must be >= 0"),
    (["train.eval_tokens=63"], "train.eval_tokens (63) must be at least one sequence of data.seq_len = 64 tokens"),
    (["moe.aux_loss_scope=world"], "moe.aux_loss_scope 'world' is not one of"),
    (["nitp.loss=kl"], "nitp.loss 'kl' is not one of cosine, mse"),
    (["nitp.offset=2"], "nitp.offset must be 1 (next token's target) or 0 (same position), got 2"),
    (["nitp.stop_grad=sometimes"], "nitp.stop_grad must be true or false"),
    (["nitp.weight_warmup_steps=-5"], "nitp.weight_warmup_steps must be >= 0"),
    (["train=3"], "names a whole section"),
    (["train.steps"], "must look like section.key=value"),
    (["train.steps.x=1"], "is a value, not a section"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[0][0] for b in BAD])
def test_bad_config_is_refused_with_a_message_naming_the_fix(overrides, message):
    with pytest.raises(NITPError) as err:
        validate(load_config(RECIPES / "debug.yaml", overrides))
    assert message in str(err.value)


def test_unknown_key_in_recipe_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  hiden_size: 8\n")
    with pytest.raises(NITPError, match="unknown key 'model.hiden_size'; did you mean 'model.hidden_size'"):
        load_config(path)


def test_a_replaced_key_names_its_replacement_and_old_run_configs_still_load(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  eval_batches: 20\n")
    with pytest.raises(NITPError, match="'train.eval_batches' was replaced by train.eval_tokens, a cap on scored"):
        load_config(path)
    # A run directory's resolved_config.yaml written before the change: read back with the key ignored.
    assert from_dict(read_yaml(path), drop_replaced=True).train.eval_tokens == 1_000_000


def test_recipe_that_is_not_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(NITPError, match="is not valid YAML at line"):
        read_yaml(path)


def test_missing_recipe(tmp_path):
    with pytest.raises(NITPError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_defaults_validate():
    validate(Config())


def test_wandb_settings_are_typed_and_checked(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("logging:\n  wandb: {project: my-project, name: run-1, mode: offline}\ntrain:\n  out_dir: x\n")
    cfg = validate(load_config(recipe, ["logging.wandb.name=run-2"]))
    assert (cfg.logging.wandb.project, cfg.logging.wandb.name, cfg.logging.wandb.mode) == ("my-project", "run-2",
                                                                                           "offline")
    assert from_dict(read_yaml_text(dump_yaml(cfg))).logging.wandb == cfg.logging.wandb  # resolved_config.yaml
    assert validate(load_config(None, ["train.out_dir=x"])).logging.wandb.project is None  # off by default
    with pytest.raises(NITPError, match="logging.wandb.mode 'cloud' is not one of online, offline, disabled"):
        validate(load_config(None, ["train.out_dir=x", "logging.wandb.project=p", "logging.wandb.mode=cloud"]))
    with pytest.raises(NITPError, match="logging.wandb.name / mode are set but logging.wandb.project is not"):
        validate(load_config(None, ["train.out_dir=x", "logging.wandb.mode=offline"]))
    with pytest.raises(NITPError, match="unknown key 'logging.wandb.projct' .*did you mean 'logging.wandb.project'"):
        load_config(None, ["logging.wandb.projct=p"])


def read_yaml_text(text: str) -> dict:
    import yaml

    return yaml.safe_load(text)
