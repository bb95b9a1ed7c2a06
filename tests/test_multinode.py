"""Several nodes with the stock deepspeed launcher, simulated on this machine.

Each "node" is its own `nitp train --num-nodes 2 --node-rank R --master-addr 127.0.0.1 --master-port P`,
i.e. its own `deepspeed --no_ssh --node_rank R` launcher with one CPU process, the way a cluster that
starts one process group per node runs it (docs/multinode.md). Global rank 1 is local rank 0 on its
node, which is what a "rank 0 only" check that read LOCAL_RANK would get wrong.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

import runs
from nitp_ds.distributed import free_port


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return runs.prepare_data(tmp_path_factory.mktemp("multinode-data"))


def start_nodes(data, job, *, run_dirs=None, node_sets=({}, {})):
    """A two-node job: one `nitp train` per node, its output in job/node<r>.log; both nodes write job/run
    unless run_dirs says otherwise, with node_sets[r] on top of TINY."""
    job.mkdir(exist_ok=True)
    port = free_port()
    run_dirs = run_dirs or [job / "run"] * 2
    return [runs.start(data, run_dirs[r], log=job / f"node{r}.log", extra=runs.node_args(r, port), **node_sets[r])
            for r in range(2)]


def node_logs(job):
    return [(job / f"node{r}.log").read_text() for r in range(2)]


def test_two_nodes_train_checkpoint_and_resume_exactly_like_one_node_with_two_processes(data, tmp_path):
    one_node, job = tmp_path / "one-node", tmp_path / "two-nodes"
    two_nodes = job / "run"
    # Same world size (2), same global batch (2 ranks x micro-batch 2), same AutoEP size (2, across the nodes).
    reference = runs.start(data, one_node, nproc=2)
    nodes = start_nodes(data, job)
    codes = [runs.finish(p) for p in [*nodes, reference]]
    logs = node_logs(job)
    assert codes == [0, 0, 0], "\n".join(log[-3000:] for log in logs)

    assert "--no_ssh --node_rank 0 --master_addr 127.0.0.1" in logs[0].splitlines()[1]  # the command, printed first
    ds_config = json.loads((two_nodes / "ds_config.json").read_text())
    assert ds_config["expert_parallel"]["autoep_size"] == 2 and ds_config["train_batch_size"] == 4
    # Bitwise: the two-node job is the single-node job with its ranks on two launchers.
    assert runs.curve(two_nodes) == runs.curve(one_node)
    assert len(runs.curve(two_nodes)) == 6

    # Global rank 0 alone logs: one record per step, a console table on node 0 only.
    assert [r["step"] for r in runs.records(two_nodes)] == [1, 2, 3, 4, 5, 6]
    train_line = re.compile(r"^step +\d+/6 ", re.MULTILINE)
    assert len(train_line.findall(logs[0])) == 6 and "nitp train: finished" in logs[0]
    assert not train_line.search(logs[1]) and "nitp train:" not in logs[1]

    # One checkpoint in DeepSpeed's layout in the shared run directory, a shard from each node's rank.
    shards = sorted(p.name for p in (two_nodes / "checkpoints" / "global_step3").glob("*_states.pt"))
    assert shards == [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")]
    meta = json.loads((two_nodes / "checkpoints" / "global_step3" / "nitp_meta.json").read_text())
    assert meta["world_size"] == 2 and meta["autoep_size"] == 2

    # Resume both nodes from step 3 (as after a crash in step 4): the same curve again.
    for tag_file in (two_nodes / "checkpoints" / "global_step6").iterdir():
        tag_file.unlink()
    (two_nodes / "checkpoints" / "global_step6").rmdir()
    (two_nodes / "checkpoints" / "latest").write_text("global_step3")
    nodes = start_nodes(data, job)
    codes = [runs.finish(p) for p in nodes]
    logs = node_logs(job)
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "global_step3 at step 3" in logs[0] and "resumed" not in logs[1]
    assert runs.curve(two_nodes) == runs.curve(one_node)
    assert runs.complete(two_nodes, 6) and runs.latest(two_nodes) == "global_step6"


def test_an_error_on_one_node_stops_both_nodes_and_is_shown_once(data, tmp_path):
    # Two jobs at once: in the first, node 1 cannot find the data (a start-up error on rank 1 only, which
    # would leave rank 0 waiting for it); in the second, node 1's run directory is not rank 0's (as with a
    # node-local disk), found before the model is built.
    missing_data, not_shared = tmp_path / "missing-data", tmp_path / "not-shared"
    jobs = {missing_data: start_nodes(data, missing_data, node_sets=({}, {"data.path": tmp_path / "nowhere"})),
            not_shared: start_nodes(data, not_shared, run_dirs=[not_shared / "run", tmp_path / "node1-disk"])}
    expected = [f"on rank 1 of 2: data directory {tmp_path / 'nowhere'} does not exist",
                f"train.out_dir {not_shared / 'run'} is not shared"]
    for (job, nodes), message in zip(jobs.items(), expected):
        codes = [runs.finish(p, timeout=120) for p in nodes]
        logs = node_logs(job)
        assert codes == [2, 2], "\n".join(log[-3000:] for log in logs)
        errors = [line for line in logs[0].splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], logs[0][-3000:]
        assert "error:" not in logs[1] and "Traceback" not in logs[0] + logs[1], logs[1][-3000:]
    assert not (not_shared / "run" / "checkpoints").exists()


def test_launch_settings_that_cannot_form_one_job_are_refused_before_starting(data, tmp_path):
    # Several nodes but no way to reach them; and mpirun's ranks (OMPI_COMM_WORLD_*, no RANK) without a
    # rendezvous address, which would otherwise start as independent single-process runs.
    cases = [(["--num-nodes", "2"], {}, "--num-nodes 2 needs either --hostfile"),
             ([], {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0"},
              "started by mpirun without MASTER_ADDR and MASTER_PORT")]
    for extra, env, message in cases:
        args = runs.train_args(data, tmp_path / "run", extra=extra)
        child = {k: v for k, v in runs.child_env(**env).items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
        result = subprocess.run(args, env=child, cwd=runs.REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
        assert "launching:" not in result.stdout
    assert not (tmp_path / "run").exists()
