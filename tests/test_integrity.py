"""Integrity: a shard, manifest or checkpoint that changed since kdcli wrote it is refused in one `error:` line
naming it (and nothing the command would write is written), an unchanged copy is accepted, `data_hash_matches`
compares the bytes evaluate read, and `--resume` continues only the very run it interrupted."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import h5py
import polars as pl
import pytest
import torch
from conftest import FAST, kdcli_run
from test_prepare_multieye import assert_one_line_error

PIXELS = ("fundus", "oct")


def copy_of(shards: Path, tmp_path: Path, name: str = "copy") -> Path:
    target = tmp_path / name
    shutil.copytree(shards, target)  # copy2: sizes and mtimes kept, as `cp -a` and rsync -a keep them
    return target


def first_shard(root: Path, split: str = "test", modality: str = "oct") -> Path:
    return root / "shards" / f"{split}-{modality}-00000.h5"


# ------------------------------------------------------------------ ways a dataset goes wrong after prepare


def invert_pixels(root: Path) -> str:
    shard = first_shard(root)
    with h5py.File(shard, "r+") as handle:
        handle["oct"][0] = 255 - handle["oct"][0]
    return shard.name


def flip_label_in_shard(root: Path) -> str:
    shard = first_shard(root)
    with h5py.File(shard, "r+") as handle:
        handle["label"][0] = (int(handle["label"][0]) + 1) % 9
    return shard.name


def relabel_manifest(root: Path) -> str:
    manifest = pl.read_parquet(root / "manifest.parquet")
    first = manifest["label"].to_list()
    first[0] = (first[0] + 1) % 9
    manifest.with_columns(pl.Series("label", first)).write_parquet(root / "manifest.parquet")
    return "dataset.json"


def delete_shard(root: Path) -> str:
    first_shard(root).unlink()
    return first_shard(root).name


def truncate_shard(root: Path) -> str:
    shard = first_shard(root)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return shard.name


def swap_in_another_shard(root: Path) -> str:
    shutil.copyfile(first_shard(root, "dev"), first_shard(root))  # a shard of the same shape, another content
    return first_shard(root).name


def reseal_a_changed_shard(root: Path) -> str:
    """Pixels edited and the shard's own digest attribute recomputed to match: fingerprints.json still knows."""
    from kdcli.shards.integrity import recompute_digest

    shard = first_shard(root)
    invert_pixels(root)
    digest, _ = recompute_digest(shard)
    with h5py.File(shard, "r+") as handle:
        handle.attrs["digest"] = digest
    return shard.name


CORRUPTIONS: dict[str, tuple[Callable[[Path], str], str]] = {
    "inverted pixels": (invert_pixels, "differs from its recorded digest"),
    "label changed in a shard": (flip_label_in_shard, "differs from its recorded digest"),
    "manifest edited": (relabel_manifest, "content_hash"),
    "shard deleted": (delete_shard, "missing"),
    "shard truncated": (truncate_shard, "unreadable shard"),
    "shard swapped": (swap_in_another_shard, "digest"),
    "digest attribute forged": (reseal_a_changed_shard, "fingerprints.json"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
@pytest.mark.parametrize("command", ["teach", "evaluate", "inspect"])
def test_a_changed_dataset_is_refused_by_every_reader(multieye_shards, oct_teacher, tmp_path, corruption, command):
    data = copy_of(multieye_shards, tmp_path)
    corrupt, needle = CORRUPTIONS[corruption]
    named = corrupt(data)
    before = oct_teacher.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    if command == "teach":
        result = kdcli_run("teach", "--data", data, "--out", out / "oct.pt", "--modality", "oct", *FAST, ok=False)
    elif command == "evaluate":
        result = kdcli_run("evaluate", oct_teacher, "--data", data, "--figure", out / "cm.png", ok=False)
    else:
        result = kdcli_run("inspect", data, ok=False)
    assert_one_line_error(result, named, needle)
    assert not list(out.iterdir())  # nothing written: no checkpoint, config, metrics or figure
    assert oct_teacher.read_bytes() == before


def restore_time(path: Path, edit: Callable[[], None]) -> None:
    stat = path.stat()
    edit()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.parametrize("command", ["evaluate", "inspect --verify"])
def test_an_edit_that_keeps_size_and_time_is_caught_where_the_bytes_matter(multieye_shards, oct_teacher, tmp_path,
                                                                          command):
    """Size + mtime is the cheap check on open; evaluate re-hashes the split it scores and inspect --verify all of
    them, so an edit that restored the file's time is still caught there."""
    data = copy_of(multieye_shards, tmp_path)
    shard = first_shard(data)
    restore_time(shard, lambda: invert_pixels(data))
    if command == "evaluate":
        result = kdcli_run("evaluate", oct_teacher, "--data", data, "--split", "test", "--figure", tmp_path / "cm.png",
                           ok=False)
        assert not (tmp_path / "cm.png").exists()
    else:
        result = kdcli_run("inspect", data, "--verify", ok=False)
    assert_one_line_error(result, shard.name, "differs from its recorded digest")


def test_inspect_verify_rehashes_a_manifest_edited_with_its_time_restored(multieye_shards, tmp_path):
    data = copy_of(multieye_shards, tmp_path)
    restore_time(data / "manifest.parquet", lambda: relabel_manifest(data))
    assert_one_line_error(kdcli_run("inspect", data, "--verify", ok=False), "dataset.json", "content_hash")


def test_a_copy_without_times_is_rehashed_once_then_fingerprinted_by_verify(multieye_shards, tmp_path):
    from kdcli.shards.integrity import FINGERPRINTS

    data = tmp_path / "plain-copy"
    shutil.copytree(multieye_shards, data, copy_function=shutil.copyfile)  # new mtimes, same bytes
    first = kdcli_run("inspect", data, "--json")
    assert "re-hashed and match" in first.stderr and "inspect --verify" in first.stderr
    verified = kdcli_run("inspect", data, "--verify", "--json", ok=False)
    assert verified.exit_code == 0 and json.loads(verified.stdout)["fingerprints_recorded"] is True
    recorded = json.loads((data / FINGERPRINTS).read_text())["shards"]
    shard = sorted((data / "shards").glob("*.h5"))[0]
    assert recorded[shard.name]["mtime_ns"] == shard.stat().st_mtime_ns
    from kdcli.shards import integrity

    integrity.clear_process_cache()
    again = kdcli_run("inspect", data, "--json", ok=False)
    assert again.exit_code == 0 and "re-hashed" not in again.stderr


def test_a_dataset_without_fingerprints_opens_after_a_full_check(multieye_shards, tmp_path):
    data = copy_of(multieye_shards, tmp_path)
    (data / "fingerprints.json").unlink()  # as an older kdcli wrote it
    result = kdcli_run("inspect", data, "--json")
    assert "no fingerprints.json" in result.stderr
    invert_pixels(data)
    assert_one_line_error(kdcli_run("inspect", data, ok=False), first_shard(data).name, "digest")


# ------------------------------------------------------------------ checkpoints


def flip_tensor_bytes(path: Path) -> None:
    """XOR 64 bytes in the middle of the largest tensor record of the torch zip (not its pickle or its header)."""
    info = max(zipfile.ZipFile(path).infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_length + extra_length + info.file_size // 2
    for offset in range(64):
        data[start + offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("command", ["evaluate", "explain", "distill"])
def test_a_checkpoint_with_flipped_tensor_bytes_is_refused(multieye_shards, oct_teacher, tmp_path, command):
    damaged = tmp_path / "oct.pt"
    shutil.copyfile(oct_teacher, damaged)
    flip_tensor_bytes(damaged)
    out = tmp_path / "out"
    if command == "evaluate":
        result = kdcli_run("evaluate", damaged, "--data", multieye_shards, "--figure", out / "cm.png", ok=False)
    elif command == "explain":
        result = kdcli_run("explain", damaged, "--data", multieye_shards, "--out", out, "--count", "2", ok=False)
    else:
        result = kdcli_run("distill", "--data", multieye_shards, "--teacher", damaged, "--student", "fundus",
                           "--method", "coda", "--out", out / "s.pt", *FAST, ok=False)
    assert_one_line_error(result, str(damaged), "digest")
    assert not out.exists() or not list(out.iterdir())


def test_a_checkpoint_from_before_digests_still_loads_with_a_note(multieye_shards, oct_teacher, tmp_path):
    payload = torch.load(oct_teacher, map_location="cpu", weights_only=True)
    del payload["digest"]
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    result = kdcli_run("evaluate", old, "--data", multieye_shards, "--figure", tmp_path / "cm.png", "--json")
    assert "predates checkpoint digests" in result.stderr


def test_a_teacher_is_recorded_by_the_sha256_of_its_file_bytes(fundus_student, oct_teacher):
    """The record `--resume` and the teacher cache compare: sha256sum's digest of the whole file."""
    import hashlib

    from kdcli.engine.checkpoint import load_checkpoint

    whole = "sha256:" + hashlib.sha256(oct_teacher.read_bytes()).hexdigest()
    assert oct_teacher.stat().st_size > 1 << 20  # more than one read block
    assert load_checkpoint(fundus_student).meta["teacher"]["sha256"] == whole


# slow: a second prepare and two evaluates; the integrity checks on open stay fast above
@pytest.mark.slow
def test_data_hash_matches_compares_the_data_read(multieye_raw, multieye_shards, oct_teacher, tmp_path):
    same = kdcli_run("evaluate", oct_teacher, "--data", copy_of(multieye_shards, tmp_path), "--json",
                     "--figure", tmp_path / "a.png")
    assert json.loads(same.stdout)["data_hash_matches"] is True
    other = tmp_path / "median"  # the same images, filtered: other bytes, same classes and modalities
    kdcli_run("prepare", "multieye", multieye_raw, "--out", other, "--size", "32", "--median", "3")
    result = kdcli_run("evaluate", oct_teacher, "--data", other, "--json", "--figure", tmp_path / "b.png")
    assert json.loads(result.stdout)["data_hash_matches"] is False


# ------------------------------------------------------------------ --resume of another run


@pytest.fixture(scope="module")
def interrupted(multieye_shards, tmp_path_factory) -> Path:
    """A teach run's outputs (best, .last.pt, config.json) to resume."""
    out = tmp_path_factory.mktemp("resume") / "oct.pt"
    kdcli_run("teach", "--data", multieye_shards, "--modality", "oct", "--out", out, *FAST)
    return out


def outputs(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out.parent.iterdir()) if path.name.startswith("oct")}


@pytest.mark.parametrize(("change", "needles"), [
    (["--model", "test_efficientnet"], ("--model test_efficientnet", "test_resnet")),
    (["--modality", "fundus"], ("--modality fundus", "oct")),
    (["--lr", "0.01"], ("--lr 0.01", "0.003")),
    (["--batch-size", "8"], ("--batch-size 8", "16")),
    (["--set", "ema=0.9"], ("--ema 0.9",)),
    (["--set", "weight_decay=0.5"], ("--weight-decay 0.5",)),
    (["--data", "OTHER"], ("holds other data", "content hash")),
])
def test_resume_of_another_run_is_refused_naming_what_differs(interrupted, multieye_raw, tmp_path, change, needles):
    if "OTHER" in change:
        other = tmp_path / "other"
        kdcli_run("prepare", "multieye", multieye_raw, "--out", other, "--size", "32", "--median", "3")
        change = ["--data", str(other)]
    config = json.loads(interrupted.with_name("oct.config.json").read_text())
    args = ["--data", config["data"], "--modality", "oct", "--out", interrupted, *FAST, "--resume"]
    for flag, value in zip(change[::2], change[1::2], strict=True):
        index = args.index(flag) if flag in args else -1
        if index >= 0:
            args[index + 1] = value
        else:
            args += [flag, value]
    before = outputs(interrupted)
    result = kdcli_run("teach", *args, ok=False)
    assert_one_line_error(result, "oct.last.pt", "--resume of another run", *needles)
    assert outputs(interrupted) == before  # config.json still says what the checkpoints were trained with


def test_resume_may_change_where_the_run_goes(interrupted):
    config = json.loads(interrupted.with_name("oct.config.json").read_text())
    args = ["--data", config["data"], "--modality", "oct", "--out", interrupted, *FAST, "--resume"]
    args[args.index("--workers") + 1] = "1"
    result = kdcli_run("teach", *args)
    assert "resuming at epoch" in result.output

