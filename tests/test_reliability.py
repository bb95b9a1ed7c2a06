"""Reliability of `nitp train`, proven with real processes on CPU: kill -9 (of the run, of one rank),
SIGTERM/SIGINT, torn and damaged checkpoints, non-finite losses, failing saves and a run directory of another
config.

Every run is a tiny model through `tests/runs.py`; the promises are listed in docs/reliability.md.
"""

from __future__ import annotations

import json
import resource
import shutil
import signal
import time

import psutil
import pytest

import runs
from nitp_ds.checkpoint import integrity
from nitp_ds.errors import NITPError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return runs.prepare_data(tmp_path_factory.mktemp("reliability-data"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """6 steps without interruption, checkpoints at steps 3 and 6: the curve every resume must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = runs.train(data, run_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [r["step"] for r in runs.records(run_dir)] == [1, 2, 3, 4, 5, 6]
    # The run times its own phases (start-up, each save, the end) into its summary and its console table.
    phases = runs.summary(run_dir)["phases"]
    assert [save["step"] for save in phases["checkpoint_saves"]] == [3]  # step 6 is the final save
    assert 0 < phases["checkpoint_saves"][0]["seconds"] < phases["total_s"]
    assert 0 < phases["final_save_s"] <= phases["end_s"]
    assert 0 < phases["startup_s"] < phases["startup_s"] + phases["train_s"] + phases["end_s"] <= phases["total_s"]
    parts = phases["startup_parts"]  # the start-up's parts, in order, add up to it
    assert list(parts) == ["imports", "setup", "model", "engine", "resume", "first_step"] and min(parts.values()) >= 0
    assert sum(parts.values()) == pytest.approx(phases["startup_s"], abs=1e-6)
    assert "time: start-up" in result.stdout and "time: checkpoint saves" in result.stdout
    return run_dir


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_resume_after_sigkill_gives_identical_losses(data, reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = runs.start(data, run_dir)
    latest_seen = []

    def checkpoint_3_done() -> bool:
        done = runs.complete(run_dir, 3)  # read first: `latest` is replaced only after the meta is written
        latest = run_dir / "checkpoints" / "latest"
        if latest.exists():  # whenever `latest` exists it names a complete checkpoint
            tag = latest.read_text().strip()
            latest_seen.append(tag)
            assert (run_dir / "checkpoints" / tag / "nitp_meta.json").is_file(), tag
        return done and bool(latest_seen)

    runs.wait_until(checkpoint_3_done, proc)
    assert runs.stop(proc, signal.SIGKILL) == -signal.SIGKILL
    assert not runs.complete(run_dir, 6), "the run finished before kill -9; nothing was left to resume"
    assert latest_seen

    result = runs.train(data, run_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resumed from" in result.stdout and "global_step3" in result.stdout
    # Bitwise: the same weights, optimizer, scheduler and data position come back from the checkpoint.
    assert runs.curve(run_dir) == runs.curve(reference)


@pytest.mark.parametrize("first,then", [("false", "true"), ("true", "false")], ids=["deepspeed-then-fast",
                                                                                     "fast-then-deepspeed"])
def test_resume_across_the_one_pass_and_deepspeeds_optimizer_step(data, reference, tmp_path, first, then):
    """The one-pass AdamW of `train.fast_zero_step` keeps torch AdamW's own state (step, moments): a run
    saved under DeepSpeed's step resumes under the one-pass step, and the reverse, with the uninterrupted
    run's losses (to float rounding: the two paths sum in another order)."""
    run_dir = tmp_path / "run"
    saved = runs.train(data, run_dir, **{"train.fast_zero_step": first, "train.steps": 3})
    assert saved.returncode == 0, saved.stdout[-3000:] + saved.stderr[-3000:]
    resumed = runs.train(data, run_dir, **{"train.fast_zero_step": then})
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "global_step3" in resumed.stdout
    got, want = runs.curve(run_dir), runs.curve(reference)
    assert [row[0] for row in got] == [row[0] for row in want] == [1, 2, 3, 4, 5, 6]
    for row, expected in zip(got, want):
        assert row == pytest.approx(expected, rel=2e-6, abs=1e-7), (row, expected)


def test_incomplete_checkpoint_is_skipped_and_run_resumes_from_previous(data, reference, tmp_path):
    # What a SIGKILL in the middle of saving step 6 leaves: DeepSpeed's files (here truncated) and no
    # nitp_meta.json; `latest` still names step 3 because it is replaced only after the meta is written.
    run_dir = copy_run(reference, tmp_path / "run")
    torn = run_dir / "checkpoints" / "global_step6"
    (torn / "nitp_meta.json").unlink()
    for pt in torn.glob("*.pt"):
        pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])
    (run_dir / "checkpoints" / "latest").write_text("global_step3")

    # Saved at once this time (the reference saved in the background): the files must be the same, byte for byte.
    result = runs.train(data, run_dir, **{"checkpoint.async_save": "false"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "warning: skipping incomplete checkpoint" in result.stdout and "global_step6" in result.stdout
    assert "global_step3 at step 3" in result.stdout
    assert runs.curve(run_dir) == runs.curve(reference)
    assert runs.complete(run_dir, 6) and runs.latest(run_dir) == "global_step6"
    ours, theirs = sorted(torn.glob("*.pt")), sorted((reference / "checkpoints" / "global_step6").glob("*.pt"))
    assert [p.name for p in ours] == [p.name for p in theirs] and ours
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(ours, theirs))


def test_a_finished_run_has_the_checksums_of_every_checkpoint(reference):
    """Taken as the files were written (in the background for the step-3 save; by the final save's thread during
    the final evaluation): every file of every checkpoint has its size and CRC-32 recorded, those of its bytes."""
    for tag in ("global_step3", "global_step6"):
        tag_dir = reference / "checkpoints" / tag
        records = integrity.recorded_files(tag_dir)
        assert sorted(records) == [p.name for p in integrity.checkpoint_files(tag_dir)]
        assert records == {p.name: integrity.file_record(p) for p in integrity.checkpoint_files(tag_dir)}


def test_damaged_checkpoint_is_refused_when_named_and_skipped_by_auto_resume(data, reference, tmp_path):
    # A partial copy: the newest checkpoint complete (nitp_meta.json, `latest`) but one file cut short.
    run_dir = copy_run(reference, tmp_path / "run")
    damaged = run_dir / "checkpoints" / "global_step6" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    saved_size = damaged.stat().st_size
    damaged.write_bytes(damaged.read_bytes()[:1000])
    before = sorted((str(p.relative_to(run_dir)), p.stat().st_mtime_ns) for p in run_dir.rglob("*"))

    # Named explicitly: refused in one line before anything is built or written.
    result = runs.train(data, run_dir, extra=["--resume", str(damaged.parent)])
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: checkpoint file {damaged} is truncated or corrupt: 1000 bytes, {saved_size} when it "
                      "was saved; copy it again or use an earlier checkpoint"]
    assert "Traceback" not in result.stderr and "resumed from" not in result.stdout
    assert sorted((str(p.relative_to(run_dir)), p.stat().st_mtime_ns) for p in run_dir.rglob("*")) == before

    # nitp convert / export / eval of it: the same check, the same line (export and eval convert first).
    from nitp_ds.checkpoint.convert import convert_checkpoint
    from nitp_ds.model_source import open_source

    for read in (lambda: convert_checkpoint(damaged.parent, tmp_path / "out", show_progress=False),
                 lambda: open_source(damaged.parent)):
        with pytest.raises(NITPError) as refused:
            read()
        assert str(refused.value) == errors[0].removeprefix("error: ")
    assert not (tmp_path / "out").exists()

    # --resume auto: one warning naming the file, then the previous checkpoint, and the same curve as never damaged.
    result = runs.train(data, run_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: skipping damaged checkpoint global_step6: {damaged} is truncated or corrupt: 1000 "
                        f"bytes, {saved_size} when it was saved; trying the one before it"]
    assert "global_step3 at step 3" in result.stdout
    assert runs.curve(run_dir) == runs.curve(reference)
    assert damaged.stat().st_size == saved_size  # the damaged checkpoint was saved again, whole
    assert integrity.find_damage(damaged.parent) is None and runs.latest(run_dir) == "global_step6"


def test_kill_9_of_one_rank_stops_the_others_in_one_line_and_the_checkpoint_stays_intact(data, tmp_path):
    run_dir = tmp_path / "run"
    proc = runs.start(data, run_dir, nproc=2, **{"train.steps": 1000, "checkpoint.every": 2})
    runs.wait_until(lambda: runs.logged_step(run_dir) >= 3 and runs.complete(run_dir, 2), proc, timeout=240)
    rank_1 = next(p for p in psutil.Process(proc.pid).children(recursive=True)
                  if "nitp_ds.cli" in " ".join(p.cmdline()) and p.environ().get("RANK") == "1")
    rank_1.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    returncode = runs.finish(proc, timeout=60)
    stopped_after = time.monotonic() - killed
    log = (tmp_path / "run.log").read_text()
    assert returncode != 0, log[-3000:]
    assert stopped_after < 30, f"the surviving rank took {stopped_after:.0f} s to stop"
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, log[-3000:]
    assert errors[0].startswith("error: rank 1 of 2 stopped (killed by signal 9: SIGKILL"), errors[0]
    newest = run_dir / "checkpoints" / runs.latest(run_dir)
    assert f"the newest complete checkpoint, {newest}, is intact: resume with the same command" in errors[0], errors
    assert "Traceback" not in log, log[-5000:]
    assert integrity.find_damage(newest) is None  # every file of it matches its size and CRC-32


def test_sigterm_to_launcher_with_two_ranks_saves_exits_0_and_restart_finishes(data, tmp_path):
    run_dir = tmp_path / "run"
    settings = {"train.steps": 12, "checkpoint.every": 0}
    proc = runs.start(data, run_dir, nproc=2, **settings)
    runs.wait_until(lambda: runs.logged_step(run_dir) >= 2, proc, timeout=240)
    assert runs.stop(proc, signal.SIGTERM) == 0, (run_dir.parent / "run.log").read_text()[-3000:]

    stopped = runs.summary(run_dir)
    assert stopped["status"] == "preempted" and 2 <= stopped["step"] < 12
    assert runs.complete(run_dir, stopped["step"]) and runs.latest(run_dir) == f"global_step{stopped['step']}"

    result = runs.train(data, run_dir, nproc=2, **settings)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"at step {stopped['step']}" in result.stdout
    done = runs.summary(run_dir)
    assert done["status"] == "finished" and done["step"] == 12
    assert [r["step"] for r in runs.records(run_dir)] == list(range(1, 13))


def test_sigint_with_one_process_saves_and_exits_0(data, tmp_path):
    run_dir = tmp_path / "run"
    # Logged every 3 steps: the summary's step is the step the run stopped at, not the last logged one.
    proc = runs.start(data, run_dir, **{"train.steps": 200, "checkpoint.every": 0, "logging.every": 3})
    runs.wait_until(lambda: runs.logged_step(run_dir) >= 3, proc)
    assert runs.stop(proc, signal.SIGINT) == 0, (run_dir.parent / "run.log").read_text()[-3000:]
    stopped = runs.summary(run_dir)
    assert stopped["status"] == "preempted" and stopped["step"] >= runs.logged_step(run_dir)
    assert runs.complete(run_dir, stopped["step"]) and runs.latest(run_dir) == f"global_step{stopped['step']}"


def test_nonfinite_loss_step_is_skipped_and_training_continues(data, tmp_path):
    run_dir = tmp_path / "run"
    result = runs.train(data, run_dir, env={"NITP_FAULT_NAN_STEPS": "3"}, **{"checkpoint.every": 0})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "warning: step 3 has a non-finite loss" in result.stdout
    done = runs.summary(run_dir)
    assert done["skipped_steps"] == 1 and done["step"] == 6 and done["status"] == "finished"
    assert [r["step"] for r in runs.records(run_dir)] == [1, 2, 3, 4, 5, 6]


def test_consecutive_nonfinite_losses_stop_with_exit_2_and_checkpoint_before(data, tmp_path):
    run_dir = tmp_path / "run"
    result = runs.train(data, run_dir, env={"NITP_FAULT_NAN_STEPS": "3,4,5"},
                        **{"train.max_bad_steps": 3, "checkpoint.every": 2})
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "3 consecutive steps had a non-finite loss" in errors[0]
    assert "Traceback" not in result.stderr
    assert runs.latest(run_dir) == "global_step2" and runs.complete(run_dir, 2)
    assert not (run_dir / "checkpoints" / "global_step3").exists()


def test_failing_checkpoint_save_exits_2_and_previous_checkpoint_stays_valid(data, reference, tmp_path):
    # A file-size limit (like a full disk: EFBIG instead of ENOSPC) lets the small files through but not
    # the optimizer state; tests run as root, where a read-only directory would not stop the write.
    run_dir = copy_run(reference, tmp_path / "run")
    shutil.rmtree(run_dir / "checkpoints" / "global_step6")
    (run_dir / "checkpoints" / "latest").write_text("global_step3")
    before = sorted((p.name, p.stat().st_size) for p in (run_dir / "checkpoints" / "global_step3").iterdir())

    def small_files_only():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    result = runs.train(data, run_dir, preexec_fn=small_files_only)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "checkpoint save to" in errors[0] and "global_step6" in errors[0]
    assert "Traceback" not in result.stderr
    assert not (run_dir / "checkpoints" / "global_step6").exists()
    assert runs.latest(run_dir) == "global_step3" and runs.complete(run_dir, 3)
    assert sorted((p.name, p.stat().st_size) for p in (run_dir / "checkpoints" / "global_step3").iterdir()) == before


def test_run_dir_of_another_config_is_refused_and_force_starts_afresh(data, reference, tmp_path):
    run_dir = copy_run(reference, tmp_path / "run")

    def snapshot():
        return sorted((str(p.relative_to(run_dir)), p.stat().st_size, p.stat().st_mtime_ns)
                      for p in run_dir.rglob("*"))

    before = snapshot()
    result = runs.train(data, run_dir, **{"model.hidden_size": 48})
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "belongs to another config (different model)" in result.stderr and "--force" in result.stderr
    assert snapshot() == before

    result = runs.train(data, run_dir, extra=["--force"], **{"model.hidden_size": 48, "train.steps": 2,
                                                             "checkpoint.every": 0})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resumed from" not in result.stdout
    assert [r["step"] for r in runs.records(run_dir)] == [1, 2]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("global_step*")) == ["global_step2"]
    assert "hidden_size: 48" in (run_dir / "resolved_config.yaml").read_text()
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 2
