"""`kdcli explain` on slide (MIL) checkpoints: attention heat maps on the thumbnail (or a patch mosaic), top
patches, clinical occlusion for models with a clinical branch, explain.json and index.html that agree, and
one-line errors. Tiny BCNB phantom (8 slides, 32 px patches) and 1-epoch WSI-only, WSI + clinical and
bidirectional models."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import polars as pl
import pytest
import torch
from conftest import kdcli_run, reseal_dataset
from torch import nn

from kdcli.data.bags import BagView, collate_bags
from kdcli.engine.checkpoint import load_checkpoint
from kdcli.explain import slides
from kdcli.shards.reader import ShardStore
from kdcli.train import load_model

FAST = ["--model", "test_resnet", "--epochs", "1", "--batch-size", "4", "--workers", "0"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("camelyon")
    kdcli_run("synth", "camelyon", root / "raw", "--slides", 8, "--size", 1024)
    kdcli_run("prepare", "camelyon", root / "raw", "--out", root / "shards", "--patch-size", 128,
              "--max-patches", 8, "--size", 32)
    return root / "shards"


@pytest.fixture(scope="module")
def checkpoints(shards, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ckpt")
    paths = {name: folder / f"{name}.pt" for name in ("wsi", "mm", "bd")}
    kdcli_run("teach", "--data", shards, "--modality", "wsi", "--out", paths["wsi"], *FAST)
    kdcli_run("teach", "--data", shards, "--modality", "wsi,clinical", "--out", paths["mm"], *FAST)
    kdcli_run("distill", "--data", shards, "--teacher", paths["mm"], "--student", "wsi", "--method",
              "bidirectional", "--out", paths["bd"], *FAST)
    return paths


@pytest.fixture(scope="module")
def explained(shards, checkpoints, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("explain")
    for name, checkpoint in checkpoints.items():
        kdcli_run("explain", checkpoint, "--data", shards, "--out", folder / name, "--split", "test")
    return {name: folder / name / "index.html" for name in checkpoints}


def check_outputs(index: Path) -> dict:
    out = index.parent
    report = json.loads((out / "explain.json").read_text())
    files = [r["file"] for r in report["images"]]
    figures = [report["curves"]] if report["curves"] else []  # the training curves, above the samples
    assert re.findall(r'<img src="([^"]+)"', index.read_text()) == figures + files
    assert sorted(p.name for p in out.glob("*.png")) == sorted(figures + files)
    assert not list(out.glob(".*.tmp")), "temporary files left behind"
    for name in files:
        image = cv2.imread(str(out / name), cv2.IMREAD_COLOR)
        assert image is not None and image.shape[0] >= slides.MIN_SIDE, name
    return report


BRANCHES = {"wsi": ["sm"], "mm": ["mm"], "bd": ["mm", "sm"]}


@pytest.mark.parametrize("name", ["wsi", "mm", "bd"])
def test_explain_slides(name, explained, shards) -> None:
    report = check_outputs(explained[name])
    store = ShardStore(shards)
    view = BagView(store, "test")
    assert report["task"] == "mil" and report["branches"] == BRANCHES[name]
    assert sorted(r["id"] for r in report["images"]) == sorted(view.records)  # count 12 > the split's slides
    features = store.meta.extra["clinical"]["features"]
    for r in report["images"]:
        i = view.records.index(r["id"])
        assert r["label"] == int(view.labels[i]) and r["patches"] == len(view.members[i][1])
        assert sum(r["probs"].values()) == pytest.approx(1.0, abs=1e-4)
        assert r["prediction_name"] == max(r["probs"], key=r["probs"].get)
        assert r["branch"] == BRANCHES[name][0]  # records are present: the fusion branch where there is one
        assert list(r["attention"]) == BRANCHES[name]  # the used branch first
        coords = [list(map(int, store.read(s, int(k), "coords"))) for s, k in zip(*view.members[i], strict=True)]
        assert r["coords"] == coords
        for branch in r["attention"].values():
            weights = branch["weights"]
            assert len(weights) == r["patches"] and sum(weights) == pytest.approx(1.0, abs=1e-4)
            top = branch["top_patches"]
            assert len(top) == min(slides.TOP_K, r["patches"])
            assert [t["attention"] for t in top] == sorted((t["attention"] for t in top), reverse=True)
            assert top[0]["attention"] == max(weights)
            assert all(t["coords"] == coords[t["position"]] for t in top)
        assert r["top_patches"] == r["attention"][r["branch"]]["top_patches"]
        if name == "wsi":
            assert "clinical_contributions" not in r
        else:
            contributions = r["clinical_contributions"]
            assert contributions and all(c["feature"] == features[c["index"]] for c in contributions)
            sizes = [abs(c["contribution"]) for c in contributions]
            assert sizes == sorted(sizes, reverse=True)
    if name == "wsi":
        assert report["clinical_features"] == []
    html = explained[name].read_text()
    assert ("clinical contributions" in html) == (name != "wsi")


def test_bidirectional_draws_both_maps(explained, shards) -> None:
    """The bidirectional PNG has the other branch's heat map right of the used one; the fusion model's has
    white there. Panels are listed in order."""
    mm, bd = (json.loads((explained[n].parent / "explain.json").read_text())["images"] for n in ("mm", "bd"))
    for a, b in zip(mm, bd, strict=True):
        top = f"top {min(slides.TOP_K, a['patches'])} patches (mm)"
        assert a["panels"] == ["attention mm", top, "clinical occlusion"]
        assert b["panels"] == ["attention mm", "attention sm", top, "clinical occlusion"]
        thumb = slides.display_size(cv2.imread(str(shards / "thumbnails" / f"{a['id']}.png")))
        height, width = thumb.shape[:2]
        right = (slice(slides.TITLE, slides.TITLE + height), slice(width + slides.GAP, 2 * width + slides.GAP))
        assert (cv2.imread(str(explained["mm"].parent / a["file"]))[right] == 255).all()
        assert (cv2.imread(str(explained["bd"].parent / b["file"]))[right] < 250).any()


def test_count_and_determinism(explained, checkpoints, shards, tmp_path) -> None:
    kdcli_run("explain", checkpoints["mm"], "--data", shards, "--out", tmp_path / "one", "--count", 1)
    first = json.loads((explained["mm"].parent / "explain.json").read_text())["images"]
    again = check_outputs(tmp_path / "one" / "index.html")["images"]
    assert len(again) == 1 and again[0] == first[0]


def test_mosaic_without_thumbnails_or_records(checkpoints, shards, tmp_path) -> None:
    """Without prepare's thumbnails and records.json the patches are laid out at their coords."""
    bare = tmp_path / "bare"
    shutil.copytree(shards, bare, ignore=shutil.ignore_patterns("thumbnails", "records.json"))
    kdcli_run("explain", checkpoints["wsi"], "--data", bare, "--out", tmp_path / "out", "--count", 2)
    report = check_outputs(tmp_path / "out" / "index.html")
    assert {r["thumbnail"] for r in report["images"]} == {"mosaic"}
    assert all(r["patch_level0"] == 128 for r in report["images"])  # recovered from the coordinate grid


def test_mosaic_places_patches() -> None:
    patches = np.stack([np.full((4, 4, 3), v, np.uint8) for v in (10, 200)])
    canvas = slides.mosaic(patches, np.array([[0, 0], [8, 4]]), (16, 8), 4)
    assert canvas.shape == (8, 16, 3)
    assert (canvas[:4, :4] == 10).all() and (canvas[4:8, 8:12] == 200).all() and (canvas[:4, 8:] == 255).all()
    boxes = slides.patch_boxes(np.array([[8, 4]]), 4, (16, 8), (16, 32, 3))
    assert boxes.tolist() == [[16, 8, 24, 16]]


def test_empty_split_is_one_line_error(checkpoints, shards, tmp_path) -> None:
    bare = tmp_path / "no_test"
    shutil.copytree(shards, bare)
    manifest = pl.read_parquet(bare / "manifest.parquet")
    manifest.filter(pl.col("split") != "test").write_parquet(bare / "manifest.parquet")
    reseal_dataset(bare)  # a consistent dataset without test slides (an edited manifest alone is refused)
    result = kdcli_run("explain", checkpoints["wsi"], "--data", bare, "--out", tmp_path / "out", ok=False)
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no slides in split 'test'" in lines[0], \
        result.output
    assert not (tmp_path / "out" / "index.html").exists()


class OneFeature(nn.Module):
    """Class-1 logit = 4 x clinical feature 1 (when observed); nothing else matters."""

    def forward(self, batch: dict) -> dict:
        z = 4.0 * batch["clinical"][:, 1] * batch["clinical_mask"][:, 1]
        return {"logits": torch.stack([torch.zeros_like(z), z], 1)}


def test_occlusion_finds_the_driving_feature() -> None:
    batch = {"patches": torch.zeros(1, 2, 3, 4, 4, dtype=torch.uint8), "bag_mask": torch.ones(1, 2, dtype=torch.bool),
             "clinical": torch.tensor([[0.5, 1.0, 2.0, 0.7]]), "clinical_mask": torch.tensor([[1.0, 1.0, 1.0, 0.0]]),
             "clinical_present": torch.tensor([True])}
    deltas = slides.clinical_occlusion(OneFeature(), batch, target=1)
    assert deltas[1] == pytest.approx(torch.sigmoid(torch.tensor(4.0)).item() - 0.5, abs=1e-6)
    assert deltas[0] == 0 and deltas[2] == 0 and np.isnan(deltas[3])  # unobserved: no contribution
    assert slides.clinical_occlusion(OneFeature(), batch, target=0)[1] == pytest.approx(-deltas[1], abs=1e-6)
    assert batch["clinical_mask"][0, 1] == 1  # the caller's batch is left alone


def test_cached_encoder_matches_full_forward(checkpoints, shards) -> None:
    """explain_bag reuses the patch features for the occlusion rows: same numbers as re-encoding each row."""
    model = load_model(load_checkpoint(checkpoints["bd"])).eval()
    view = BagView(ShardStore(shards), "test")
    item = view[0]
    result = slides.explain_bag(model, item, torch.device("cpu"))
    assert not hasattr(model, "encode") or "encode" not in vars(model)  # the override is gone
    full = slides.clinical_occlusion(model, collate_bags([view[0]]), int(result["probs"].argmax()))
    np.testing.assert_allclose(result["contributions"], full, atol=1e-5)
    with torch.no_grad():
        out = model(collate_bags([view[0]]))
    np.testing.assert_allclose(result["attention"]["sm"], out["attention_sm"][0].numpy(), atol=1e-6)
