"""prepare / inspect on MultiEYE phantoms: format, quirks, resume, refusal to damage earlier output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import polars as pl
import pytest
from conftest import kdcli_run

from kdcli.errors import KdcliError
from kdcli.prepare import PrepareOptions, prepare
from kdcli.shards.format import DERIVED_COLUMNS, MANIFEST_COLUMNS


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def read_list(path: Path) -> list[tuple[str, int]]:
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            name, label = line.strip().split("\t") if "\t" in line else line.rsplit(None, 1)
            rows.append((name.strip(), int(label)))
    return rows


def test_shards_match_the_lists_and_plain_h5py_reads_them(multieye_raw, multieye_shards):
    meta = json.loads((multieye_shards / "dataset.json").read_text())
    assert meta["schema_version"] == 1 and meta["source"] == "multieye" and meta["pairing"] == "unpaired"
    assert meta["classes"] == ["NOR", "AMD", "CSC", "DR", "GLC", "MEM", "MYO", "RVO", "WAMD"]
    assert meta["modalities"] == {"fundus": {"shape": [32, 32, 3], "dtype": "uint8"},
                                  "oct": {"shape": [32, 32, 1], "dtype": "uint8"}}
    assert meta["content_hash"].startswith("sha256:") and meta["prepare"]["size"] == 32
    manifest = pl.read_parquet(multieye_shards / "manifest.parquet")
    assert tuple(manifest.columns) == MANIFEST_COLUMNS + DERIVED_COLUMNS
    for modality, folder in (("fundus", "assemble"), ("oct", "assemble_oct")):
        for split in ("train", "dev", "test"):
            listed = read_list(multieye_raw / folder / split / "large9cls.txt")
            rows = manifest.filter((pl.col("modality") == modality) & (pl.col("split") == split))
            assert sorted(rows["id"].to_list()) == sorted(f"{modality}:{name}" for name, _ in listed)
            assert dict(zip(rows["id"], rows["label"], strict=True)) == {
                f"{modality}:{n}": label for n, label in listed}
            assert meta["counts"][modality][split] == len(listed)
    row = manifest.row(0, named=True)
    with h5py.File(multieye_shards / "shards" / row["shard"], "r") as handle:
        modality = row["modality"]
        assert handle[modality].chunks == (1, 32, 32, meta["modalities"][modality]["shape"][2])
        assert handle[modality].dtype == np.uint8
        assert handle["id"][row["index"]].decode() == row["id"]
        assert handle["label"][row["index"]] == row["label"]
        assert handle.attrs["complete"] == 1


def test_stored_pixels_come_from_the_raw_image(multieye_raw, multieye_shards):
    import cv2

    manifest = pl.read_parquet(multieye_shards / "manifest.parquet")
    row = manifest.filter(pl.col("modality") == "fundus").row(0, named=True)
    name = row["id"].split(":", 1)[1]
    raw = cv2.imread(str(multieye_raw / "assemble/train/ImageData/cfp-clahe-224x224" / f"{name}.png"))
    with h5py.File(multieye_shards / "shards" / row["shard"], "r") as handle:
        stored = handle["fundus"][row["index"]]
    if raw.shape[:2] == (32, 32):
        assert np.array_equal(stored, cv2.cvtColor(raw, cv2.COLOR_BGR2RGB))  # RGB order, untouched pixels


def test_inspect_json_and_verify(multieye_shards):
    result = kdcli_run("inspect", multieye_shards, "--json", "--verify")
    report = json.loads(result.stdout)
    assert report["verified"] is True and report["samples"] == 90
    assert sum(report["per_class"]["oct"]["train"].values()) == report["counts"]["oct"]["train"]
    human = kdcli_run("inspect", multieye_shards, ok=False)
    assert human.exit_code == 0 and "WAMD" in human.output and "sha256:" in human.output


def test_verify_catches_a_modified_shard(multieye_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(multieye_shards, copy)
    shard = sorted((copy / "shards").glob("*.h5"))[0]
    with h5py.File(shard, "r+") as handle:
        modality = next(k for k in handle if k not in ("id", "label"))
        handle[modality][0] = 255 - handle[modality][0]
    assert_one_line_error(kdcli_run("inspect", copy, "--verify", ok=False), shard.name, "digest")


def test_workers_and_shard_size_do_not_change_content(multieye_raw, multieye_shards, tmp_path):
    result = kdcli_run("prepare", "multieye", multieye_raw, "--out", tmp_path / "par", "--size", "32",
                       "--workers", "2", "--shard-size", "16")
    assert "tab-separated" in result.output  # the OCT test list quirk is reported, and handled
    same = json.loads((tmp_path / "par" / "dataset.json").read_text())["content_hash"]
    assert same == json.loads((multieye_shards / "dataset.json").read_text())["content_hash"]


def test_existing_output_is_refused_then_replaced_only_on_success(multieye_raw, tmp_path):
    out = tmp_path / "out"
    kdcli_run("prepare", "multieye", multieye_raw, "--out", out, "--size", "16")
    before = (out / "dataset.json").read_bytes()
    assert_one_line_error(kdcli_run("prepare", "multieye", multieye_raw, "--out", out, "--size", "16", ok=False),
                          "exists", "--overwrite")
    broken = tmp_path / "broken"
    shutil.copytree(multieye_raw, broken)
    (broken / "assemble" / "dev" / "large9cls.txt").unlink()
    assert_one_line_error(kdcli_run("prepare", "multieye", broken, "--out", out, "--overwrite", "--size", "16",
                                    ok=False),
                          "large9cls.txt")
    assert (out / "dataset.json").read_bytes() == before  # old dataset untouched by the failed overwrite
    kdcli_run("prepare", "multieye", multieye_raw, "--out", out, "--overwrite", "--size", "24")
    assert json.loads((out / "dataset.json").read_text())["prepare"]["size"] == 24


def test_crash_leaves_no_complete_looking_output_and_resume_reuses_shards(multieye_raw, tmp_path,
                                                                           monkeypatch):
    from kdcli.sources.multieye import MultiEyeSource

    out = tmp_path / "shards"
    original = MultiEyeSource.load
    calls = {"n": 0}

    def flaky(self, record, size):
        calls["n"] += 1
        if calls["n"] > 40:
            raise KdcliError("simulated crash", path=record.files[next(iter(record.files))])
        return original(self, record, size)

    monkeypatch.setattr(MultiEyeSource, "load", flaky)
    with pytest.raises(KdcliError):
        prepare(PrepareOptions(source="multieye", raw=multieye_raw, out=out, size=16, shard_size=8))
    assert not out.exists()
    partial = Path(str(out) + ".partial")
    finished = sorted(p.name for p in (partial / "shards").glob("*.h5"))
    assert finished and not list((partial / "shards").glob(".*.tmp"))
    assert not (partial / "dataset.json").exists()
    assert_one_line_error(kdcli_run("inspect", out, ok=False), "--resume")

    monkeypatch.setattr(MultiEyeSource, "load", original)
    result = prepare(PrepareOptions(source="multieye", raw=multieye_raw, out=out, size=16, shard_size=8,
                                    resume=True))
    assert result.reused == len(finished) and result.written > 0 and not partial.exists()
    fresh = prepare(PrepareOptions(source="multieye", raw=multieye_raw, out=tmp_path / "fresh", size=16,
                                   shard_size=8))
    assert result.meta.content_hash == fresh.meta.content_hash


def test_resume_with_other_arguments_is_refused(multieye_raw, tmp_path):
    out = tmp_path / "shards"
    partial = Path(str(out) + ".partial")
    partial.mkdir()
    (partial / "plan.json").write_text(json.dumps({"size": 999}))
    assert_one_line_error(kdcli_run("prepare", "multieye", multieye_raw, "--out", out, "--resume", "--size", "16",
                                    ok=False),
                          "plan.json", "same arguments")


@pytest.fixture
def raw_copy(multieye_raw, tmp_path) -> Path:
    copy = tmp_path / "raw"
    shutil.copytree(multieye_raw, copy)
    return copy


def first_listed(raw: Path, folder: str = "assemble", split: str = "train") -> tuple[Path, str, Path]:
    list_path = raw / folder / split / "large9cls.txt"
    name = read_list(list_path)[0][0]
    sub = "cfp-clahe-224x224" if folder == "assemble" else "oct-filter-448x448"
    return list_path, name, raw / folder / "train" / "ImageData" / sub / f"{name}.png"


def test_missing_image_names_the_list_and_line(raw_copy, tmp_path):
    list_path, name, image = first_listed(raw_copy)
    image.unlink()
    assert_one_line_error(kdcli_run("prepare", "multieye", raw_copy, "--out", tmp_path / "o", ok=False),
                          str(list_path), "line 1", name)
    assert not (tmp_path / "o").exists()


def test_undecodable_image_names_the_file(raw_copy, tmp_path):
    _, _, image = first_listed(raw_copy, "assemble_oct", "dev")
    image.write_bytes(b"\x89PNG truncated")
    assert_one_line_error(kdcli_run("prepare", "multieye", raw_copy, "--out", tmp_path / "o", "--size", "16", ok=False),
                          str(image), "decode")
    assert not (tmp_path / "o").exists()


def test_label_outside_range_and_empty_split(raw_copy, tmp_path):
    list_path, name, _ = first_listed(raw_copy)
    lines = list_path.read_text().splitlines()
    lines[0] = f"{name} 9"
    list_path.write_text("\n".join(lines) + "\n")
    assert_one_line_error(kdcli_run("prepare", "multieye", raw_copy, "--out", tmp_path / "o", ok=False),
                          str(list_path), "outside 0..8")
    list_path.write_text("\n")
    assert_one_line_error(kdcli_run("prepare", "multieye", raw_copy, "--out", tmp_path / "o", ok=False),
                          str(list_path), "empty split")


def test_wrong_folder_is_explained(tmp_path):
    assert_one_line_error(kdcli_run("prepare", "multieye", tmp_path, "--out", tmp_path / "o", ok=False), "assemble")


def test_paired_phantoms_prepare_as_paired(tmp_path):
    from kdcli.synth.multieye import synth_multieye

    synth_multieye(tmp_path / "raw", per_class=3, size=16, seed=1, paired=True)
    result = prepare(PrepareOptions(source="multieye", raw=tmp_path / "raw", out=tmp_path / "s", size=16))
    assert result.meta.pairing == "paired"
    manifest = pl.read_parquet(tmp_path / "s" / "manifest.parquet")
    assert set(manifest["modality"]) == {"fundus+oct"}


# slow: four prepares; parts and merge stay fast on BraTS (test_brats_pipeline)
@pytest.mark.slow
def test_parts_for_array_jobs_merge_into_the_one_shot_dataset(multieye_raw, multieye_shards, tmp_path):
    out = tmp_path / "parts"
    args = ("prepare", "multieye", multieye_raw, "--out", out, "--size", "32", "--shard-size", "16")
    first = kdcli_run(*args, "--part", "2/3", ok=False)
    assert first.exit_code == 0 and "kdcli prepare merge" in first.output, first.output
    assert not out.exists()
    assert_one_line_error(kdcli_run("prepare", "merge", out, ok=False), "missing", "1, 3")
    for part in ("1/3", "3/3"):
        kdcli_run(*args, "--part", part)
    kdcli_run("prepare", "merge", out)
    one_shot = json.loads((multieye_shards / "dataset.json").read_text())["content_hash"]
    assert json.loads((out / "dataset.json").read_text())["content_hash"] == one_shot
    assert kdcli_run("inspect", out, "--verify", ok=False).exit_code == 0 and not Path(str(out) + ".partial").exists()
    assert kdcli_run(*args, "--part", "4/3", ok=False).exit_code == 2
