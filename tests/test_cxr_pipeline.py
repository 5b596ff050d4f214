"""Chest X-rays end to end through the CLI on tiny phantoms: synth -> prepare (gaze heat maps, boxes) -> teach
stage 1 (multi-label BCE) -> distill --method cvi -> evaluate (mean AUROC)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from conftest import kdcli_run

FAST = ["--epochs", "2", "--batch-size", "16", "--workers", "0", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def cxr(cxr_phantom, tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("cxr")
    raw, shards = cxr_phantom["raw"], cxr_phantom["shards"]
    paths = {"raw": raw, "shards": shards, "stage1": root / "stage1.pt", "cvi": root / "cvi.pt"}
    kdcli_run("teach", "--data", shards, "--modality", "xray", "--model", "test_resnet", "--head", "linear",
              "--out", paths["stage1"], *FAST)
    paths["cvi_log"] = kdcli_run("distill", "--data", shards, "--teacher", paths["stage1"], "--student", "xray",
                                 "--method", "cvi", "--out", paths["cvi"], *FAST).output
    return paths


def test_stage1_selects_by_mean_auroc_and_evaluates_per_label(cxr):
    report = json.loads(kdcli_run("evaluate", cxr["stage1"], "--data", cxr["shards"], "--json").stdout)
    metrics = report["metrics"]
    scored = [v for v in metrics["per_label_auroc"].values() if v is not None]
    assert metrics["labels_scored"] == len(scored) >= 2
    assert metrics["mean_auroc"] == pytest.approx(sum(scored) / len(scored))
    rows = [json.loads(line) for line in cxr["stage1"].with_name("stage1.metrics.jsonl").read_text().splitlines()]
    assert "dev_mean_auroc" in rows[0] and "train_bce" in rows[0]


def test_cvi_freezes_lower_blocks_and_logs_its_terms(cxr):
    from kdcli.engine.checkpoint import load_checkpoint

    stage1, cvi = load_checkpoint(cxr["stage1"]), load_checkpoint(cxr["cvi"])
    frozen = cvi.meta["model"]["frozen"]
    assert frozen == ["conv1", "bn1", "layer1", "layer2", "layer3"]  # test_resnet: all but its last block
    checked = 0
    for name, tensor in stage1.model.items():
        if name.startswith("backbone.") and name.split(".")[1] in frozen:
            assert torch.equal(cvi.model[f"base.{name}"], tensor), name  # frozen (BatchNorm statistics too)
            checked += 1
        elif name.startswith("backbone.layer4.") and tensor.dtype.is_floating_point and "running" not in name:
            assert not torch.equal(cvi.model[f"base.{name}"], tensor), name  # the last block trains
    assert checked > 10
    rows = [json.loads(line) for line in cxr["cvi"].with_name("cvi.metrics.jsonl").read_text().splitlines()]
    assert {"train_bce_prior", "train_bce_posterior", "train_kl", "train_kl_raw"} <= set(rows[0])
    report = json.loads(kdcli_run("evaluate", cxr["cvi"], "--data", cxr["shards"], "--json").stdout)
    assert 0.0 <= report["metrics"]["mean_auroc"] <= 1.0


def test_cvi_student_starts_as_stage1(cxr):
    from kdcli.engine.checkpoint import load_checkpoint
    from kdcli.methods.cvi import CVI, CVIParams
    from kdcli.train import load_model

    stage1 = load_model(load_checkpoint(cxr["stage1"]))
    student = CVI.make_student(CVIParams(), stage1).eval()
    images = torch.randint(0, 255, (3, 1, 48, 48), dtype=torch.uint8)
    assert torch.allclose(student(images)["logits"], stage1(images)["logits"], atol=1e-5)


def test_cvi_needs_gaze_or_boxes_in_the_data(cxr, tmp_path):
    shards = tmp_path / "plain"
    kdcli_run("prepare", "cxr", cxr["raw"], "--out", shards, "--size", "48")
    result = kdcli_run("distill", "--data", str(shards), "--teacher", str(cxr["stage1"]), "--student",
                       "xray", "--method", "cvi", "--out", str(tmp_path / "c.pt"), *FAST, ok=False)
    assert result.exit_code != 0
    assert result.output.strip().startswith("error:") and len(result.output.strip().splitlines()) == 1


def test_cache_teacher_is_refused_where_no_teacher_output_is_read(cxr, tmp_path):
    """CVI's stage-1 teacher only seeds the student: caching its outputs would be work for nothing."""
    result = kdcli_run("distill", "--data", str(cxr["shards"]), "--teacher", str(cxr["stage1"]),
                       "--student", "xray", "--method", "cvi", "--cache-teacher",
                       "--out", str(tmp_path / "c.pt"), *FAST, ok=False)
    assert result.exit_code == 2 and "reads no teacher outputs" in result.output
    assert not (cxr["shards"] / "cache").exists() and not list(tmp_path.iterdir())


def test_compile_reaches_methods_with_their_own_step(cxr, tmp_path, monkeypatch):
    """CVI overrides the training step; under --compile that step still calls the compiled student."""
    from kdcli.engine import loop

    calls = []

    class Compiled(torch.nn.Module):  # stands in for torch.compile's wrapper, without inductor's minutes
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *args):
            calls.append(len(args))
            return self.model(*args)

    monkeypatch.setattr(loop.torch, "compile", Compiled)
    kdcli_run("distill", "--data", cxr["shards"], "--teacher", cxr["stage1"], "--student", "xray", "--method", "cvi",
              "--out", tmp_path / "c.pt", "--compile", *FAST)
    assert calls and set(calls) == {2}  # image and annotation map, every step


def gaze_flags(store, view) -> np.ndarray:
    """Which images of a view have gaze, read row by row (not the way CVI reads them)."""
    return np.array([bool(store.read(view.shards[i], int(view.indices[i]), "annotated")[0]) for i in range(len(view))])


def test_cvi_trains_on_the_annotated_subset_by_default(cxr, tmp_path, monkeypatch):
    from kdcli import train_images
    from kdcli.data.views import ModalityView
    from kdcli.engine.loop import FitResult
    from kdcli.shards.reader import ShardStore

    seen = {}

    def fake_fit(method, train_set, validate, cfg, out, meta, resume=False, log=print, train_labels=None):
        seen.update(items=len(train_set), labels=len(train_labels), first=train_set[0])
        return FitResult(0, 0.0, 0, [], 0.0)

    monkeypatch.setattr(train_images, "fit", fake_fit)
    kdcli_run("distill", "--data", cxr["shards"], "--teacher", cxr["stage1"], "--student", "xray", "--method", "cvi",
              "--out", tmp_path / "c.pt", *FAST)
    store = ShardStore(cxr["shards"])
    flags = gaze_flags(store, ModalityView(store, "train", "xray"))
    assert 0 < flags.sum() < len(flags)
    assert seen["items"] == seen["labels"] == flags.sum() and seen["first"]["annotated"][0] == 1
    kdcli_run("distill", "--data", cxr["shards"], "--teacher", cxr["stage1"], "--student", "xray", "--method", "cvi",
              "-p", "annotated_only=false", "--out", tmp_path / "all.pt", *FAST)
    assert seen["items"] == len(flags)


def test_cvi_reports_prior_and_posterior_auroc_on_annotated_dev_images(cxr):
    """Each epoch's row carries both AUROCs on the annotated dev images; the validator computes them as the model
    does: the posterior from (image, gaze), the prior from the image alone, on the images with gaze."""
    from kdcli.data.views import ModalityView
    from kdcli.engine.checkpoint import load_checkpoint
    from kdcli.engine.loop import EngineConfig
    from kdcli.methods.cvi import CVI, annotated_validator
    from kdcli.metrics.classification import multilabel_metrics
    from kdcli.shards.reader import ShardStore
    from kdcli.train import load_model

    store = ShardStore(cxr["shards"])
    rows = [json.loads(line) for line in cxr["cvi"].with_name("cvi.metrics.jsonl").read_text().splitlines()]
    dev_flags = gaze_flags(store, ModalityView(store, "dev", "xray"))
    for row in rows:
        assert row["dev_annotated_images"] == dev_flags.sum()
        assert {"dev_prior_auroc_annotated", "dev_posterior_auroc_annotated", "dev_mean_auroc"} <= set(row)
    # one line on the comparison once training ends; this tiny dev split has too few annotated images to score
    compared = [r for r in rows if r["dev_posterior_auroc_annotated"] is not None]
    expected = "posterior and prior not compared" if not compared else "the posterior"
    assert sum(expected in line for line in cxr["cvi_log"].splitlines()) == 1

    # the validator itself, on a view with enough annotated images to score (the train split, unaugmented)
    model = load_model(load_checkpoint(cxr["cvi"]))
    view = ModalityView(store, "train", "xray", targets=CVI.targets)
    report = annotated_validator(view, store.meta.classes, EngineConfig(batch_size=8, workers=0), "gaze")(
        model, torch.device("cpu"), None)
    items = [view[i] for i in np.flatnonzero(gaze_flags(store, view))]
    images, gaze = torch.stack([it["image"] for it in items]), torch.stack([it["gaze"] for it in items])
    labels = np.stack([it["labels"].numpy() for it in items])
    with torch.no_grad():
        posterior = model(images, gaze)["posterior_logits"].sigmoid().numpy()
        prior = model(images)["logits"].sigmoid().numpy()
    assert report["annotated_images"] == len(items)
    assert report["posterior_auroc_annotated"] == pytest.approx(
        multilabel_metrics(labels, posterior, store.meta.classes)["mean_auroc"], abs=1e-6)
    assert report["prior_auroc_annotated"] == pytest.approx(
        multilabel_metrics(labels, prior, store.meta.classes)["mean_auroc"], abs=1e-6)
    assert report["posterior_auroc_annotated"] != report["prior_auroc_annotated"]
