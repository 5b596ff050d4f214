"""teach / distill / evaluate through the CLI on MultiEYE phantoms, and the bad inputs around them."""

from __future__ import annotations

import json
import shutil

import polars as pl
import pytest
import torch
from conftest import FAST, kdcli_run
from test_prepare_multieye import assert_one_line_error

from kdcli.engine.checkpoint import load_checkpoint


def test_teach_writes_checkpoint_logs_and_config(oct_teacher, multieye_shards):
    checkpoint = load_checkpoint(oct_teacher)
    meta = checkpoint.meta
    assert meta["kind"] == "teacher" and meta["modality"] == "oct" and meta["method"] == "supervised"
    assert meta["model"]["backbone"] == "test_resnet" and meta["model"]["head"] == "concept"
    assert meta["model"]["in_chans"] == 1 and len(meta["model"]["concepts"]) > 9
    assert meta["model"]["concept_scale"] == 1.0  # the official concept classifier sees unscaled cosines
    data_hash = json.loads((multieye_shards / "dataset.json").read_text())["content_hash"]
    assert meta["data"]["content_hash"] == data_hash
    assert meta["config"]["epochs"] == 2 and meta["best"]["metric"] == "macro_f1"
    raw = torch.load(oct_teacher, weights_only=True)  # loads without unpickling code
    assert set(raw) == {"format", "version", "meta", "model", "state", "digest"}  # digest: checked on load
    rows = [json.loads(line) for line in oct_teacher.with_name("oct.metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all("dev_macro_f1" in r for r in rows)
    assert pl.read_csv(oct_teacher.with_name("oct.metrics.csv")).height == 2
    assert json.loads(oct_teacher.with_name("oct.config.json").read_text())["modality"] == "oct"
    assert "optimizer" in load_checkpoint(oct_teacher.with_name("oct.last.pt")).state


def test_student_records_its_teacher(fundus_student, oct_teacher):
    from kdcli.engine.checkpoint import file_sha256

    meta = load_checkpoint(fundus_student).meta
    assert meta["kind"] == "student" and meta["method"] == "coda" and meta["modality"] == "fundus"
    assert meta["teacher"]["sha256"] == file_sha256(oct_teacher) and meta["teacher"]["modality"] == "oct"
    assert meta["method_params"] == {"alpha": 0.6, "beta": 0.05, "temperature": 10.0, "gate": True,
                                     "global_grad": False}
    assert meta["model"]["concepts"] == load_checkpoint(oct_teacher).meta["model"]["concepts"]
    rows = fundus_student.with_name("fundus.metrics.jsonl").read_text().splitlines()
    assert {"train_ce", "train_glob", "train_local", "train_gate"} <= set(json.loads(rows[0]))


def test_evaluate_json_is_pure_and_predictions_are_written(fundus_student, multieye_shards, tmp_path):
    result = kdcli_run("evaluate", str(fundus_student), "--data", str(multieye_shards), "--json",
                       "--predictions", str(tmp_path / "p.parquet"),
                       "--figure", str(tmp_path / "cm.png"))
    report = json.loads(result.stdout)
    metrics = report["metrics"]
    assert {"accuracy", "macro_f1", "kappa", "auc", "ap", "per_class_f1", "confusion_matrix"} <= set(metrics)
    assert metrics["n"] == 9 and sum(map(sum, metrics["confusion_matrix"])) == 9
    predictions = pl.read_parquet(tmp_path / "p.parquet")
    assert predictions.height == 9 and predictions["id"].str.starts_with("fundus:").all()
    probs = predictions.select(pl.col("^prob_.*$")).to_numpy()
    assert probs.shape == (9, 9) and abs(probs.sum(1) - 1).max() < 1e-4
    assert (predictions["prediction"].to_numpy() == probs.argmax(1)).all()
    accuracy = (predictions["prediction"] == predictions["label"]).mean()
    assert accuracy == pytest.approx(metrics["accuracy"])
    assert (tmp_path / "cm.png").stat().st_size > 1000
    csv = kdcli_run("evaluate", fundus_student, "--data", multieye_shards, "--split", "dev",
                    "--predictions", tmp_path / "p.csv", ok=False)
    assert csv.exit_code == 0 and pl.read_csv(tmp_path / "p.csv").height == 9


def test_same_seed_same_weights_and_resume_continues(multieye_shards, tmp_path):
    args = ["teach", "--data", multieye_shards, "--modality", "fundus", *FAST, "--head", "linear"]
    kdcli_run(*args, "--out", tmp_path / "a.pt")
    kdcli_run(*args, "--out", tmp_path / "b.pt")
    a, b = load_checkpoint(tmp_path / "a.pt").model, load_checkpoint(tmp_path / "b.pt").model
    assert all(torch.equal(a[k], b[k]) for k in a)
    before = (tmp_path / "a.pt").read_bytes()
    assert_one_line_error(kdcli_run(*args, "--out", tmp_path / "a.pt", ok=False), "exists", "--overwrite")
    assert (tmp_path / "a.pt").read_bytes() == before
    resumed = kdcli_run(*args, "--out", tmp_path / "a.pt", "--resume", "--epochs", "3")
    assert "resuming at epoch 3/3" in resumed.output
    rows = (tmp_path / "a.metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2, 3]


def test_config_file_is_used_and_flags_override_it(multieye_shards, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model: test_resnet\nepochs: 1\nbatch_size: 8\nworkers: 0\nlr: 0.002\nhead: linear\n"
                      "params:\n  label_smoothing: 0.1\n")
    kdcli_run("teach", "--data", multieye_shards, "--modality", "oct", "--config", config,
              "--batch-size", "16", "--out", tmp_path / "c.pt")
    saved = load_checkpoint(tmp_path / "c.pt").meta
    assert saved["config"]["batch_size"] == 16 and saved["config"]["lr"] == 0.002
    assert saved["method_params"]["label_smoothing"] == 0.1
    toml = tmp_path / "run.toml"
    toml.write_text('epochs = 1\nmodel = "test_resnet"\nbogus = 3\n')
    assert_one_line_error(kdcli_run("teach", "--data", multieye_shards, "--modality", "oct", "--config", toml,
                                    "--out", tmp_path / "d.pt", ok=False), "bogus")


def test_paired_data_runs_hinton_kd(tmp_path):
    from kdcli.prepare import PrepareOptions, prepare
    from kdcli.synth.multieye import synth_multieye

    synth_multieye(tmp_path / "raw", per_class=3, size=16, seed=2, paired=True)
    prepare(PrepareOptions(source="multieye", raw=tmp_path / "raw", out=tmp_path / "s", size=16))
    common = ["--data", tmp_path / "s", "--epochs", "1", "--batch-size", "8", "--workers", "0",
              "--model", "test_resnet", "--head", "linear"]
    kdcli_run("teach", *common, "--modality", "oct", "--out", tmp_path / "t.pt")
    kdcli_run("distill", *common, "--teacher", tmp_path / "t.pt", "--student", "fundus", "--method", "kd",
              "-p", "temperature=2", "--out", tmp_path / "s.pt")
    assert load_checkpoint(tmp_path / "s.pt").meta["method_params"]["temperature"] == 2.0


def test_distill_bad_inputs(multieye_shards, oct_teacher, tmp_path):
    base = ["distill", "--data", multieye_shards, "--teacher", oct_teacher, "--student", "fundus", *FAST,
            "--out", tmp_path / "x.pt"]
    assert_one_line_error(kdcli_run(*base, "--method", "nope", ok=False), "unknown method 'nope'", "coda")
    assert_one_line_error(kdcli_run(*base, "--method", "coda", "-p", "alpah=1", ok=False), "alpha=0.6")
    assert_one_line_error(kdcli_run(*base, "--method", "kd", ok=False), "paired")
    assert_one_line_error(kdcli_run(*base[:-2], "--method", "coda", "--out", tmp_path / "x.pt", "--student", "xray",
                                    ok=False),
                          "xray")
    assert not (tmp_path / "x.pt").exists()


def test_checkpoint_for_other_classes_or_modality_or_damaged_is_refused(fundus_student, multieye_shards,
                                                                         tmp_path):
    from kdcli.engine.checkpoint import save_checkpoint

    checkpoint = load_checkpoint(fundus_student)
    other_classes = {**checkpoint.meta, "classes": ["a", "b"]}
    save_checkpoint(tmp_path / "classes.pt", other_classes, checkpoint.model)
    assert_one_line_error(kdcli_run("evaluate", tmp_path / "classes.pt", "--data", multieye_shards,
                                    ok=False), "classes")
    other_modality = {**checkpoint.meta, "modality": "xray"}
    save_checkpoint(tmp_path / "modality.pt", other_modality, checkpoint.model)
    assert_one_line_error(kdcli_run("evaluate", tmp_path / "modality.pt", "--data", multieye_shards, ok=False), "xray")
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(fundus_student.read_bytes()[:5000])
    assert_one_line_error(kdcli_run("evaluate", damaged, "--data", multieye_shards, ok=False), str(damaged), "damaged")
    assert_one_line_error(kdcli_run("evaluate", tmp_path / "none.pt", "--data", multieye_shards, ok=False), "not found")
    assert_one_line_error(kdcli_run("evaluate", fundus_student, "--data", tmp_path, ok=False), "dataset.json")


def test_out_is_not_a_directory_and_resume_needs_a_run(multieye_shards, tmp_path):
    assert_one_line_error(kdcli_run("teach", "--data", multieye_shards, "--modality", "oct", *FAST, "--out", tmp_path,
                                    ok=False),
                          "directory")
    assert_one_line_error(kdcli_run("teach", "--data", multieye_shards, "--modality", "oct", *FAST, "--resume",
                                    "--out", tmp_path / "new.pt", ok=False), "nothing to resume")


def test_teacher_data_from_a_copy_still_loads(oct_teacher, multieye_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(multieye_shards, copy)
    result = kdcli_run("evaluate", oct_teacher, "--data", copy, "--json", ok=False)
    assert result.exit_code == 0 and json.loads(result.stdout)["data_hash_matches"] is True


def test_student_starts_from_the_baselines_initial_weights(multieye_shards, oct_teacher, tmp_path):
    """Student vs baseline isolates distillation only if both start from the same weights and see the same
    batches: with a vanishing learning rate, the two must end up identical (BatchNorm statistics included)."""
    frozen = ["--data", multieye_shards, "--model", "test_resnet", "--epochs", "1", "--batch-size", "16",
              "--workers", "0", "--lr", "1e-30", "--set", "min_lr=1e-31", "--seed", "5"]
    kdcli_run("teach", *frozen, "--modality", "fundus", "--out", tmp_path / "base.pt")
    kdcli_run("distill", *frozen, "--teacher", oct_teacher, "--student", "fundus", "--method", "coda",
              "--out", tmp_path / "kd.pt")
    base, student = load_model_state(tmp_path / "base.pt"), load_model_state(tmp_path / "kd.pt")
    assert all(torch.allclose(base[k].float(), student[k].float(), atol=1e-6) for k in base)


def load_model_state(path):
    return load_checkpoint(path).model
