"""`kdcli explain` on segmentation checkpoints: tumour slices spread over cases, one PNG row per slice
(sequences, truth, prediction, WT errors, prototype maps; the teacher's too for a ProtoKD student), explain.json
and index.html that agree, determinism, and one-line errors. Tiny BraTS phantom (8 cases, 32 px) and U-Nets."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import kdcli_run

from kdcli.data.slices import SliceView
from kdcli.engine.checkpoint import load_checkpoint, save_checkpoint
from kdcli.errors import KdcliError
from kdcli.explain import segmentation as seg
from kdcli.explain.common import GAP, MIN_SIDE, ExplainOptions
from kdcli.explain.run import explain
from kdcli.shards.reader import ShardStore

SEQUENCES = ["t1", "t1ce", "t2", "flair"]
FAST = ["--model", "plain-4-2", "--epochs", "2", "--batch-size", "16", "--workers", "0"]
SIZE = 32


@pytest.fixture(scope="module")
def shards(brats_phantom) -> Path:
    """8 cases prepared at SIZE (the session's shared phantom)."""
    return brats_phantom["shards"]


@pytest.fixture(scope="module")
def teacher(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "teacher.pt"
    kdcli_run("teach", "--data", shards, "--modality", ",".join(SEQUENCES), "--out", out, *FAST)
    return out


@pytest.fixture(scope="module")
def student(shards, teacher, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "t1ce.pt"
    kdcli_run("distill", "--data", shards, "--teacher", teacher, "--student", "t1ce", "--method", "protokd",
              "--out", out, *FAST)
    return out


def check_outputs(index: Path, count: int) -> dict:
    """index.html links exactly the PNGs explain.json lists, all on disk; every PNG is one row of tiles whose
    count and size follow the record's tile list; Dice values are valid."""
    out = index.parent
    report = json.loads((out / "explain.json").read_text())
    images = report["images"]
    assert len(images) == count
    files = [r["file"] for r in images]
    figures = [report["curves"]] if report["curves"] else []  # the training curves, above the samples
    assert re.findall(r'<img src="([^"]+)"', index.read_text()) == figures + files
    assert all((out / f).is_file() for f in files)
    assert not list(out.glob(".*.tmp")), "temporary files left behind"
    side = SIZE * math.ceil(MIN_SIDE / SIZE)
    for r in images:
        image = cv2.imread(str(out / r["file"]), cv2.IMREAD_COLOR)
        tiles = len(r["tiles"])
        assert image.shape == (side + seg.TITLE, tiles * side + (tiles - 1) * GAP, 3), (r["file"], image.shape)
        assert set(r["dice"]) == {"wt", "tc", "et"}
        assert all(0.0 <= v <= 1.0 for v in r["dice"].values()), r["dice"]
        assert r["tumour_pixels"] > 0
        assert "background" in r["prototype_classes"] and len(r["prototype_classes"]) >= 2
        assert f"slice {r['slice']}" in index.read_text() and r["case"] in r["file"]
    html = index.read_text()
    assert "necrotic core" in html and "false positive" in html  # the legend
    assert "<script" not in html and "http" not in html  # self-contained, relative links only
    return report


def test_cli_protokd_student_shows_teacher_maps(student, shards, tmp_path):
    out = tmp_path / "explain"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # a folder with other content is fine and left alone
    kdcli_run("explain", student, "--data", shards, "--out", out, "-n", "3")
    report = check_outputs(out / "index.html", 3)
    assert (out / "notes.txt").read_text() == "mine"
    assert report["modality"] == "t1ce" and report["method"] == "protokd"
    assert report["teacher"]["maps"] is True and report["teacher"]["modality"] == ",".join(SEQUENCES)
    for r in report["images"]:
        k = len(r["prototype_classes"])
        assert r["prototype_maps"] == ["student", "teacher"]
        assert r["tiles"][:4] == ["t1ce", "truth", "prediction", "error (WT)"]
        assert len(r["tiles"]) == 4 + 2 * k
        assert sum(t.startswith("teacher ") for t in r["tiles"]) == k


def test_library_baseline_is_deterministic_without_teacher_maps(teacher, shards, tmp_path):
    first = explain(ExplainOptions(teacher, shards, tmp_path / "a", count=4, device="cpu"))
    second = explain(ExplainOptions(teacher, shards, tmp_path / "b", count=4, device="cpu"))
    report = check_outputs(first, 4)
    assert json.loads((second.parent / "explain.json").read_text())["images"] == report["images"]
    assert sorted(p.name for p in first.parent.iterdir()) == sorted(p.name for p in second.parent.iterdir())
    for r in report["images"]:
        assert (first.parent / r["file"]).read_bytes() == (second.parent / r["file"]).read_bytes()
    assert report["teacher"]["maps"] is False and "not a ProtoKD student" in report["teacher"]["note"]
    assert report["overlay_sequence"] == "flair"
    for r in report["images"]:
        assert r["prototype_maps"] == ["model"]
        assert r["tiles"][:7] == [*SEQUENCES, "truth", "prediction", "error (WT)"]
        assert len(r["tiles"]) == 7 + len(r["prototype_classes"])
        assert not any(t.startswith("teacher") for t in r["tiles"])


def test_picks_spread_over_cases_largest_tumour_first(teacher, shards, tmp_path):
    index = explain(ExplainOptions(teacher, shards, tmp_path / "x", split="test", count=3, device="cpu"))
    picked = json.loads((index.parent / "explain.json").read_text())["images"]
    view = SliceView(ShardStore(shards), "test", SEQUENCES)
    areas = {}
    for i in range(len(view)):
        areas.setdefault(view.records[i], {})[int(view.positions[i])] = int((view[i]["mask"] > 0).sum())
    cases = sorted(areas)
    assert len(cases) >= 2, "the phantom's test split should hold two or more cases"
    assert [r["case"] for r in picked[:2]] == cases[:2]
    for r in picked[:2]:
        assert areas[r["case"]][r["slice"]] == max(areas[r["case"]].values())
        assert r["tumour_pixels"] == areas[r["case"]][r["slice"]]
    assert all(areas[r["case"]][r["slice"]] > 0 for r in picked)


def test_pick_slices_round_robin():
    records = ["b", "a", "a", "b", "a", "c"]
    positions = np.array([0, 0, 1, 1, 2, 0])
    areas = np.array([5, 3, 9, 7, 9, 0])  # case c has no tumour
    # a: slices 2 and 4 tie at 9 (lower position first), then 1; b: 3 then 0
    assert seg.pick_slices(records, positions, areas, 10) == [2, 3, 4, 0, 1]
    assert seg.pick_slices(records, positions, areas, 2) == [2, 3]
    assert seg.pick_slices(records, positions, np.zeros(6), 3) == []


def test_missing_teacher_is_skipped_with_a_note(student, shards, tmp_path):
    checkpoint = load_checkpoint(student)
    meta = {**checkpoint.meta, "teacher": {**checkpoint.meta["teacher"], "path": str(tmp_path / "gone.pt")}}
    orphan = tmp_path / "orphan.pt"
    save_checkpoint(orphan, meta, checkpoint.model)
    index = explain(ExplainOptions(orphan, shards, tmp_path / "out", count=2, device="cpu"))
    report = check_outputs(index, 2)
    assert report["teacher"]["maps"] is False
    assert "skipped" in report["teacher"]["note"] and "gone.pt" in report["teacher"]["note"]
    assert all(r["prototype_maps"] == ["model"] for r in report["images"])


def test_split_without_tumour_is_a_one_line_error(teacher, shards, tmp_path, monkeypatch):
    original = SliceView.__init__

    def tumour_free(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.labels = np.zeros_like(self.labels)

    monkeypatch.setattr(SliceView, "__init__", tumour_free)
    with pytest.raises(KdcliError, match="no slices with tumour in split 'dev'"):
        explain(ExplainOptions(teacher, shards, tmp_path / "lib", split="dev", device="cpu"))
    result = kdcli_run("explain", teacher, "--data", shards, "--out", tmp_path / "cli", "--split", "test", ok=False)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no slices with tumour" in lines[0]
    assert not (tmp_path / "cli").exists() and not (tmp_path / "lib").exists()


def test_bad_split_is_a_usage_error(teacher, shards, tmp_path):
    result = kdcli_run("explain", teacher, "--data", shards, "--out", tmp_path / "o", "--split", "val", ok=False)
    assert result.exit_code == 2, result.output
    assert "--split" in result.output
