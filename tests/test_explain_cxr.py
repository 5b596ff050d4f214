"""`kdcli explain` on multi-label chest X-rays: Grad-CAM of each positive finding beside the gaze heat map and the
boxes, NSS/AUC/IoU agreement scores (the stage-1 teacher's too for a CVI student), explain.json and index.html that
agree, `gaze_agreement`, the score helpers on hand-made maps, and one-line errors. Tiny NIH phantom (48 px) and
2-epoch models."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import kdcli_run

from kdcli.engine.checkpoint import load_checkpoint
from kdcli.errors import KdcliError
from kdcli.explain import gaze
from kdcli.explain.common import ExplainOptions
from kdcli.explain.run import explain

SIZE = 48
FAST = ["--epochs", "2", "--workers", "0", "--batch-size", "16"]


@pytest.fixture(scope="module")
def raw(cxr_phantom) -> Path:
    """NIH layout, 3 per class at 96 px, half the images with gaze (EGD) and boxes."""
    return cxr_phantom["raw"]


@pytest.fixture(scope="module")
def shards(cxr_phantom) -> Path:
    """The phantom prepared at SIZE with its gaze (sigma 10) and boxes."""
    return cxr_phantom["shards"]


@pytest.fixture(scope="module")
def unannotated(raw, tmp_path_factory) -> Path:
    """The same images prepared without gaze or boxes: the maps are stored, all zeros, nothing annotated."""
    from kdcli.prepare import PrepareOptions, prepare

    out = tmp_path_factory.mktemp("cxr") / "plain"
    prepare(PrepareOptions(source="cxr", raw=raw, out=out, size=SIZE))
    return out


@pytest.fixture(scope="module")
def stage1(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "stage1.pt"
    kdcli_run("teach", "--data", shards, "--modality", "xray", "--model", "test_resnet", "--head", "linear",
              "--out", out, *FAST)
    return out


@pytest.fixture(scope="module")
def cvi(shards, stage1, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "cvi.pt"
    kdcli_run("distill", "--data", shards, "--teacher", stage1, "--student", "xray", "--method", "cvi",
              "--out", out, *FAST)
    return out


def annotated_ids(shards: Path, split: str) -> list[str]:
    from kdcli.shards.reader import ShardStore

    store = ShardStore(shards)
    rows = store.rows(split, "xray")
    return sorted(i for i, s, r in zip(rows["id"], rows["shard"], rows["index"], strict=True)
                  if store.read(s, int(r), "annotated").any())


def valid(scores: dict, record: dict) -> None:
    assert set(scores) == {"nss", "auc", "iou"}
    if record["has_gaze"]:
        assert scores["auc"] is not None and 0.0 <= scores["auc"] <= 1.0, scores
        assert scores["nss"] is not None and np.isfinite(scores["nss"]), scores
    else:
        assert scores["auc"] is None and scores["nss"] is None
    if record["has_boxes"]:
        assert scores["iou"] is not None and 0.0 <= scores["iou"] <= 1.0, scores
    else:
        assert scores["iou"] is None


def check_outputs(index: Path, shards: Path, split: str, count: int) -> dict:
    out = index.parent
    report = json.loads((out / "explain.json").read_text())
    files = [r["file"] for r in report["images"]]
    figures = [report["curves"]] if report["curves"] else []  # the training curves, above the samples
    assert re.findall(r'<img src="([^"]+)"', index.read_text()) == figures + files
    assert all((out / f).is_file() for f in files)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(figures + files)
    assert not list(out.glob(".*.tmp")), "temporary files left behind"
    expected = annotated_ids(shards, split)[:count]
    assert sorted({r["id"] for r in report["images"]}) == expected and report["annotated_images"] == len(expected)
    labels = {}
    from kdcli.shards.reader import ShardStore

    store = ShardStore(shards)
    rows = store.rows(split, "xray")
    for i, s, r in zip(rows["id"], rows["shard"], rows["index"], strict=True):
        labels[i] = store.read(s, int(r), "labels")
    for r in report["images"]:
        assert r["has_gaze"] or r["has_boxes"]
        positives = [report["classes"][c] for c in np.flatnonzero(labels[r["id"]] == 1)]
        if positives:
            assert r["finding_source"] == "label" and r["finding"] in positives and r["label"] == 1
        else:
            assert r["finding_source"] == "predicted"
        assert 0.0 <= r["probability"] <= 1.0
        valid(r["scores"], r)
    for r_id in expected:  # every positive finding of every image gets its own row
        positives = [report["classes"][c] for c in np.flatnonzero(labels[r_id] == 1)]
        found = [r["finding"] for r in report["images"] if r["id"] == r_id]
        assert found == (positives or found[:1]) and len(found) >= 1
    means = report["means"]["model"]
    assert means["auc"] is None or 0.0 <= means["auc"] <= 1.0
    assert means["iou"] is None or 0.0 <= means["iou"] <= 1.0
    assert "NSS" in index.read_text() and "AUC" in index.read_text() and "IoU" in index.read_text()
    return report


def test_cli_on_stage1_has_no_teacher_comparison(stage1, shards, tmp_path):
    kdcli_run("explain", stage1, "--data", shards, "--out", tmp_path / "s1", "--split", "train", "-n", "3")
    report = check_outputs(tmp_path / "s1" / "index.html", shards, "train", 3)
    assert report["teacher"]["compared"] is False and "teacher" not in report["means"]
    assert all("teacher" not in r for r in report["images"])
    assert all(r["tiles"] == ["x-ray", "model CAM", "gaze" if r["has_gaze"] else "no gaze",
                              "boxes" if r["has_boxes"] else "no boxes"] for r in report["images"])


def test_cli_on_cvi_compares_with_its_teacher(cvi, stage1, shards, tmp_path):
    kdcli_run("explain", cvi, "--data", shards, "--out", tmp_path / "cvi", "--split", "train", "-n", "4")
    index = tmp_path / "cvi" / "index.html"
    report = check_outputs(index, shards, "train", 4)
    assert report["method"] == "cvi" and report["teacher"]["compared"] is True
    assert Path(report["teacher"]["path"]) == stage1.resolve()
    teacher_means = report["means"]["teacher"]
    assert set(teacher_means) == {"nss", "auc", "iou", "n"}
    assert teacher_means["auc"] is None or 0.0 <= teacher_means["auc"] <= 1.0
    for r in report["images"]:
        assert "teacher CAM" in r["tiles"] and "student CAM" in r["tiles"]
        valid(r["teacher"]["scores"], r)
    assert "teacher" in index.read_text()

    # The library function gives the same means on the same images.
    scores = gaze.gaze_agreement(cvi, shards, split="train", count=4, device="cpu")
    assert scores["model"] == report["means"]["model"] and scores["teacher"] == teacher_means
    assert scores["images"] == 4 and scores["findings"] == len(report["images"])


def test_default_split_and_teacher_missing(cvi, shards, tmp_path, monkeypatch):
    """The test split via the library; a CVI student whose teacher file is gone is still explained, alone."""
    index = explain(ExplainOptions(cvi, shards, tmp_path / "lib", device="cpu"))
    check_outputs(index, shards, "test", 12)

    def teacher_gone(path):
        if Path(path).name == "stage1.pt":
            raise OSError("teacher file missing")
        return load_checkpoint(path)

    monkeypatch.setattr(gaze, "load_checkpoint", teacher_gone)
    scores = gaze.gaze_agreement(cvi, shards, split="test", device="cpu")
    assert scores["teacher"] is None and scores["images"] == len(annotated_ids(shards, "test"))


def test_no_annotated_images_is_a_one_line_error(stage1, unannotated, tmp_path):
    with pytest.raises(KdcliError, match="no images with gaze or boxes in split 'test'"):
        explain(ExplainOptions(stage1, unannotated, tmp_path / "lib", device="cpu"))
    with pytest.raises(KdcliError, match="no images with gaze or boxes"):
        gaze.gaze_agreement(stage1, unannotated, split="train")
    result = kdcli_run("explain", stage1, "--data", unannotated, "--out", tmp_path / "cli", ok=False)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no images with gaze or boxes" in lines[0]
    assert not (tmp_path / "cli" / "index.html").exists()


# ------------------------------------------------------------------------------------------ score helpers
def blob(size: int = 32, centre: tuple[float, float] = (10.0, 20.0), sigma: float = 4.0) -> np.ndarray:
    y, x = np.mgrid[:size, :size].astype(np.float64)
    return np.exp(-((y - centre[0]) ** 2 + (x - centre[1]) ** 2) / (2 * sigma**2))


def test_auc_and_nss_of_identical_and_inverted_maps():
    heat = blob()
    assert gaze.gaze_auc(heat, heat) == pytest.approx(1.0)
    assert gaze.gaze_auc(1.0 - heat, heat) == pytest.approx(0.0)
    assert gaze.gaze_auc(heat * 0.3 + 0.1, heat * 255) == pytest.approx(1.0)  # scale-free in both maps
    assert gaze.nss(heat, heat) > 2.0
    assert gaze.nss(1.0 - heat, heat) < -2.0
    assert gaze.nss(blob(centre=(25.0, 5.0)), heat) < 0.0  # looking elsewhere
    flat = np.zeros_like(heat)
    assert gaze.nss(flat, heat) == 0.0 and gaze.gaze_auc(flat, heat) == pytest.approx(0.5)
    assert gaze.nss(heat, flat) is None and gaze.gaze_auc(heat, flat) is None  # no gaze: no score


def test_top_mask_and_iou():
    mask = np.zeros((20, 20), bool)
    mask[2:8, 3:9] = True
    assert gaze.mask_iou(mask, mask) == 1.0
    assert gaze.mask_iou(mask, ~mask) == 0.0
    half = mask.copy()
    half[2:5] = False
    assert gaze.mask_iou(half, mask) == pytest.approx(0.5)
    heat = blob(20, (5.0, 6.0), 2.0)
    top = gaze.top_mask(heat)
    assert top[5, 6] and 0.1 * heat.size <= top.sum() <= 0.15 * heat.size  # ties of the round blob included
    ramp = np.arange(400, dtype=np.float64).reshape(20, 20)
    assert gaze.top_mask(ramp).sum() == 40 and gaze.top_mask(ramp)[-2:].all()  # exactly the top 10%
    assert not gaze.top_mask(np.full((8, 8), 0.7)).any()  # a flat map selects nothing
    scores = gaze.agreement(heat, heat, top)
    assert scores["iou"] == 1.0 and scores["auc"] == pytest.approx(1.0) and scores["nss"] > 2.0
    assert gaze.agreement(heat, None, None) == {"nss": None, "auc": None, "iou": None}
    means = gaze.mean_scores([{"nss": 1.0, "auc": 0.5, "iou": None}, {"nss": 2.0, "auc": 1.0, "iou": 0.25}])
    assert means == {"nss": 1.5, "auc": 0.75, "iou": 0.25, "n": {"nss": 2, "auc": 2, "iou": 1}}
