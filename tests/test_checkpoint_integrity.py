"""The checkpoint verifier on real files: torch.save archives and safetensors written here, then cut short,
changed by one byte or removed. (Real `nitp train` checkpoints: tests/test_reliability.py.)"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nitp_ds.checkpoint import integrity
from nitp_ds.errors import NITPError

MODEL = "zero_pp_rank_{}_mp_rank_00_model_states.pt"
OPTIM = "bf16_zero_pp_rank_{}_mp_rank_00_optim_states.pt"


def save_two_ranks(tag_dir: Path, *, records: bool = True) -> Path:
    """A checkpoint as two ranks leave it: each rank's torch.save files, then nitp_meta.json with every file's
    record."""
    tag_dir.mkdir(parents=True)
    for rank in (0, 1):
        torch.save({"module": {"w": torch.arange(2048.0) + rank}}, tag_dir / MODEL.format(rank))
        torch.save({"state": torch.randn(4096, generator=torch.Generator().manual_seed(rank))},
                   tag_dir / OPTIM.format(rank))
    meta = {"step": 3, "complete": True}
    if records:
        meta["files"] = {p.name: integrity.file_record(p) for p in integrity.checkpoint_files(tag_dir)}
    (tag_dir / "nitp_meta.json").write_text(json.dumps(meta))
    return tag_dir


def cut(path: Path, keep: int | None = None) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2 if keep is None else keep])


def flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_crc32_is_zlibs_over_the_whole_file_read_in_chunks(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    payload = bytes(range(256)) * 1000 + b"tail"
    path.write_bytes(payload)
    monkeypatch.setattr(integrity, "CHUNK_BYTES", 4096)  # 63 chunks, the last one partial
    assert integrity.crc32_of(path) == f"{zlib.crc32(payload):08x}"
    assert integrity.file_record(path) == {"bytes": len(payload), "crc32": f"{zlib.crc32(payload):08x}"}


def test_each_file_belongs_to_the_rank_in_its_name():
    assert integrity.writer_rank("zero_pp_rank_3_mp_rank_00_model_states.pt", 4) == 3
    assert integrity.writer_rank("bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", 4) == 1
    assert integrity.writer_rank("expp_rank_5_mp_rank_00_optim_states.pt", 4) == 1  # another world size: modulo
    assert integrity.writer_rank("mp_rank_00_model_states.pt", 4) == 0


def test_the_records_name_every_file_with_its_size(tmp_path):
    tag = save_two_ranks(tmp_path / "global_step3")
    records = integrity.recorded_files(tag)
    assert sorted(records) == sorted([MODEL.format(0), OPTIM.format(0), MODEL.format(1), OPTIM.format(1)])
    assert records[OPTIM.format(1)]["bytes"] == (tag / OPTIM.format(1)).stat().st_size


def test_an_intact_checkpoint_has_no_damage(tmp_path):
    tag = save_two_ranks(tmp_path / "global_step3")
    assert integrity.find_damage(tag) is None
    integrity.check_intact(tag)


def test_a_truncated_file_is_named_with_both_sizes(tmp_path):
    tag = save_two_ranks(tmp_path / "global_step3")
    whole = (tag / OPTIM.format(1)).stat().st_size
    cut(tag / OPTIM.format(1), 1000)
    damage = integrity.find_damage(tag)
    assert damage == f"{tag / OPTIM.format(1)} is truncated or corrupt: 1000 bytes, {whole} when it was saved"
    # The size is checked by every rank (a stat), so every rank finds a cut file, not only the one that reads it.
    assert integrity.find_damage(tag, rank=0, world_size=2) == damage
    with pytest.raises(NITPError, match="use an earlier checkpoint") as info:
        integrity.check_intact(tag)
    assert str(info.value).startswith(f"checkpoint file {tag / OPTIM.format(1)} is truncated") and "\n" not in str(
        info.value)


def test_a_changed_byte_fails_the_checksum_of_the_rank_that_reads_the_file(tmp_path):
    tag = save_two_ranks(tmp_path / "global_step3")
    recorded = integrity.recorded_files(tag)[MODEL.format(1)]["crc32"]
    flip(tag / MODEL.format(1))
    damage = integrity.find_damage(tag)
    assert damage.startswith(f"{tag / MODEL.format(1)} is corrupt: its CRC-32 is ")
    assert damage.endswith(f", {recorded} when it was saved")
    assert integrity.find_damage(tag, rank=1, world_size=2) == damage
    assert integrity.find_damage(tag, rank=0, world_size=2) is None  # rank 0 reads only rank 0's files


def test_a_missing_file_is_named(tmp_path):
    tag = save_two_ranks(tmp_path / "global_step3")
    (tag / MODEL.format(0)).unlink()
    assert integrity.find_damage(tag) == f"{tag / MODEL.format(0)} is missing (nitp_meta.json lists it)"


def test_without_records_torch_files_are_checked_by_their_zip_crcs(tmp_path):
    tag = save_two_ranks(tmp_path / "global_step3", records=False)
    assert integrity.find_damage(tag) is None
    cut(tag / OPTIM.format(0))
    assert integrity.find_damage(tag).startswith(f"{tag / OPTIM.format(0)} is truncated or corrupt (")
    tag = save_two_ranks(tmp_path / "other", records=False)
    flip(tag / OPTIM.format(1))
    assert integrity.find_damage(tag) == f"{tag / OPTIM.format(1)} is corrupt (bad CRC in " \
        f"{OPTIM.format(1)[:-3]}/data/0)"


def test_records_of_sizes_alone_are_checked_by_size_and_zip_crcs(tmp_path):
    """Records without CRC-32s (an earlier nitp-ds added them after the save, in a thread that a kill could stop):
    a cut file is named by its sizes, a changed byte by the zip archive's own CRC."""
    tag = save_two_ranks(tmp_path / "global_step3", records=False)
    meta = json.loads((tag / "nitp_meta.json").read_text())
    meta["files"] = {p.name: {"bytes": p.stat().st_size} for p in integrity.checkpoint_files(tag)}
    (tag / "nitp_meta.json").write_text(json.dumps(meta))
    assert integrity.find_damage(tag) is None
    flip(tag / OPTIM.format(1))
    assert integrity.find_damage(tag, rank=1, world_size=2) == f"{tag / OPTIM.format(1)} is corrupt (bad CRC in " \
        f"{OPTIM.format(1)[:-3]}/data/0)"
    size = (tag / MODEL.format(0)).stat().st_size
    cut(tag / MODEL.format(0))
    assert integrity.find_damage(tag, checksums=False) == f"{tag / MODEL.format(0)} is truncated or corrupt: " \
        f"{size // 2} bytes, " \
        f"{size} when it was saved"


def test_a_file_of_nitp_without_its_record_is_checked_by_its_zip_structure(tmp_path):
    """nitp-ds writes torch.save files without zip CRCs (its records hold the file's CRC-32): without a record
    such a file passes while whole, and a cut one is still named."""
    from nitp_ds.checkpoint.background import write_file

    path = tmp_path / MODEL.format(0)
    write_file({"module": {"w": torch.arange(4096.0)}}, path)
    assert integrity.unrecorded_problem(path) is None
    cut(path)
    assert integrity.unrecorded_problem(path).startswith("is truncated or corrupt (")


def test_a_safetensors_file_is_checked_against_its_header(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(300), "b": torch.ones(10, 10)}, str(path))
    whole = path.stat().st_size
    integrity.check_file(path, None)
    cut(path)
    with pytest.raises(NITPError) as info:
        integrity.check_file(path, None, fix="re-run nitp export")
    assert str(info.value) == (f"checkpoint file {path} is truncated or corrupt: {whole // 2} bytes, its "
                               f"safetensors header describes {whole}; re-run nitp export")
    cut(path, 5)
    assert "too short for its safetensors header" in integrity.file_problem(path, None)


def test_newest_intact_skips_damaged_checkpoints_with_one_warning_each(tmp_path):
    old = save_two_ranks(tmp_path / "global_step3")
    new = save_two_ranks(tmp_path / "global_step6")
    cut(new / MODEL.format(0))
    warnings: list[str] = []
    assert integrity.newest_intact([new, old], integrity.find_damage, warn=warnings.append) == old
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith("warning: skipping damaged checkpoint global_step6: ")
    assert MODEL.format(0) in warnings[0]
    assert integrity.newest_intact([], integrity.find_damage) is None


def test_when_every_checkpoint_is_damaged_nothing_is_started_afresh(tmp_path):
    old = save_two_ranks(tmp_path / "global_step3")
    new = save_two_ranks(tmp_path / "global_step6")
    cut(old / OPTIM.format(1))
    cut(new / OPTIM.format(1))
    with pytest.raises(NITPError, match="every complete checkpoint under .* is damaged .*global_step6.*--resume never"):
        integrity.newest_intact([new, old], integrity.find_damage, warn=lambda _: None)
