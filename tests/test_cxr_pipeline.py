"""Chest X-rays end to end through the CLI on tiny phantoms: synth -> prepare (gaze heat maps, boxes) -> teach
stage 1 (multi-label BCE) -> distill --method cvi -> evaluate (mean AUROC)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kdcli.cli import app

runner = CliRunner()
FAST = ["--epochs", "2", "--batch-size", "16", "--workers", "0", "--lr", "3e-3"]


def ok(args: list):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def cxr(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cxr")
    raw, shards = root / "raw", root / "shards"
    ok(["synth", "cxr", raw, "--per-class", "3", "--size", "96", "--annotated-fraction", "0.5"])
    ok(["prepare", "cxr", raw, "--out", shards, "--size", "48", "--gaze", raw / "egd-cxr", "--boxes",
        raw / "BBox_List_2017.csv", "--egd-sigma", "10"])
    paths = {"raw": raw, "shards": shards, "stage1": root / "stage1.pt", "cvi": root / "cvi.pt"}
    ok(["teach", "--data", shards, "--modality", "xray", "--model", "test_resnet", "--head", "linear",
        "--out", paths["stage1"], *FAST])
    ok(["distill", "--data", shards, "--teacher", paths["stage1"], "--student", "xray", "--method", "cvi",
        "--out", paths["cvi"], *FAST])
    return paths


def test_stage1_selects_by_mean_auroc_and_evaluates_per_label(cxr):
    report = json.loads(ok(["evaluate", cxr["stage1"], "--data", cxr["shards"], "--json"]).stdout)
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
    report = json.loads(ok(["evaluate", cxr["cvi"], "--data", cxr["shards"], "--json"]).stdout)
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
    ok(["prepare", "cxr", cxr["raw"], "--out", shards, "--size", "48"])
    result = runner.invoke(app, ["distill", "--data", str(shards), "--teacher", str(cxr["stage1"]), "--student",
                                 "xray", "--method", "cvi", "--out", str(tmp_path / "c.pt"), *FAST])
    assert result.exit_code != 0
    assert result.output.strip().startswith("error:") and len(result.output.strip().splitlines()) == 1


def test_cache_teacher_is_refused_where_no_teacher_output_is_read(cxr, tmp_path):
    """CVI's stage-1 teacher only seeds the student: caching its outputs would be work for nothing."""
    result = runner.invoke(app, ["distill", "--data", str(cxr["shards"]), "--teacher", str(cxr["stage1"]),
                                 "--student", "xray", "--method", "cvi", "--cache-teacher",
                                 "--out", str(tmp_path / "c.pt"), *FAST])
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
    ok(["distill", "--data", cxr["shards"], "--teacher", cxr["stage1"], "--student", "xray", "--method", "cvi",
        "--out", tmp_path / "c.pt", "--compile", *FAST])
    assert calls and set(calls) == {2}  # image and annotation map, every step
