"""The lr schedule and the optimizer's parameter groups (nitp_ds.build)."""

import math

import pytest
import torch

from nitp_ds.build import build_optimizer, lr_factor
from nitp_ds.config import load_config


def schedule(kind: str, steps: int = 100, warmup: int = 10, **more):
    sets = [f"schedule.kind={kind}", f"train.steps={steps}", f"schedule.warmup_steps={warmup}",
            "schedule.min_lr_ratio=0.1", *(f"schedule.{k}={v}" for k, v in more.items())]
    return load_config(None, sets)


@pytest.mark.parametrize("kind", ["cosine", "wsd", "constant"])
def test_warmup_rises_linearly_to_the_full_lr(kind):
    cfg = schedule(kind)
    assert [lr_factor(s, cfg) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])


def test_cosine_falls_from_one_to_the_floor_over_the_steps_after_warmup():
    cfg = schedule("cosine")
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: cos(π/2) = 0
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    assert lr_factor(250, cfg) == pytest.approx(0.1)  # past the end it stays at the floor
    values = [lr_factor(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert lr_factor(32, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 22 / 90)))


def test_wsd_is_stable_until_the_decay_window_then_falls_linearly():
    cfg = schedule("wsd", decay_ratio=0.2)  # decay over the last 20 of 100 steps
    assert {lr_factor(s, cfg) for s in range(10, 80)} == {1.0}
    assert lr_factor(90, cfg) == pytest.approx(1 - 0.9 * 0.5)
    assert lr_factor(100, cfg) == pytest.approx(0.1)


def test_constant_stays_at_one_and_no_warmup_starts_at_one():
    assert {lr_factor(s, schedule("constant")) for s in range(10, 200)} == {1.0}
    assert lr_factor(0, schedule("cosine", warmup=0)) == pytest.approx(1.0)


def test_weight_decay_only_on_matrices():
    cfg = load_config(None, ["optim.weight_decay=0.1", "optim.fused=false"])
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    decay, no_decay = build_optimizer(cfg, model).param_groups
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [(3, 4)]
    assert no_decay["weight_decay"] == 0.0 and [p.shape for p in no_decay["params"]] == [(3,), (3,), (3,)]
