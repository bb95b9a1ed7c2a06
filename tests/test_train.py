"""`nitp train` end to end on CPU: real DeepSpeed ZeRO-3 + AutoEP through the launcher."""

import glob
import json
import re
import subprocess
import sys

import pytest

from runs import DS_CONFIG, REPO, child_env, prepare_data, third_party_noise, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_data(tmp_path_factory.mktemp("train-data"))


def records(run_dir, kind="train"):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


@pytest.mark.parametrize("nproc", [2, 1])
def test_training_lowers_ntp_and_nitp_losses(data, tmp_path, nproc):
    run = tmp_path / "run"
    result = train(data, run, nproc=nproc, **{"train.steps": 32, "checkpoint.every": 16, "logging.every": 4,
                                               "train.eval_every": 16, "optim.lr": 0.01, "checkpoint.keep_last": 1})
    assert result.returncode == 0, result.stderr[-3000:]
    logged = records(run)
    assert [r["step"] for r in logged] == list(range(4, 33, 4))
    assert logged[-1]["loss/ntp"] < logged[0]["loss/ntp"] - 0.3
    assert logged[-1]["loss/nitp"] < logged[0]["loss/nitp"]
    assert all(k in logged[-1] for k in ("loss/aux", "loss/z", "loss/total", "lr", "grad_norm", "tokens_per_s",
                                         "moe/max_over_mean"))
    assert len(records(run, "eval")) == 2
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["expert_parallel"]["autoep_size"] == nproc
    assert ds["zero_optimization"]["stage"] == 3
    assert (run / "checkpoints" / "latest").read_text() == "global_step32"
    # checkpoint.keep_last 1: the step-16 checkpoint was pruned once step 32's was complete
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == ["global_step32"]
    files = sorted(p.name for p in (run / "checkpoints" / "global_step32").iterdir())
    assert sum(f.endswith("model_states.pt") for f in files) == nproc
    assert "nitp_meta.json" in files
    assert third_party_noise(result.stdout + result.stderr) == []  # a quiet console (tests/test_console.py)
    if nproc > 1:  # DeepSpeed's CPU shared-memory buffers of the job are gone (they filled /dev/shm before)
        port = re.search(r"--master_port (\d+)", result.stdout).group(1)
        assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")


def test_lambda_zero_without_head_is_exactly_the_ntp_baseline(data, tmp_path):
    sets = {"nitp.head": "none", "nitp.weight": 0, "moe.aux_loss_weight": 0, "train.steps": 6,
            "checkpoint.every": 0, "train.ce_chunk_tokens": 100000}
    run = tmp_path / "run"
    ours = train(data, run, **sets)
    assert ours.returncode == 0, ours.stderr[-3000:]
    ours_losses = [r["loss/total"] for r in records(run)]

    from runs import TINY

    overrides = [f"{k}={v}" for k, v in {**TINY, **sets, "data.path": data, "train.out_dir": tmp_path / "x"}.items()]
    plain = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "plain_ntp.py"),
                            str(REPO / "recipes" / "debug.yaml"), str(DS_CONFIG), *overrides],
                           env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr[-3000:]
    plain_losses = json.loads(plain.stdout.split("LOSSES ", 1)[1].splitlines()[0])
    assert len(ours_losses) == len(plain_losses) == 6
    assert ours_losses == pytest.approx(plain_losses, rel=1e-5, abs=1e-6)


def test_vocabulary_larger_than_the_model_is_refused(data, tmp_path):
    result = train(data, tmp_path / "run", **{"model.vocab_size": 50})
    assert result.returncode == 2
    assert "model.vocab_size" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_print_config_shows_the_derived_deepspeed_config(data):
    result = subprocess.run([sys.executable, "-m", "nitp_ds.cli", "train", "--config", "debug", "--ds-config",
                             str(REPO / "ds_configs" / "zero3_moe.json"), "--print-config", "--nproc", "2",
                             "--set", f"data.path={data}"], env=child_env(), cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    derived = json.loads(result.stdout.split("# derived DeepSpeed config (world size 2)\n", 1)[1])
    assert derived["train_batch_size"] == 8 and derived["expert_parallel"]["autoep_size"] == 2


def test_the_loop_pauses_automatic_garbage_collection_and_collects_every_n_steps():
    """`train.gc_every`: no automatic collection inside the loop however much is allocated, a young-generation
    collection on every N-th step, and Python's own GC back afterwards."""
    import gc
    import weakref

    from nitp_ds.trainer import PausedGC

    class Node:
        pass

    assert gc.isenabled()
    with PausedGC(2) as paused:
        cycle = Node()
        cycle.self = cycle  # freed only by the cyclic collector
        alive = weakref.ref(cycle)
        del cycle
        junk = [[Node()] for _ in range(50_000)]  # far past the automatic threshold (700 allocations)
        assert not gc.isenabled() and alive() is not None
        paused.step(1)
        assert alive() is not None
        paused.step(2)
        assert alive() is None
        del junk
    assert gc.isenabled()
    with PausedGC(0):
        assert gc.isenabled()
