"""BraTS end to end through the CLI on tiny phantoms: synth -> prepare -> teach (4 sequences, T1ce) ->
distill --method protokd -> evaluate (Dice/HD95 per region, the 15-subset missing-sequence sweep, NIfTI
predictions in the original grid)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import kdcli_run

SEG_FAST = ["--epochs", "2", "--batch-size", "16", "--workers", "0", "--model", "plain-4-2", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def brats(brats_phantom, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("brats")
    raw, shards = brats_phantom["raw"], brats_phantom["shards"]
    paths = {"raw": raw, "shards": shards, "teacher": root / "teacher.pt", "baseline": root / "t1ce.pt",
             "student": root / "protokd.pt"}
    kdcli_run("teach", "--data", shards, "--modality", "t1,t1ce,t2,flair", "--out",
              paths["teacher"], *SEG_FAST)
    kdcli_run("teach", "--data", shards, "--modality", "t1ce", "--out", paths["baseline"], *SEG_FAST)
    kdcli_run("distill", "--data", shards, "--teacher", paths["teacher"], "--student", "t1ce", "--method", "protokd",
              "--out", paths["student"], *SEG_FAST)
    return paths


def test_checkpoints_record_sequences_and_method(brats):
    from kdcli.engine.checkpoint import load_checkpoint

    teacher = load_checkpoint(brats["teacher"]).meta
    student = load_checkpoint(brats["student"]).meta
    assert teacher["model"]["modalities"] == ["t1", "t1ce", "t2", "flair"] and teacher["model"]["in_chans"] == 4
    assert student["model"]["modalities"] == ["t1ce"] and student["method"] == "protokd"
    assert student["method_params"] == {"kd_weight": 10.0, "temperature": 10.0, "proto_weight": 0.1,
                                        "seg_weight": 1.0, "prototype_classes": "per_sample"}
    assert student["teacher"]["modality"] == "t1,t1ce,t2,flair"
    rows = [json.loads(line) for line in brats["student"].with_name("protokd.metrics.jsonl").read_text().splitlines()]
    assert {"train_kd", "train_proto", "train_ce", "train_dice", "dev_dice_wt", "dev_dice_mean",
            "train_proto_tumour_batches", "train_proto_tumour_pairs"} <= set(rows[0])
    assert 0.0 <= rows[0]["train_proto_tumour_pairs"] <= rows[0]["train_proto_tumour_batches"] <= 1.0


def test_evaluate_reports_region_dice_and_hd95(brats):
    result = kdcli_run("evaluate", brats["student"], "--data", brats["shards"], "--json")
    report = json.loads(result.stdout)
    metrics = report["metrics"]
    for region in ("wt", "tc", "et"):
        assert 0.0 <= metrics[f"dice_{region}"] <= 1.0
        assert f"hd95_{region}" in metrics and f"hd95_{region}_undefined" in metrics
    assert metrics["dice_mean"] == pytest.approx(np.mean([metrics[f"dice_{r}"] for r in ("wt", "tc", "et")]))
    assert report["cases"] == len(report["per_case"]) >= 1
    assert report["split"] == "test" and report["modality"] == "t1ce"


def test_missing_all_gives_fifteen_subsets_and_full_set_matches(brats):
    report = json.loads(kdcli_run("evaluate", brats["teacher"], "--data", brats["shards"], "--missing", "all",
                                  "--json").stdout)
    rows = report["missing"]
    assert len(rows) == 15 and len({tuple(r["present"]) for r in rows}) == 15
    assert rows[0]["present"] == ["t1", "t1ce", "t2", "flair"]
    assert rows[0]["dice_mean"] == pytest.approx(report["metrics"]["dice_mean"])
    assert [len(r["present"]) for r in rows] == [4, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1]


def test_predictions_are_nifti_in_the_original_grid(brats, tmp_path):
    out = tmp_path / "preds"
    report = json.loads(kdcli_run("evaluate", brats["teacher"], "--data", brats["shards"], "--predictions", out,
                                  "--json").stdout)
    written = [Path(p) for p in report["predictions"]]
    assert written and all(p.is_file() for p in written)
    case = written[0].name.removesuffix(".nii.gz")
    label_file = next(brats["raw"].rglob(f"{case}_seg.nii*"), None) or next(brats["raw"].rglob(f"{case}*Segm.nii"))
    original, predicted = nib.load(label_file), nib.load(written[0])
    assert predicted.shape == original.shape
    assert np.allclose(predicted.affine, original.affine)
    assert set(np.unique(np.asarray(predicted.dataobj))) <= {0, 1, 2, 4}  # BraTS 2021 convention, ET back to 4


def test_protokd_refuses_classification_style_methods_and_cache(brats, tmp_path):
    result = kdcli_run("distill", "--data", str(brats["shards"]), "--teacher", str(brats["teacher"]),
                       "--student", "t1ce", "--method", "coda", "--out", str(tmp_path / "x.pt"),
                       *SEG_FAST, ok=False)
    assert result.exit_code != 0 and "protokd" in result.output
    result = kdcli_run("distill", "--data", str(brats["shards"]), "--teacher", str(brats["teacher"]),
                       "--student", "t1ce", "--method", "protokd", "--cache-teacher",
                       "--out", str(tmp_path / "y.pt"), *SEG_FAST, ok=False)
    assert result.exit_code != 0 and "online" in result.output
    assert not (tmp_path / "y.pt").exists()


def test_protokd_refuses_an_unknown_prototype_rule_before_training(brats, tmp_path):
    result = kdcli_run("distill", "--data", str(brats["shards"]), "--teacher", str(brats["teacher"]),
                       "--student", "t1ce", "--method", "protokd", "-p", "prototype_classes=batch",
                       "--out", str(tmp_path / "w.pt"), *SEG_FAST, ok=False)
    assert result.exit_code != 0 and "prototype_classes='batch' is not one of per_sample, shared" in result.output
    assert not (tmp_path / "w.pt").exists()


def test_teacher_with_unknown_sequence_is_one_line_error(brats, tmp_path):
    result = kdcli_run("teach", "--data", str(brats["shards"]), "--modality", "t1,dwi",
                       "--out", str(tmp_path / "z.pt"), *SEG_FAST, ok=False)
    assert result.exit_code != 0
    assert result.output.strip().startswith("error:") and "dwi" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_prepare_parts_merge_into_the_one_shot_dataset(brats, tmp_path):
    """Cluster array jobs: two parts + merge give the same manifest, hash and per-case grids as one run."""
    out = tmp_path / "parted"
    for part in ("1/2", "2/2"):
        kdcli_run("prepare", "brats", brats["raw"], "--out", out, "--size", "32", "--part", part)
    kdcli_run("prepare", "merge", out)
    merged, single = (json.loads((d / "dataset.json").read_text()) for d in (out, brats["shards"]))
    assert merged["content_hash"] == single["content_hash"]
    assert json.loads((out / "records.json").read_text()) == json.loads((brats["shards"] / "records.json").read_text())


def test_inspect_names_the_slice_flag_not_the_region_classes(brats):
    report = json.loads(kdcli_run("inspect", brats["shards"], "--json").stdout)
    assert report["label_names"] == ["no tumour", "tumour"]
    train = report["per_class"]["t1ce"]["train"]
    assert set(train) <= {"no tumour", "tumour"} and train["tumour"] > 0
    assert sum(train.values()) == report["counts"]["t1ce"]["train"]
