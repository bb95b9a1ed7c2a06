"""The ds_config is completed from the recipe and contradictions are refused."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import runs

from nitp_ds.config import load_config
from nitp_ds.ds_config import derive_ds_config, load_ds_config
from nitp_ds.errors import NITPError
from nitp_ds.models.families import MOE_LAYER_PATTERN

ROOT = Path(__file__).resolve().parent.parent


def derive(raw, overrides=(), world_size=2, num_experts=4):
    cfg = load_config(ROOT / "recipes" / "debug.yaml", list(overrides))
    return derive_ds_config(raw, cfg, world_size=world_size, num_experts=num_experts, model_type="qwen3_moe")


def test_bundled_configs_fill_batch_sizes_and_autoep():
    for name in ("zero3_moe.json", "zero3_moe_cpu.json"):
        ds = derive(load_ds_config(ROOT / "ds_configs" / name), ["train.grad_accum=3"])
        assert ds["train_micro_batch_size_per_gpu"] == 4
        assert ds["gradient_accumulation_steps"] == 3
        assert ds["train_batch_size"] == 4 * 3 * 2
        assert ds["expert_parallel"]["autoep_size"] == 2
        assert ds["expert_parallel"]["preset_model"] == "qwen3_moe"
        assert ds["expert_parallel"]["moe_layer_pattern"] == MOE_LAYER_PATTERN
        assert ds["bf16"]["enabled"] is False  # no GPU here


def test_auto_autoep_size_is_the_largest_common_divisor():
    raw = {"expert_parallel": {"enabled": True, "autoep_size": "auto"}}
    assert derive(raw, world_size=8, num_experts=4)["expert_parallel"]["autoep_size"] == 4
    assert derive(raw, world_size=3, num_experts=4)["expert_parallel"]["autoep_size"] == 1


@pytest.mark.parametrize("raw,message", [
    ({"train_micro_batch_size_per_gpu": 2}, "train_micro_batch_size_per_gpu is 2 but train.micro_batch_size gives 4"),
    ({"train_batch_size": 5}, "train_batch_size is 5 but train.micro_batch_size × train.grad_accum × world size"),
    ({"gradient_clipping": 0.5}, "gradient_clipping is 0.5 but optim.grad_clip gives 1.0"),
    ({"optimizer": {"type": "Adam"}}, "remove it: nitp-ds builds AdamW"),
    ({"scheduler": {"type": "WarmupLR"}}, "remove it"),
    ({"fp16": {"enabled": True}}, "ds_config enables fp16"),
    ({"bf16": {"enabled": True}}, "no bf16 support"),
    ({"expert_parallel": {"enabled": True, "autoep_size": 3}}, "autoep_size (3) does not divide the world size (2)"),
    ({"expert_parallel": {"enabled": True, "autoep_size": 2}}, "autoep_size (2) does not divide model.num_experts (3)"),
    ({"expert_parallel": {"enabled": True, "preset_model": "mixtral"}}, "needs 'qwen3_moe'"),
    ({"expert_parallel": {"enabled": True, "moe_layer_pattern": "model\\.layers\\.\\d+\\.mlp"}}, "set it to \"auto\""),
])
def test_contradictions_are_refused(raw, message):
    experts = 3 if raw.get("expert_parallel", {}).get("autoep_size") == 2 else 4
    with pytest.raises(NITPError) as err:
        derive(raw, num_experts=experts)
    assert message in str(err.value)


def test_bad_json_names_the_line(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{\n  "bf16": {"enabled": true,}\n}')
    with pytest.raises(NITPError, match="is not valid JSON \\(line 2"):
        load_ds_config(path)


def test_missing_ds_config(tmp_path):
    with pytest.raises(NITPError, match="does not exist; pass --ds-config"):
        load_ds_config(tmp_path / "none.json")


def persistence_threshold(raw, world_size):
    return derive(raw, world_size=world_size)["zero_optimization"].get("stage3_param_persistence_threshold")


def test_auto_persistence_threshold_keeps_every_parameter_resident_on_one_rank():
    raw = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": "auto"}}
    assert persistence_threshold(raw, world_size=1) == 10**12  # more elements than any parameter has
    assert persistence_threshold(raw, world_size=2) == 100_000  # DeepSpeed's default: small parameters only
    assert persistence_threshold(raw, world_size=8) == 100_000
    assert raw["zero_optimization"]["stage3_param_persistence_threshold"] == "auto"  # the user's dict is untouched
    # Offloaded parameters would stay on the device if persistent: DeepSpeed's default even on one rank.
    offloaded = {"zero_optimization": {**raw["zero_optimization"], "offload_param": {"device": "cpu"}}}
    assert persistence_threshold(offloaded, world_size=1) == 100_000


@pytest.mark.parametrize("world_size", [1, 2])
def test_explicit_persistence_threshold_is_left_as_written(world_size):
    assert persistence_threshold({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}},
                                 world_size) == 0
    assert persistence_threshold({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 12345}},
                                 world_size) == 12345
    assert persistence_threshold({"zero_optimization": {"stage": 3}}, world_size) is None  # DeepSpeed's default


def test_the_bundled_gpu_config_asks_for_the_auto_persistence_threshold():
    raw = load_ds_config(ROOT / "ds_configs" / "zero3_moe.json")
    assert persistence_threshold(raw, world_size=1) == 10**12 and persistence_threshold(raw, world_size=2) == 100_000


@pytest.mark.parametrize("grad_accum,expected", [(1, None), (2, "fp32")])
def test_auto_gradient_accumulation_dtype_is_fp32_only_where_gradients_accumulate(grad_accum, expected):
    raw = load_ds_config(ROOT / "ds_configs" / "zero3_moe_1gpu.json")
    assert raw["data_types"]["grad_accum_dtype"] == "auto"
    ds = derive(raw, [f"train.grad_accum={grad_accum}"], world_size=1)
    assert ds["data_types"].get("grad_accum_dtype") == expected
    assert derive({"data_types": {"grad_accum_dtype": "bf16"}}, ["train.grad_accum=2"])["data_types"] == \
        {"grad_accum_dtype": "bf16"}  # a dtype written out is left as it is


def test_deepspeeds_throughput_timer_is_off_unless_the_ds_config_sets_timers():
    assert derive({})["timers"] == {"throughput": {"enabled": False}}
    written = {"timers": {"throughput": {"enabled": True, "synchronized": False}}}
    assert derive(written)["timers"] == written["timers"]


def test_a_training_step_does_not_wait_for_the_device_through_deepspeed(tmp_path):
    """DeepSpeed's throughput timer, on by default, synchronizes the device at every forward and step; with
    the derived config no training step calls the accelerator's synchronize (with the timer on, steps do)."""
    data = runs.prepare_data(tmp_path)
    timer_on = json.loads(runs.DS_CONFIG.read_text())
    timer_on["timers"] = {"throughput": {"enabled": True}}
    (tmp_path / "timer_on.json").write_text(json.dumps(timer_on))
    sets = {**runs.TINY, "data.path": data, "train.out_dir": tmp_path / "run", "checkpoint.every": 0}
    configs = [str(runs.DS_CONFIG), str(tmp_path / "timer_on.json")]
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "device_waits.py"),
                             str(ROOT / "recipes" / "debug.yaml"), "4", ",".join(configs),
                             *[f"{k}={v}" for k, v in sets.items()]],
                            env=runs.child_env(), cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    waits = json.loads(result.stdout.strip().splitlines()[-1])
    assert waits[configs[0]] == 0
    assert waits[configs[1]] >= 4  # the timer's wait in each step (and in each forward after its first steps)
