"""Where metrics go (nitp_ds/logs.py): the console line of a training interval, and Weights & Biases (in
offline mode) next to metrics.jsonl."""

from __future__ import annotations

import importlib.util
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import runs
from nitp_ds.logs import format_train_line

# In the `test` extra; a bare install without it skips the tests that run W&B.
needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")


RECORD = {"step": 12, "loss/total": 3.14159, "loss/ntp": 2.5, "loss/nitp": 0.25, "loss/aux": 1.0123, "lr": 3e-4,
          "grad_norm": 0.987, "tokens_per_s": 12345.6}


def test_train_line_shows_step_losses_lr_norm_and_throughput():
    assert format_train_line(RECORD, 100) == ("step     12/100  loss 3.1416  ntp 2.5000  nitp 0.2500  aux 1.012  "
                                              "lr 3.00e-04  gnorm 0.99  12,346 tok/s")


def test_mfu_and_expert_load_are_shown_when_measured():
    line = format_train_line({**RECORD, "mfu": 0.4234, "moe/max_over_mean": 1.5}, 100)
    assert line.endswith("12,346 tok/s  mfu 42.3%  load max/mean 1.50")


def test_a_missing_grad_norm_shows_nan():
    record = {k: v for k, v in RECORD.items() if k != "grad_norm"}
    assert "gnorm nan" in format_train_line(record, 100)


# MetricsLogger as the trainer drives it on rank 0: a run of two steps, the same run resumed from step 1,
# a fresh run, and a rank other than 0. In a process of its own: wandb hooks the interpreter it runs in.
LOGGER_RUNS = r"""
import sys
from pathlib import Path
from nitp_ds.config import WandbConfig
from nitp_ds.logs import MetricsLogger

root = Path(sys.argv[1])
settings = WandbConfig(project="nitp-test", mode="offline")
records = [{"kind": "train", "step": 1, "loss/ntp": 6.0, "loss/nitp": 0.9, "lr": 1e-3, "tokens_per_s": 10.0},
           {"kind": "train", "step": 2, "loss/ntp": 5.5, "loss/nitp": 0.5, "lr": 2e-3, "tokens_per_s": 12.0},
           {"kind": "eval", "step": 2, "val/loss_ntp": 5.6, "val/ppl": 270.4}]
for run_dir, resume_step, enabled in ((root / "run", 0, True), (root / "run", 1, True), (root / "fresh", 0, True),
                                      (root / "rank1", 0, False)):
    logger = MetricsLogger(run_dir, enabled=enabled, tensorboard=False, resume_step=resume_step,
                           wandb_config=settings, run_config={"optim": {"lr": 1e-3}})
    for record in records:
        if record["step"] > resume_step:
            logger.log(record)
    logger.close()
"""


def wandb_records(path: Path) -> list:
    """The records of a W&B transaction log (run-ID.wandb): LevelDB's log format of wandb_internal Records."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def wandb_runs(run_dir: Path) -> list[dict]:
    """Each W&B run directory written under run_dir (oldest first): its id, config and logged history."""
    found = []
    for log in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        run = {"history": []}
        for record in wandb_records(log):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["id"], run["project"] = record.run.run_id, record.run.project
                run["config"] = {item.key: json.loads(item.value_json) for item in record.run.config.update}
            elif kind == "history":  # a key with "/" comes as nested_key ["loss", "ntp"]; "_..." are W&B's own
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                run["history"].append({key: value for key, value in items.items() if not key.startswith("_")})
        found.append(run)
    return found


@needs_wandb
def test_wandb_logs_the_metrics_jsonl_keys_and_a_resumed_run_continues_the_same_wandb_run(tmp_path):
    result = subprocess.run([sys.executable, "-c", LOGGER_RUNS, str(tmp_path)], cwd=runs.REPO, text=True,
                            capture_output=True, timeout=300, env=runs.child_env(WANDB_SILENT="true"))
    assert result.returncode == 0, result.stderr[-3000:]

    first, resumed = wandb_runs(tmp_path / "run")
    assert first["id"] == resumed["id"] == json.loads((tmp_path / "run" / "wandb_run.json").read_text())["id"]
    assert first["project"] == "nitp-test" and first["config"]["optim"] == {"lr": 1e-3}
    jsonl = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    expected = [{k: v for k, v in r.items() if k != "kind"} for r in jsonl]  # the same keys, the same values
    assert first["history"] == [expected[0], expected[1], expected[2]]  # steps 1, 2, eval 2
    assert resumed["history"] == [expected[1], expected[2]]  # from the checkpoint at step 1 on
    assert [r["step"] for r in jsonl] == [1, 2, 2]  # metrics.jsonl dropped the lost step 2, then got it again

    (fresh,) = wandb_runs(tmp_path / "fresh")
    assert fresh["id"] != first["id"]  # a new run directory starts a new W&B run
    assert not (tmp_path / "rank1").exists() or not list((tmp_path / "rank1").glob("wandb*"))  # rank 0 only


@needs_wandb
def test_nitp_train_on_two_ranks_logs_one_wandb_run_and_a_resume_continues_it(tmp_path_factory):
    data = runs.prepare_data(tmp_path_factory.mktemp("wandb-data"))
    run_dir = tmp_path_factory.mktemp("wandb") / "run"
    env = {k: v for k, v in runs.child_env().items() if not k.startswith("WANDB_")}  # nitp quiets W&B itself
    for steps in (2, 3):  # the second command resumes from the checkpoint at step 2
        args = runs.train_args(data, run_dir, nproc=2, **{"train.steps": steps, "checkpoint.every": 2,
                                                          "logging.wandb.project": "nitp-test",
                                                          "logging.wandb.mode": "offline"})
        result = subprocess.run(args, env=env, cwd=runs.REPO, text=True, capture_output=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert runs.third_party_noise(result.stdout + result.stderr) == []
        assert "wandb:" not in result.stdout + result.stderr

    first, resumed = wandb_runs(run_dir)  # one W&B run per command, not per rank: rank 0 only
    assert first["id"] == resumed["id"]
    jsonl = [{k: v for k, v in json.loads(line).items() if k != "kind"}
             for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in jsonl] == [1, 2, 2, 3, 3]  # train 1, 2, eval 2; train 3, eval 3
    assert first["history"] == jsonl[:3] and resumed["history"] == jsonl[3:]


def test_wandb_configured_without_the_package_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    from nitp_ds.cli.main import main

    monkeypatch.setitem(sys.modules, "wandb", None)  # what importlib sees when the package is absent
    monkeypatch.delenv("NITP_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["nitp", "train", "--config", "debug", "--nproc", "1", "--set",
                                      f"train.out_dir={tmp_path / 'run'}", "--set", "logging.wandb.project=p"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.strip().splitlines() == [
        "error: logging.wandb.project is set but the wandb package is not installed; "
        "pip install 'nitp-ds[wandb]' (or pip install wandb), or remove logging.wandb"]
    assert not (tmp_path / "run").exists()  # refused before anything was built or written
