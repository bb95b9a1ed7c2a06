"""Bad input through the real `nitp` command: exit code 2, one `error:` line naming the problem and the fix,
no traceback, and nothing created or changed on disk.

One test per row of the bad-input table in docs/reliability.md (rows tested elsewhere say so there). Every
command runs in a shared scratch directory, whose every file and directory is snapshotted before and after.
`nitp train` runs as a process of its own (each rank joins a process group before checking its inputs); the
other commands run through the same `main()` in this process, so that torch and transformers are imported
once, and two are spot-checked as processes of their own. Every input here is refused before a model is
built, so the whole file takes under a minute on 2 CPU cores.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runs import DS_CONFIG, child_env

NITP = [sys.executable, "-m", "nitp_ds.cli"]
WORDS = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta", "lorem", "ipsum"]
SHARD = Path("train") / "c" / "00000.bin"
TRAIN = ["train", "--config", "debug", "--ds-config", str(DS_CONFIG), "--nproc", "1", "--set", "data.path=data",
         "--set", "train.out_dir=run"]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """Inputs, good and bad, side by side: every test runs `nitp` here and must leave it unchanged."""
    import torch

    from nitp_ds.data.prepare import prepare_data

    root = tmp_path_factory.mktemp("bad-inputs")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(50)) for _ in range(60)]
    (root / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (root / "k.jsonl").write_text('{"body": "the text is under another key"}\n')
    (root / "j.jsonl").write_text('{"text": "fine"}\n{"text": "cut off\n')
    (root / "empty.txt").write_text("\n\n")
    (root / "bad.parquet").write_text("not a parquet file")
    (root / "not-yaml.yaml").write_text("model: [unclosed\n")
    (root / "typo.yaml").write_text("model:\n  hiden_size: 8\n")
    (root / "micro-batch.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 3}))
    (root / "autoep2.json").write_text(json.dumps({"expert_parallel": {"enabled": True, "autoep_size": 2}}))
    nvme = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}}
    (root / "nvme.json").write_text(json.dumps(nvme))
    (root / "emptydir").mkdir()
    (root / "out-exists").mkdir()
    (root / "out-exists" / "keep.txt").write_text("mine")
    (root / "a-file").write_text("mine")

    prepare_data([str(root / "c.jsonl")], root / "data", train_vocab_size=300, val_fraction=0.2, num_workers=1,
                 progress=False)
    shutil.copytree(root / "data", root / "data-flipped")  # same size, one byte changed: only the sha256 sees it
    shard = bytearray((root / "data-flipped" / SHARD).read_bytes())
    shard[10] ^= 0xFF
    (root / "data-flipped" / SHARD).write_bytes(bytes(shard))
    shutil.copytree(root / "data", root / "data-truncated")
    whole = (root / "data-truncated" / SHARD).read_bytes()
    (root / "data-truncated" / SHARD).write_bytes(whole[: len(whole) // 2])

    # Checkpoints: torch.save files, as DeepSpeed writes them, cut short or with a changed byte.
    states = {"dp_world_size": 1, "module": {"w": torch.arange(4096, dtype=torch.float32)}}
    for name in ("ckpt-truncated", "ckpt-crc"):
        (root / name).mkdir()
        torch.save(states, root / name / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    path = root / "ckpt-truncated" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    path.write_bytes(path.read_bytes()[:1000])
    path = root / "ckpt-crc" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside the tensor data: the zip's CRC no longer matches
    path.write_bytes(bytes(raw))
    # A checkpoint with the metadata export needs; its weights are never read by the refusals below.
    tag = root / "ckpt-meta" / "checkpoints" / "global_step1"
    tag.mkdir(parents=True)
    torch.save(states, tag / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    torch.save({}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (tag / "nitp_meta.json").write_text(json.dumps({"step": 1, "complete": True,
                                                    "hf_config": {"model_type": "qwen3_moe"}}))
    (root / "ckpt-meta" / "checkpoints" / "latest").write_text("global_step1")
    (root / "stale-latest" / "checkpoints").mkdir(parents=True)
    (root / "stale-latest" / "checkpoints" / "latest").write_text("global_step99")
    (root / "torn" / "checkpoints" / "global_step5").mkdir(parents=True)  # a save that never finished
    # What a run directory looks like to `nitp eval` and `nitp plot`.
    (root / "run-dir" / "checkpoints").mkdir(parents=True)
    (root / "run-dir" / "metrics.jsonl").write_text('{"step": 1, "kind": "train", "loss/ntp": 5.0}\n'
                                                   '{"step": 2, "kind": "tr\n')
    return root


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root with its kind, size, modification time and content hash."""
    state = {}
    for path in sorted(root.rglob("*")):
        stat = path.lstat()
        digest = hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else None
        state[str(path.relative_to(root))] = (path.is_dir(), stat.st_size, stat.st_mtime_ns, digest)
    return state


def check_refusal(code: int, stdout: str, stderr: str, keywords: tuple[str, ...]) -> str:
    """Exit code 2, no traceback, exactly one `error:` line, last on stderr, holding every key word."""
    output = stdout + stderr
    assert code == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output[-3000:]
    assert stderr.strip().splitlines()[-1] == errors[0], output[-3000:]
    for keyword in keywords:
        assert keyword in errors[0], f"{keyword!r} not in {errors[0]!r}"
    return errors[0]


def refuse_in_process(root: Path, args: list[str], keywords, monkeypatch, capfd) -> str:
    """`nitp args` through the same `main()` as the installed command, in this process (imports paid once)."""
    from nitp_ds.cli.main import main

    before = snapshot(root)
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "argv", ["nitp", *args])
    for key, value in child_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("NITP_DEBUG", raising=False)
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    stdout, stderr = capfd.readouterr()
    line = check_refusal(code, stdout, stderr, tuple(keywords))
    assert snapshot(root) == before, "the refused command changed files"
    return line


def refuse(root: Path, args: list[str], *keywords: str, timeout: float = 120) -> str:
    """Run `nitp args` as a process of its own in root; the same checks."""
    before = snapshot(root)
    result = subprocess.run([*NITP, *args], cwd=root, env=child_env(), capture_output=True, text=True,
                            timeout=timeout)
    line = check_refusal(result.returncode, result.stdout, result.stderr, keywords)
    assert snapshot(root) == before, "the refused command changed files"
    return line


PREP = ["prepare-data", "--out", "new", "--no-progress", "--workers", "1"]
TOK = ["--train-tokenizer", "300"]

# Refused before any process group or model exists: run through `main()` in this process.
# (id, arguments, key words of the problem and of the fix)
HERE = [
    # prepare-data
    ("prepare-missing-input", [*PREP, *TOK, "--source", "missing.jsonl"],
     ["--source input missing.jsonl does not exist", "check the path"]),
    ("prepare-glob-matches-nothing", [*PREP, *TOK, "--source", "*.nothing"],
     ["matches no files", "quote it in the shell"]),
    ("prepare-empty-corpus", [*PREP, *TOK, "--source", "empty.txt"],
     ["has no documents (empty corpus", "add text or drop that --source"]),
    ("prepare-unknown-text-key", [*PREP, *TOK, "--source", "k.jsonl"],
     ["k.jsonl:1 has no key 'text'", "pass --text-key"]),
    ("prepare-invalid-jsonl-line", [*PREP, *TOK, "--source", "j.jsonl"],
     ["j.jsonl:2 is not valid JSON", "column", "fix or remove that line"]),
    ("prepare-not-parquet", [*PREP, *TOK, "--source", "bad.parquet"],
     ["cannot read Parquet file bad.parquet", "check that it is a Parquet file"]),
    ("prepare-weight-not-a-number", [*PREP, *TOK, "--source", "c.jsonl@heavy"],
     ["weight 'heavy' is not a number", "--source [NAME=]INPUT[@WEIGHT]"]),
    ("prepare-weight-zero", [*PREP, *TOK, "--source", "c.jsonl@0"],
     ["weight 0.0 must be positive", "drop the source"]),
    ("prepare-duplicate-source-name", [*PREP, *TOK, "--source", "c.jsonl", "--source", "c.jsonl"],
     ["source name 'c' is used twice", "--source NAME=INPUT"]),
    ("prepare-val-fraction-out-of-range", [*PREP, *TOK, "--source", "c.jsonl", "--val-fraction", "1.5"],
     ["--val-fraction 1.5 is outside [0, 1)", "pass e.g. 0.005"]),
    ("prepare-no-tokenizer", [*PREP, "--source", "c.jsonl"],
     ["pass exactly one of --tokenizer DIR", "--train-tokenizer VOCAB_SIZE"]),
    ("prepare-tokenizer-too-small", [*PREP, "--source", "c.jsonl", "--train-tokenizer", "100"],
     ["--train-tokenizer 100 is too small", "use at least 258"]),
    ("prepare-tokenizer-dir-missing", [*PREP, "--source", "c.jsonl", "--tokenizer", "no-tokenizer"],
     ["tokenizer directory no-tokenizer does not exist", "--train-tokenizer VOCAB_SIZE"]),
    ("prepare-tokenizer-is-a-data-dir", [*PREP, "--source", "c.jsonl", "--tokenizer", "data"],
     ["data is a prepared data directory", "pass --tokenizer data/tokenizer"]),
    ("prepare-output-exists", ["prepare-data", "--source", "c.jsonl", "--out", "out-exists", *TOK],
     ["output out-exists already exists", "pass --force"]),
    ("prepare-output-not-creatable", ["prepare-data", "--source", "c.jsonl", "--out", "a-file/new", *TOK],
     ["cannot create the output a-file/new", "choose a writable --out"]),
    # train: what --print-config derives (the same derivation each rank makes before building the model)
    ("train-autoep-size-vs-experts", ["train", "--config", "debug", "--ds-config", "autoep2.json", "--nproc", "2",
                                      "--set", "model.num_experts=3", "--set", "data.path=data", "--print-config"],
     ["autoep_size (2) does not divide model.num_experts (3)", "choose an autoep_size that divides 3"]),
    ("train-eval-batches-replaced", ["train", "--config", "debug", "--set", "train.eval_batches=20",
                                     "--print-config"],
     ["'train.eval_batches' was replaced by train.eval_tokens", "set that instead"]),
    # data-info
    ("data-info-missing-dir", ["data-info", "no-data"], ["data directory no-data does not exist", "nitp prepare-data"]),
    ("data-info-not-a-data-dir", ["data-info", "emptydir"],
     ["emptydir is not a prepared data directory (no manifest.json)", "nitp prepare-data --out emptydir"]),
    ("data-info-on-a-file", ["data-info", "c.jsonl"],
     ["c.jsonl is a file, not a data directory", "prepare-data --out"]),
    ("data-info-truncated-shard", ["data-info", "data-truncated"],
     ["00000.bin has", "the manifest says", "re-run nitp prepare-data"]),
    ("data-info-verify-corrupted-shard", ["data-info", "data-flipped", "--verify"],
     ["00000.bin fails its sha256 checksum", "re-run nitp prepare-data"]),
    # convert and export
    ("convert-missing-source", ["convert", "no-run", "--out", "new"],
     ["no-run is not a directory", "pass a run directory"]),
    ("convert-not-a-checkpoint", ["convert", "data", "--out", "new"],
     ["data is not a checkpoint", "pass a run directory, its checkpoints/ directory"]),
    ("convert-latest-names-missing-tag", ["convert", "stale-latest", "--out", "new"],
     ["names tag 'global_step99'", "does not exist", "pass an existing checkpoints/global_stepN"]),
    ("convert-truncated-checkpoint", ["convert", "ckpt-truncated", "--out", "new"],
     ["zero_pp_rank_0_mp_rank_00_model_states.pt is truncated or corrupt", "use an earlier checkpoint"]),
    ("convert-corrupted-checkpoint", ["convert", "ckpt-crc", "--out", "new"],
     ["zero_pp_rank_0_mp_rank_00_model_states.pt is corrupt (bad CRC", "use an earlier checkpoint"]),
    ("convert-unknown-target", ["convert", "ckpt-meta", "--out", "new", "--to", "hf"],
     ["--to 'hf' is not a conversion target", "use 'safetensors' or 'universal'"]),
    ("convert-output-exists", ["convert", "ckpt-meta", "--out", "out-exists"],
     ["out-exists already exists", "pass --force"]),
    ("export-output-exists", ["export", "ckpt-meta", "--out", "out-exists"],
     ["out-exists already exists", "pass --force"]),
    ("export-unknown-dtype", ["export", "ckpt-meta", "--out", "new", "--dtype", "fp16"],
     ["--dtype 'fp16' is not supported for export", "use bf16 or fp32"]),
    ("export-tokenizer-missing", ["export", "ckpt-meta", "--out", "new", "--tokenizer", "no-tokenizer"],
     ["tokenizer directory no-tokenizer does not exist", "pass --tokenizer DIR"]),
    # eval
    ("eval-not-a-model-dir", ["eval", "data", "--data", "data"],
     ["data has no config.json", "pass a Hugging Face directory"]),
    ("eval-run-dir-without-checkpoints", ["eval", "run-dir", "--data", "data"],
     ["run-dir is not a checkpoint", "pass a run directory, its checkpoints/ directory"]),
    ("eval-batches-replaced", ["eval", "run-dir", "--data", "data", "--batches", "20"],
     ["--batches was replaced by --tokens", "pass e.g. --tokens 1000000"]),
    ("eval-data-missing", ["eval", "run-dir", "--data", "no-data"],
     ["data directory no-data does not exist", "nitp prepare-data"]),
    ("eval-out-is-a-directory", ["eval", "run-dir", "--data", "data", "--out", "emptydir"],
     ["--out emptydir is a directory", "path of the JSON file"]),
    # plot
    ("plot-missing-run", ["plot", "no-run"], ["no-run does not exist", "pass a run directory"]),
    ("plot-no-metrics", ["plot", "emptydir"], ["emptydir has no metrics.jsonl", "pass a run directory"]),
    ("plot-truncated-metrics-line", ["plot", "run-dir"],
     ["metrics.jsonl:2 is not valid JSON", "fix or delete that line"]),
    ("plot-out-is-a-file", ["plot", "run-dir", "--out", "a-file"], ["--out a-file is a file", "pass a directory"]),
    # demo
    ("demo-output-exists", ["demo", "--quick", "--out", "out-exists"],
     ["demo output out-exists already exists", "pass --force"]),
    ("demo-output-is-a-file", ["demo", "--quick", "--out", "a-file"],
     ["demo output a-file is a file", "pass --out a directory"]),
    ("demo-nproc-zero", ["demo", "--quick", "--out", "new", "--nproc", "0"], ["--nproc 0 must be at least 1"]),
    ("demo-steps-zero", ["demo", "--quick", "--out", "new", "--steps", "0"],
     ["--steps 0 must be at least 1", "omit it"]),
]

# A process of its own: `nitp train` up to where each rank joins its process group and checks its inputs.
PROCESS = [
    # recipe, --set and launch arguments: refused before the trainer is imported
    ("train-recipe-missing", ["train", "--config", "no-recipe.yaml"],
     ["recipe no-recipe.yaml does not exist", "bundled name (debug"]),
    ("train-recipe-not-yaml", ["train", "--config", "not-yaml.yaml"],
     ["recipe not-yaml.yaml is not valid YAML at line", "fix the syntax"]),
    ("train-unknown-key-in-recipe", ["train", "--config", "typo.yaml"],
     ["unknown key 'model.hiden_size'", "did you mean 'model.hidden_size'?"]),
    ("train-unknown-key-in-set", ["train", "--config", "debug", "--set", "optim.learning_rate=1e-3"],
     ["unknown key 'optim.learning_rate'", "valid keys: optim.lr"]),
    ("train-wrong-type-in-set", ["train", "--config", "debug", "--set", "train.steps=many"],
     ["train.steps must be an integer, got 'many'"]),
    ("train-target-layer-too-deep", ["train", "--config", "debug", "--set", "nitp.target_layer=4"],
     ["nitp.target_layer (4) must be in [0, 3]", "4-layer model"]),
    ("train-nproc-zero", ["train", "--config", "debug", "--nproc", "0"],
     ["--nproc 0 must be at least 1", "omit it"]),
    ("train-num-nodes-zero", ["train", "--config", "debug", "--num-nodes", "0"],
     ["--num-nodes 0 must be at least 1"]),
    ("train-hostfile-missing", ["train", "--config", "debug", "--hostfile", "no-hosts"],
     ["cannot read --hostfile no-hosts", "'host slots=N'"]),
    # usage errors from the argument parser (its hint names the command as it was started)
    ("usage-option-not-an-integer", ["train", "--config", "debug", "--nproc", "two"],
     ["Invalid value for '--nproc'", "see `python -m nitp_ds.cli train --help`"]),
    ("usage-missing-option", ["prepare-data", "--out", "new"],
     ["Missing option '--source'", "see `python -m nitp_ds.cli prepare-data --help`"]),
    # data, DeepSpeed config, run directory, checkpoint: refused by the trainer before it writes anything
    ("train-data-dir-missing", [*TRAIN, "--set", "data.path=no-data"],
     ["data directory no-data does not exist", "run `nitp prepare-data"]),
    ("train-ds-config-batch-contradicts-recipe", [*TRAIN, "--ds-config", "micro-batch.json"],
     ["train_micro_batch_size_per_gpu is 3 but train.micro_batch_size gives 4", "set it to \"auto\""]),
    ("train-out-dir-is-a-file", [*TRAIN, "--set", "train.out_dir=a-file"],
     ["train.out_dir a-file is a file", "choose another train.out_dir"]),
    ("train-resume-path-missing", [*TRAIN, "--resume", "no-checkpoint"],
     ["--resume no-checkpoint", "pass auto, never, a run directory"]),
    # the memory plan of a ~70B-parameter model: more host memory than any one machine here has
    ("train-memory-plan-does-not-fit", [*TRAIN, "--set", "model.hidden_size=8192", "--set", "model.num_layers=64",
                                        "--set", "model.moe_intermediate_size=8192"],
     ["the memory plan needs", "GiB of host memory per node (1 rank(s) ×", "but this node has", "use more nodes"]),
    ("train-offload-to-nvme", [*TRAIN, "--ds-config", "nvme.json"],
     ["zero_optimization.offload_optimizer.device is 'nvme'", "set it to \"cpu\" or \"none\""]),
]


@pytest.mark.parametrize("args, keywords", [row[1:] for row in HERE], ids=[row[0] for row in HERE])
def test_bad_input_exits_2_with_one_line_and_leaves_files_alone(scratch, args, keywords, monkeypatch, capfd):
    refuse_in_process(scratch, args, keywords, monkeypatch, capfd)


@pytest.mark.parametrize("args, keywords", [row[1:] for row in PROCESS], ids=[row[0] for row in PROCESS])
def test_bad_train_input_exits_2_with_one_line_and_leaves_files_alone(scratch, args, keywords):
    refuse(scratch, args, *keywords)


def test_offload_without_the_cpu_adam_op_is_refused(scratch, tmp_path):
    """ZeRO-Offload's step needs DeepSpeed's compiled cpu_adam op. Here its build fails, as on a machine without a
    compiler: a `ninja` first on PATH fails in cpu_adam's build directory (torch's JIT loader runs ninja there
    even when the op is cached) and runs the real one elsewhere (gloo's shared-memory op stays cached). One line
    naming the op and the ways out; DeepSpeed's extension cache is not the user's output and may change."""
    from deepspeed.git_version_info import installed_ops

    if installed_ops.get("cpu_adam"):
        pytest.skip("this DeepSpeed install has cpu_adam prebuilt: nothing is missing")
    real = shutil.which("ninja")
    assert real, "torch's JIT loader needs ninja on PATH"
    (tmp_path / "ninja").write_text(f'#!/bin/sh\ncase "$PWD" in *cpu_adam*) echo "no compiler" >&2; exit 1;; esac\n'
                                    f'exec {real} "$@"\n')
    (tmp_path / "ninja").chmod(0o755)
    offload = str(Path(DS_CONFIG).parent / "zero3_moe_offload.json")
    before = snapshot(scratch)
    env = child_env()
    env["PATH"] = f"{tmp_path}:{env['PATH']}"
    result = subprocess.run([*NITP, *TRAIN, "--ds-config", offload], cwd=scratch, capture_output=True, text=True,
                            env=env, timeout=300)
    check_refusal(result.returncode, result.stdout, result.stderr,
                  ("needs DeepSpeed's cpu_adam op", "install a C++ compiler", "DS_BUILD_CPU_ADAM=1",
                   '"zero_force_ds_cpu_optimizer": false'))
    assert snapshot(scratch) == before, "the refused command changed files"


def test_the_installed_command_refuses_like_main(scratch):
    """The in-process rows above, spot-checked as processes of their own: the same line, the same exit code."""
    for name in ("prepare-missing-input", "plot-out-is-a-file"):
        _, args, keywords = next(row for row in HERE if row[0] == name)
        refuse(scratch, args, *keywords)


def test_resume_from_what_is_not_a_complete_checkpoint(scratch):
    """`--resume PATH` is resolved by `explicit_resume` before the run directory is written (PROCESS row above)."""
    from nitp_ds.checkpoint.state import explicit_resume
    from nitp_ds.errors import NITPError

    with pytest.raises(NITPError, match=r"data is not a checkpoint: .*global_stepN directory written by nitp train"):
        explicit_resume(str(scratch / "data"))
    with pytest.raises(NITPError, match=r"global_step5 is incomplete .*use an earlier global_stepN"):
        explicit_resume(str(scratch / "torn" / "checkpoints" / "global_step5"))
    assert explicit_resume("auto") is None and explicit_resume("never") is None


def test_run_dir_that_is_not_a_run_is_refused(scratch):
    from nitp_ds.config import load_config
    from nitp_ds.errors import NITPError
    from nitp_ds.trainer import prepare_run_dir

    with pytest.raises(NITPError, match="out-exists exists and is not an nitp run directory; .*pass --force"):
        prepare_run_dir(load_config(), scratch / "out-exists", force=False)


def test_eval_data_with_a_larger_vocabulary_than_the_model(scratch, tmp_path, monkeypatch, capfd):
    from nitp_ds.config import ModelConfig
    from nitp_ds.models import build_model

    model = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4,
                        experts_per_token=2, moe_intermediate_size=16, intermediate_size=64, max_seq_len=64)
    build_model(model, vocab_size=100).save_pretrained(tmp_path / "hf")
    refuse_in_process(scratch, ["eval", str(tmp_path / "hf"), "--data", "data"],
                      ["vocabulary of 300 tokens", "has 100", "evaluate on data prepared with the model's tokenizer"],
                      monkeypatch, capfd)


def test_eval_of_a_cut_safetensors_file(scratch, tmp_path, monkeypatch, capfd):
    """A model directory copied in part: one line naming the file, before the model is built (was a traceback)."""
    from nitp_ds.config import ModelConfig
    from nitp_ds.models import build_model

    model = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4,
                        experts_per_token=2, moe_intermediate_size=16, intermediate_size=64, max_seq_len=64)
    build_model(model, vocab_size=300).save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    whole = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: whole // 2])
    refuse_in_process(scratch, ["eval", str(tmp_path / "hf"), "--data", "data"],
                      [f"checkpoint file {weights} is truncated or corrupt: {whole // 2} bytes, its safetensors "
                       f"header describes {whole}", "copy it again or re-run `nitp convert`/`nitp export`"],
                      monkeypatch, capfd)
