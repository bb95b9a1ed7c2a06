"""A ZeRO-3 (+ AutoEP) checkpoint → DeepSpeed's universal checkpoint, one parameter at a time.

Writes what DeepSpeed 0.19.8's `ds_to_universal` writes for a ZeRO-3 checkpoint (its stage-3 branch of `main`),
file for file (`tests/test_convert_export.py` compares the two outputs tensor by tensor):
    zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt   the whole parameter: flat for the others, and for an AutoEP expert
                                                 parameter {'param': [E, ...], 'cat_dim': 0, 'is_expert_param': True,
                                                 'ep_num_experts': E}
    zero/optimizer_state.pt                      rank 0's optimizer state with `param_groups` at the top
    zero_pp_rank_R_mp_rank_00_model_states.pt    every rank's, with AutoEP's layers and expert-name pattern added
                                                 to `universal_checkpoint_info`
    ../latest_universal                          beside the output directory, naming it
`ds_to_universal` loads every rank's optim file whole, several times (for the experts, all ranks at once: the 5.8x
the fp32 weights measured in the scale issue); here the parameters come from `partitions.ZeroCheckpoint`, memory-
mapped, so the peak is one parameter with its moments read one at a time — plus rank 0's optimizer state for
`optimizer_state.pt`, which DeepSpeed's universal loader reads whole on every rank anyway.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from nitp_ds.checkpoint.partitions import MODEL_STATES_RE, STATES, ZeroCheckpoint, rank_files

EXPERT_NAME_PATTERN = r".*\.experts\.w[123]$"  # the pattern ds_to_universal records for AutoEP's expert weights


def write_universal(partitions: ZeroCheckpoint, out: Path) -> None:
    """Writes the universal form of the checkpoint `partitions` reads into `out` (a global_stepN directory)."""
    zero = out / "zero"
    for name in partitions.shapes:
        (zero / name).mkdir(parents=True)
        for state in STATES:
            torch.save(_universal_entry(partitions, name, state), zero / name / f"{state}.pt")
    partitions.release()
    _write_optimizer_state(partitions.optim_files[0], zero / "optimizer_state.pt")
    autoep = bool(partitions.experts)
    for path in rank_files(partitions.ckpt, MODEL_STATES_RE).values():
        if not autoep:
            shutil.copy2(path, out)
            continue
        state = torch.load(path, map_location="cpu", weights_only=False)  # no weights under ZeRO-3: small
        info = state.setdefault("universal_checkpoint_info", {})
        info["expert_parameter_patterns"] = [EXPERT_NAME_PATTERN]
        info["ds_autoep_layers"] = state.get("ds_autoep_layers")
        torch.save(state, out / path.name)
    (out.parent / "latest_universal").write_text(out.name)


def _universal_entry(partitions: ZeroCheckpoint, name: str, state: str):
    tensor = partitions.read(name, state)
    # ds_to_universal cuts the fp32 weights from the optimizer's flat groups, leaves that require grad, and saves
    # them so; the same flag here keeps the two outputs the same to the last field.
    tensor.requires_grad_(state == "fp32")
    if not partitions.is_expert(name):
        return tensor.reshape(-1)
    return {"param": tensor, "cat_dim": 0, "is_expert_param": True,
            "ep_num_experts": int(partitions.experts[name].layer_info["num_experts"])}


def _write_optimizer_state(rank0_optim: Path, target: Path) -> None:
    state = torch.load(rank0_optim, map_location="cpu", weights_only=False, mmap=True)["optimizer_state_dict"]
    state["param_groups"] = state["optimizer_state_dict"]["param_groups"]
    torch.save(state, target)
