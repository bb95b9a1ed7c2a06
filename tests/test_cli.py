"""The installed `nitp` command: help, env, exit codes, and no top-level `cli` module."""

import subprocess
import sys


def run(args, cwd):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_help_lists_every_command(tmp_path):
    result = run(["nitp", "--help"], tmp_path)
    assert result.returncode == 0
    for command in ("env", "prepare-data", "data-info", "train", "convert", "export", "eval", "plot", "demo"):
        assert command in result.stdout


def test_cli_is_installed_inside_the_package_only(tmp_path):
    assert run([sys.executable, "-c", "import nitp_ds.cli.main"], tmp_path).returncode == 0
    missing = run([sys.executable, "-c", "import cli"], tmp_path)
    assert missing.returncode != 0 and "No module named 'cli'" in missing.stderr


def test_env_reports_versions_and_autoep(tmp_path):
    result = run(["nitp", "env"], tmp_path)
    assert result.returncode == 0
    assert "deepspeed" in result.stdout and "transformers" in result.stdout and "AutoEP" in result.stdout


def test_bad_input_is_one_line_and_exit_code_2(tmp_path):
    result = run(["nitp", "train", "--config", "debug", "--set", "train.stepz=1"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown key 'train.stepz' in override 'train.stepz=1'; did you mean 'train.steps'?"]
    missing = run(["nitp", "train", "--config", str(tmp_path / "none.yaml")], tmp_path)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


def test_unknown_option_is_a_usage_error(tmp_path):
    result = run(["nitp", "train", "--no-such-option"], tmp_path)
    assert result.returncode == 2


def test_local_rank_from_the_deepspeed_launcher_is_accepted(tmp_path):
    # `deepspeed --module nitp_ds.cli train ...` without --no_local_rank runs `... --local_rank=K train ...`.
    result = run([sys.executable, "-m", "nitp_ds.cli", "--local_rank=1", "train", "--config", "debug",
                  "--print-config"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "train_micro_batch_size_per_gpu" in result.stdout
