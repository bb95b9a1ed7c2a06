"""The `deepspeed` command that `nitp train` builds, and the arguments it forwards to every rank."""

import sys

from nitp_ds.cli.train import _forwarded_argv
from nitp_ds.launch import launcher_command, node_count

TAIL = ["--no_local_rank", "--module", "nitp_ds.cli", "train", "--config", "debug"]
HEAD = ["deepspeed", "--log_level", "error"]  # the launcher's own [INFO]/[WARNING] lines off (nitp_ds/console.py)


def test_one_node():
    cmd = launcher_command(["--config", "debug"], 2, 1, None, 1234)
    assert cmd == [*HEAD, "--num_gpus", "2", "--master_port", "1234", *TAIL]


def test_hostfile_over_ssh_without_nproc_lets_the_slots_decide():
    cmd = launcher_command(["--config", "debug"], None, 2, "hosts", 29500)
    assert cmd == [*HEAD, "--hostfile", "hosts", "--num_nodes", "2", "--master_port", "29500", *TAIL]


def test_one_launcher_per_node_without_ssh():
    cmd = launcher_command(["--config", "debug"], 4, 2, "hf", 29500, master_addr="10.0.0.1", node_rank=1)
    assert cmd == [*HEAD, "--hostfile", "hf", "--num_nodes", "2", "--no_ssh", "--node_rank", "1",
                   "--master_addr", "10.0.0.1", "--num_gpus", "4", "--master_port", "29500", *TAIL]


def test_the_launcher_logs_its_own_info_lines_only_under_debug():
    loud = launcher_command(["--config", "debug"], 2, 1, None, 1234, quiet=False)  # `nitp --debug train ...`
    assert loud == ["deepspeed", "--num_gpus", "2", "--master_port", "1234", *TAIL]


def test_node_count_reads_the_hostfile(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# nodes\nnode-a slots=8\n\nnode-b slots=8\n")
    assert node_count(1, str(hosts)) == 2
    assert node_count(3, str(hosts)) == 3 and node_count(1, None) == 1


def test_forwarded_argv_drops_the_launcher_options_and_keeps_the_rest(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["nitp", "train", "--config", "debug", "--nproc", "2", "--num-nodes=2",
                                      "--set", "train.steps=3", "--no-ssh", "--node-rank", "1", "--master-addr",
                                      "10.0.0.1", "--master-port=29501", "--hostfile", "h", "--force"])
    assert _forwarded_argv() == ["--config", "debug", "--set", "train.steps=3", "--force"]


def test_root_options_before_the_command_are_not_forwarded(monkeypatch):
    # `nitp --debug train ...`: --debug reaches the ranks as NITP_DEBUG; after `train` it would be a usage error.
    monkeypatch.setattr(sys, "argv", ["nitp", "--debug", "train", "--config", "debug", "--nproc", "2"])
    assert _forwarded_argv() == ["--config", "debug"]
