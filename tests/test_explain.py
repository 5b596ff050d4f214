"""`kdcli explain`: files, links, image sizes, concepts, a non-flat Grad-CAM, class coverage, and
one-line errors for bad input. Uses the shared tiny MultiEYE shards and checkpoints from conftest."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import kdcli_run

from kdcli.engine.checkpoint import load_checkpoint, save_checkpoint
from kdcli.explain.common import ExplainOptions, grad_cams, pick_indices
from kdcli.explain.run import explain
from kdcli.models.classifier import Classifier
from kdcli.shards.reader import ShardStore
from kdcli.train import load_model


def linked_images(index: Path) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', index.read_text())


def check_outputs(index: Path) -> dict:
    """index.html, explain.json and the PNGs on disk agree, and every PNG decodes at display size."""
    out = index.parent
    report = json.loads((out / "explain.json").read_text())
    files = [r["file"] for r in report["images"]]
    figures = [report["curves"]] if report["curves"] else []  # the training curves, above the samples
    assert linked_images(index) == figures + files
    assert sorted(p.name for p in out.glob("*.png")) == sorted(figures + files)
    assert not list(out.glob(".*.tmp")), "temporary files left behind"
    for name in files:
        image = cv2.imread(str(out / name), cv2.IMREAD_COLOR)
        assert image is not None, name
        assert image.shape[0] >= 192 and image.shape[1] > 2 * image.shape[0], image.shape
    return report


def modified_copy(source: Path, target: Path, **changes) -> Path:
    checkpoint = load_checkpoint(source)
    save_checkpoint(target, {**checkpoint.meta, **changes}, checkpoint.model)
    return target


def assert_one_line_error(result) -> None:
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output


def test_cli_student_with_concepts(fundus_student, multieye_shards, tmp_path):
    out = tmp_path / "explain"
    result = kdcli_run("explain", fundus_student, "--data", multieye_shards, "--out", out, "--count", 12,
                       "--top-concepts", 4, "--device", "cpu")
    index = out / "index.html"
    assert f"wrote {index}" in result.output
    report = check_outputs(index)
    store = ShardStore(multieye_shards)
    test_labels = set(store.rows("test", "fundus")["label"].to_list())
    assert len(report["images"]) == min(12, len(store.rows("test", "fundus")))
    assert {r["label"] for r in report["images"]} == test_labels  # every class present is shown
    names = load_checkpoint(fundus_student).meta["model"]["concepts"]
    html = index.read_text()
    for record in report["images"]:
        assert record["file"].endswith(".png") and record["id"] in html
        assert record["prediction_name"] == store.classes[record["prediction"]]
        assert 0.0 <= record["probability"] <= 1.0
        assert record["correct"] == (record["label"] == record["prediction"])
        similarities = [c["similarity"] for c in record["concepts"]]
        assert len(similarities) == 4 and similarities == sorted(similarities, reverse=True)
        assert all(c["name"] in names for c in record["concepts"])


def test_library_is_deterministic_and_spreads_classes(oct_teacher, multieye_shards, tmp_path):
    runs = []
    for name in ("a", "b"):
        index = explain(ExplainOptions(oct_teacher, multieye_shards, tmp_path / name, split="train", count=4,
                                       top_concepts=2, device="cpu"))
        assert index == tmp_path / name / "index.html"
        runs.append(check_outputs(index))
    first, second = runs
    assert [r["id"] for r in first["images"]] == [r["id"] for r in second["images"]]
    assert len({r["label"] for r in first["images"]}) == 4  # round-robin: four different classes
    assert first["modality"] == "oct" and first["cam_grid"] == [1, 1]  # 32 px through test_resnet
    assert "cannot localise" in (tmp_path / "a" / "index.html").read_text()
    for name in (r["file"] for r in first["images"]):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_gradcam_reaches_the_feature_map(oct_teacher, multieye_shards):
    # The fixtures' 32 px images give test_resnet a 1x1 last map; at 128 px it is 4x4, enough to localise.
    from kdcli.data.views import ModalityView

    model = load_model(load_checkpoint(oct_teacher))
    view = ModalityView(ShardStore(multieye_shards), "train", "oct")
    images = torch.stack([view[i]["image"] for i in range(3)])
    images = torch.nn.functional.interpolate(images.float(), size=128, mode="bilinear").round().byte()
    cams = grad_cams(model, images, [0, 1, 2], torch.device("cpu"))
    assert cams.shape == (3, 128, 128)
    assert np.isfinite(cams).all() and cams.min() >= 0.0 and cams.max() <= 1.0
    for cam in cams:
        assert cam.max() - cam.min() > 0.1, "flat CAM: the target layer got no gradient"
    assert all(p.grad is None for p in model.parameters())  # no gradients left on the caller's model
    assert not model.feature_map._forward_hooks  # GradCAM's hooks were released


def test_linear_head_lists_no_concepts(oct_teacher, multieye_shards, tmp_path):
    checkpoint = load_checkpoint(oct_teacher)
    spec = {k: v for k, v in checkpoint.meta["model"].items() if k not in ("concepts", "concept_dim")}
    spec["head"] = "linear"
    torch.manual_seed(0)
    path = tmp_path / "linear.pt"
    save_checkpoint(path, {**checkpoint.meta, "model": spec}, Classifier(spec).state_dict())
    index = explain(ExplainOptions(path, multieye_shards, tmp_path / "out", count=2, device="cpu"))
    report = check_outputs(index)
    assert len(report["images"]) == 2 and all(r["concepts"] == [] for r in report["images"])
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", index.read_text(), re.S)
    assert len(captions) == 2 and not any("<table>" in c for c in captions)  # no concept table


def test_pick_indices_round_robin():
    labels = np.array([2, 0, 0, 2, 1, 0, 2])
    assert pick_indices(labels, 3) == [1, 4, 0]
    assert pick_indices(labels, 5) == [1, 4, 0, 2, 3]
    assert pick_indices(labels, 100) == [1, 4, 0, 2, 3, 5, 6]


def test_wrong_modality(oct_teacher, multieye_shards, tmp_path):
    fake = modified_copy(oct_teacher, tmp_path / "slo.pt", modality="slo")
    result = kdcli_run("explain", fake, "--data", multieye_shards, "--out", tmp_path / "out", "--device", "cpu",
                       ok=False)
    assert_one_line_error(result)
    assert "slo" in result.output
    assert not (tmp_path / "out").exists()


def test_modality_with_other_channels(oct_teacher, multieye_shards, tmp_path):
    channels = ShardStore(multieye_shards).meta.modalities
    if channels["fundus"]["shape"][2] == channels["oct"]["shape"][2]:
        pytest.skip("fundus and OCT have the same channel count in this phantom")
    fake = modified_copy(oct_teacher, tmp_path / "as_fundus.pt", modality="fundus")
    assert_one_line_error(kdcli_run("explain", fake, "--data", multieye_shards, "--out", tmp_path / "out", ok=False))


@pytest.mark.parametrize("args", [["--split", "val"], ["--count", "0"], ["--top-concepts", "-1"]])
def test_bad_options(args, oct_teacher, multieye_shards, tmp_path):
    assert_one_line_error(kdcli_run("explain", oct_teacher, "--data", multieye_shards, "--out", tmp_path / "o", *args,
                                    ok=False))


def test_corrupted_checkpoint(oct_teacher, multieye_shards, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(oct_teacher.read_bytes()[:2000])
    result = kdcli_run("explain", broken, "--data", multieye_shards, "--out", tmp_path / "out", ok=False)
    assert_one_line_error(result)
    assert "broken.pt" in result.output


def test_missing_checkpoint_and_out_is_a_file(oct_teacher, multieye_shards, tmp_path):
    assert_one_line_error(kdcli_run("explain", tmp_path / "nope.pt", "--data", multieye_shards, "--out",
                                    tmp_path / "o", ok=False))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line_error(kdcli_run("explain", oct_teacher, "--data", multieye_shards, "--out", blocker, ok=False))


# ------------------------------------------------------------------------------------ page: curves, metrics, warnings
def test_page_shows_training_curves_metrics_and_both_confusions(oct_teacher, multieye_shards, tmp_path):
    from kdcli.engine.curves import curves_path
    from kdcli.evaluate.run import EvaluateOptions, evaluate

    index = explain(ExplainOptions(oct_teacher, multieye_shards, tmp_path / "ex", count=3, device="cpu"))
    report = check_outputs(index)
    page = index.read_text()
    # the curves training drew beside the checkpoint, copied into the report: the page links no file outside it
    assert report["curves"] == "curves.png" and '<img src="curves.png"' in page
    assert (index.parent / "curves.png").read_bytes() == curves_path(oct_teacher).read_bytes()
    assert all("/" not in src for src in linked_images(index))
    # the metrics are the whole split's, as evaluate computes them, not only the three images drawn
    evaluated = evaluate(EvaluateOptions(oct_teacher, multieye_shards, figure=tmp_path / "cm.png", device="cpu"))
    metrics = report["metrics"]
    assert metrics["n"] == len(ShardStore(multieye_shards).rows("test", "oct")) > len(report["images"])
    assert metrics["accuracy"] == pytest.approx(evaluated["metrics"]["accuracy"])
    assert metrics["confusion_matrix"] == evaluated["metrics"]["confusion_matrix"]
    counts, shares = np.array(metrics["confusion_matrix"]), metrics["confusion_matrix_normalised"]
    for row, share in zip(counts, shares, strict=True):
        if row.sum():
            assert share == pytest.approx(list(row / row.sum()), abs=1e-4)
    assert "Confusion matrix: counts" in page and "Confusion matrix: row-normalised" in page
    assert f"<td>{metrics['accuracy']:.3f}</td>" in page
    assert page.index("Metrics") < page.index("curves.png") < page.index(report["images"][0]["file"])


def test_page_without_training_curves_says_so_in_one_line(oct_teacher, multieye_shards, tmp_path):
    bare = modified_copy(oct_teacher, tmp_path / "bare.pt")  # a checkpoint alone, without its sidecars
    index = explain(ExplainOptions(bare, multieye_shards, tmp_path / "ex", count=2, device="cpu"))
    report = check_outputs(index)
    assert report["curves"] is None and not (index.parent / "curves.png").exists()
    lines = [line for line in index.read_text().splitlines() if "training curves" in line.lower()]
    assert lines == [f"<p>No training curves beside this checkpoint ({tmp_path / 'bare.curves.png'} does not "
                     "exist).</p>"]


@pytest.mark.parametrize(("stride", "grid", "warned"), [(16, [2, 2], True), (8, [4, 4], False)])
def test_coarse_gradcam_grid_is_warned_with_the_stride_to_use(stride, grid, warned, multieye_shards, tmp_path):
    # 32 px through test_resnet: stride 16 leaves a 2x2 map (nothing to localise), stride 8 a 4x4 one
    checkpoint = tmp_path / f"os{stride}.pt"
    kdcli_run("teach", "--data", multieye_shards, "--modality", "oct", "--out", checkpoint, "--epochs", "1",
              "--batch-size", "16", "--workers", "0", "--model", "test_resnet", "--output-stride", stride)
    result = kdcli_run("explain", checkpoint, "--data", multieye_shards, "--out", tmp_path / "ex", "--count", 2,
                       "--device", "cpu")
    report = check_outputs(tmp_path / "ex" / "index.html")
    assert report["cam_grid"] == grid
    page = (tmp_path / "ex" / "index.html").read_text()
    line = "warning: the Grad-CAM layer is only 2x2 at this image size"
    assert (line in result.stderr) == warned and (line in page) == warned
    if warned:  # the model already has stride 16: the advice is the next finer one
        assert "retrain with --output-stride 8" in result.stderr and "cannot localise" in page
        assert any("2x2" in w for w in report["warnings"])
    else:
        assert not any("Grad-CAM layer" in w for w in report["warnings"])


def test_model_at_chance_is_warned_by_explain_and_evaluate(oct_teacher, multieye_shards, tmp_path):
    checkpoint = load_checkpoint(oct_teacher)
    blank = tmp_path / "blank.pt"  # a zero classifier layer: the same probabilities for every image, kappa 0, AUC 0.5
    assert "head.classifier.weight" in checkpoint.model
    save_checkpoint(blank, checkpoint.meta, {k: torch.zeros_like(v) if k.startswith("head.classifier.") else v
                                             for k, v in checkpoint.model.items()})
    result = kdcli_run("explain", blank, "--data", multieye_shards, "--out", tmp_path / "ex", "--count", 2,
                       "--device", "cpu")
    report = json.loads((tmp_path / "ex" / "explain.json").read_text())
    assert report["metrics"]["kappa"] == 0.0 and report["metrics"]["auc"] == pytest.approx(0.5)
    assert "warning: the model is at chance on test (kappa 0.000, AUC 0.500)" in result.stderr
    assert "the model is at chance on test" in (tmp_path / "ex" / "index.html").read_text()
    evaluated = kdcli_run("evaluate", blank, "--data", multieye_shards, "--json", "--figure", tmp_path / "cm.png")
    assert f"warning: {blank} is at chance on test" in evaluated.stderr
    assert json.loads(evaluated.stdout)["metrics"]["kappa"] == 0.0  # stdout stays pure JSON
