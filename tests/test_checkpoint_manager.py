"""Pruning old checkpoints and the RNG state a checkpoint carries (nitp_ds.checkpoint.manager)."""

import random

import numpy as np
import torch

from nitp_ds.checkpoint import state as ckpt
from nitp_ds.checkpoint.manager import capture_rng, prune, restore_rng


def make_checkpoints(ckpt_dir, complete, incomplete=()):
    for step in [*complete, *incomplete]:
        tag_dir = ckpt_dir / ckpt.tag_for(step)
        tag_dir.mkdir(parents=True)
        (tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x")
        if step in complete:
            ckpt.mark_complete(tag_dir, {"step": step})


def remaining(ckpt_dir):
    return [step for step, _ in ckpt.list_tags(ckpt_dir)]


def test_prune_keeps_the_newest_complete_checkpoints_and_leaves_incomplete_ones(tmp_path):
    make_checkpoints(tmp_path, complete=[2, 4, 6, 8], incomplete=[3, 10])
    prune(tmp_path, keep_last=2)
    assert remaining(tmp_path) == [3, 6, 8, 10]
    assert ckpt.latest_complete(tmp_path, warn=lambda text: None) == tmp_path / "global_step8"


def test_prune_with_keep_last_0_keeps_everything(tmp_path):
    make_checkpoints(tmp_path, complete=[1, 2, 3])
    prune(tmp_path, keep_last=0)
    assert remaining(tmp_path) == [1, 2, 3]
    prune(tmp_path, keep_last=5)
    assert remaining(tmp_path) == [1, 2, 3]


def test_restored_rng_replays_the_same_numbers():
    state = capture_rng()
    first = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])
