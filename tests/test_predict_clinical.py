"""`kdcli predict --clinical SHEET` on raw slides: each slide's sheet row encoded as `prepare camelyon` encoded it
(the checkpoint's recorded encoding, no shards read), scored as `kdcli evaluate` scores slides whose records are
present; a slide without a row takes the WSI-only route or is one failure line; a bad sheet is one line.

One module-scoped run: an 8-slide camelyon phantom prepared from a CSV sheet with empty cells, a 1-epoch fusion
teacher (`teach --modality wsi,clinical`), and an untrained bidirectional model written by hand with its meta."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import kdcli_run

from kdcli.engine.checkpoint import load_checkpoint, save_checkpoint
from kdcli.shards.reader import ShardStore

pytestmark = pytest.mark.slow


def read_sheet(path: Path) -> pl.DataFrame:
    return pl.read_excel(path, infer_schema_length=0) if path.suffix == ".xlsx" else \
        pl.read_csv(path, infer_schema_length=0)


def probabilities(frame: pl.DataFrame, classes: list[str]) -> dict[str, np.ndarray]:
    probs = frame.select([f"prob_{c}" for c in classes]).to_numpy()
    return dict(zip(frame["id"], probs, strict=True))


def evaluated(checkpoint_path: Path, shards: Path, hidden: set[str] = frozenset()) -> dict[str, np.ndarray]:
    """Every slide's probabilities as `kdcli evaluate` computes them on the shards (records present unless
    hidden: the missing-rate sweep's route)."""
    from kdcli.data.bags import BagView
    from kdcli.mil import predict_bags
    from kdcli.models.loading import load_model

    checkpoint = load_checkpoint(checkpoint_path)
    model, store = load_model(checkpoint), ShardStore(shards)
    out = {}
    for split in ("train", "dev", "test"):
        view = BagView(store, split, hide_clinical=set(hidden))
        predicted = predict_bags(model, view, torch.device("cpu"), bag_size=checkpoint.meta["bag_size"])
        out.update(zip(view.records, predicted["probs"], strict=True))
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    from kdcli.models.mil import MILClassifier

    root = tmp_path_factory.mktemp("clinical")
    raw, shards = root / "raw", root / "shards"
    kdcli_run("synth", "camelyon", raw, "--slides", "8", "--size", "1024")
    sheet = read_sheet(raw / "clinical.xlsx")
    # empty cells (a missing numeric and a missing category) so the mask path is compared too
    sheet = sheet.with_columns([pl.when(pl.col("Patient ID") == "cnb_0002").then(pl.lit(None, pl.String))
                                .otherwise(pl.col(name)).alias(name) for name in ("Age(years)", "ER")])
    sheet.write_csv(root / "clinical.csv")
    (raw / "clinical.xlsx").unlink()
    kdcli_run("prepare", "camelyon", raw, "--out", shards, "--clinical", root / "clinical.csv", "--patch-size", "128",
              "--max-patches", "6", "--size", "32")
    kdcli_run("teach", "--data", shards, "--modality", "wsi,clinical", "--out", root / "mm.pt", "--epochs", "1",
              "--batch-size", "4", "--workers", "0", "--model", "test_resnet", "--device", "cpu")
    mm = load_checkpoint(root / "mm.pt")
    spec = {**mm.meta["model"], "branches": ["mm", "sm"]}
    torch.manual_seed(1)
    save_checkpoint(root / "both.pt", {**mm.meta, "model": spec, "kind": "student"}, MILClassifier(spec).state_dict())
    return {"root": root, "raw": raw, "shards": shards, "sheet": root / "clinical.csv", "mm": root / "mm.pt",
            "both": root / "both.pt"}


def test_the_checkpoint_records_the_clinical_encoding_prepare_used(run) -> None:
    recorded = load_checkpoint(run["mm"]).meta["preprocess"]["clinical"]
    prepared = ShardStore(run["shards"]).meta.extra["clinical"]
    assert recorded["encoding"] == prepared["encoding"] and recorded["features"] == prepared["features"]
    assert recorded["id_column"] == "Patient ID"


def test_predict_with_the_sheet_equals_evaluate_with_records_present(run) -> None:
    out = run["root"] / "mm.csv"
    moved = run["root"] / "moved"
    run["shards"].rename(moved)  # predict reads the encoding from the checkpoint, never the shards
    try:
        kdcli_run("predict", run["mm"], run["raw"] / "slides", "--clinical", run["sheet"], "--out", out, "--device",
                  "cpu")
    finally:
        moved.rename(run["shards"])
    table = pl.read_csv(out)
    classes = load_checkpoint(run["mm"]).meta["classes"]
    got, expected = probabilities(table, classes), evaluated(run["mm"], run["shards"])
    assert sorted(got) == sorted(expected) and len(got) == 8
    for slide, probs in expected.items():
        assert np.allclose(got[slide], probs, atol=1e-6), slide
    assert table["clinical_used"].to_list() == [True] * 8
    # the record matters: zero-filled records (what predict fed before --clinical) answer differently
    zero_filled = evaluated(run["mm"], run["shards"], hidden=set(expected))
    assert max(np.abs(got[s] - zero_filled[s]).max() for s in expected) > 1e-4


def test_a_fusion_model_without_the_sheet_is_refused_in_one_line(run) -> None:
    result = kdcli_run("predict", run["mm"], run["raw"] / "slides", "--out", run["root"] / "refused.csv", ok=False)
    assert result.exit_code == 2 and "no WSI-only head" in result.output and "--clinical" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_slide_without_a_row_takes_the_wsi_only_route_or_fails_in_one_line(run) -> None:
    partial = run["root"] / "partial.csv"
    read_sheet(run["sheet"]).filter(pl.col("Patient ID") != "cnb_0003").write_csv(partial)
    classes = load_checkpoint(run["mm"]).meta["classes"]

    out = run["root"] / "both.csv"
    kdcli_run("predict", run["both"], run["raw"] / "slides", "--clinical", partial, "--out", out, "--device", "cpu")
    table = pl.read_csv(out)
    used = dict(zip(table["id"], table["clinical_used"], strict=True))
    assert used.pop("cnb_0003") is False and all(used.values()) and len(used) == 7
    got, expected = probabilities(table, classes), evaluated(run["both"], run["shards"], hidden={"cnb_0003"})
    for slide, probs in expected.items():
        assert np.allclose(got[slide], probs, atol=1e-6), slide

    result = kdcli_run("predict", run["mm"], run["raw"] / "slides", "--clinical", partial, "--out",
                       run["root"] / "mm_partial.csv", "--device", "cpu", ok=False)
    assert result.exit_code == 1, result.output
    failed = [line for line in result.output.splitlines() if line.startswith("failed")]
    assert len(failed) == 1 and "cnb_0003" in failed[0] and "no row" in failed[0] and "partial.csv" in failed[0]
    assert pl.read_csv(run["root"] / "mm_partial.csv").height == 7


def test_a_sheet_without_a_column_the_model_reads_is_one_line_naming_it(run) -> None:
    sheet = run["root"] / "no_er.csv"
    read_sheet(run["sheet"]).drop("ER").write_csv(sheet)
    result = kdcli_run("predict", run["mm"], run["raw"] / "slides", "--clinical", sheet, "--out",
                       run["root"] / "no_er_out.csv", "--device", "cpu", ok=False)
    assert result.exit_code == 1 and str(sheet) in result.output and "'ER'" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (run["root"] / "no_er_out.csv").exists()


def test_an_unknown_category_fails_that_slide_in_one_line_naming_the_sheet(run) -> None:
    sheet = run["root"] / "typo.csv"
    read_sheet(run["sheet"]).with_columns(pl.when(pl.col("Patient ID") == "cnb_0005").then(pl.lit("Maybe"))
                                          .otherwise(pl.col("PR")).alias("PR")).write_csv(sheet)
    out = run["root"] / "typo_out.csv"
    result = kdcli_run("predict", run["mm"], run["raw"] / "slides", "--clinical", sheet, "--out", out, "--device",
                       "cpu", ok=False)
    assert result.exit_code == 1, result.output
    failed = [line for line in result.output.splitlines() if line.startswith("failed")]
    assert len(failed) == 1 and "cnb_0005" in failed[0] and str(sheet) in failed[0] and "'Maybe'" in failed[0]
    assert pl.read_csv(out).height == 7
    strict = kdcli_run("predict", run["mm"], run["raw"] / "slides", "--clinical", sheet, "--out",
                       run["root"] / "typo_strict.csv", "--device", "cpu", "--strict", ok=False)
    assert strict.exit_code == 1 and "'Maybe'" in strict.output and not (run["root"] / "typo_strict.csv").exists()


def test_clinical_is_refused_where_no_model_reads_it(run, tmp_path) -> None:
    from kdcli.models.mil import MILClassifier

    mm = load_checkpoint(run["mm"])
    spec = {**mm.meta["model"], "branches": ["sm"]}
    save_checkpoint(tmp_path / "wsi.pt", {**mm.meta, "model": spec, "modality": "wsi"},
                    MILClassifier(spec).state_dict())
    result = kdcli_run("predict", tmp_path / "wsi.pt", run["raw"] / "slides", "--clinical", run["sheet"], "--out",
                       tmp_path / "p.csv", ok=False)
    assert result.exit_code == 2 and "drop --clinical" in result.output, result.output

    from test_predict import handmade_classifier

    image = handmade_classifier(tmp_path / "image.pt")
    shutil.copy(run["sheet"], tmp_path / "sheet.csv")
    result = kdcli_run("predict", image, tmp_path / "sheet.csv", "--clinical", tmp_path / "sheet.csv", "--out",
                       tmp_path / "q.csv", ok=False)
    assert result.exit_code == 2 and "--clinical applies to slide datasets" in result.output, result.output


def test_a_checkpoint_recorded_before_the_clinical_encoding_reads_it_from_its_dataset(run, tmp_path) -> None:
    mm = load_checkpoint(run["mm"])
    record = {k: v for k, v in mm.meta["preprocess"].items() if k != "clinical"}
    save_checkpoint(tmp_path / "old.pt", {**mm.meta, "preprocess": record}, mm.model)
    kdcli_run("predict", tmp_path / "old.pt", run["raw"] / "slides", "--clinical", run["sheet"], "--out",
              tmp_path / "old.csv", "--device", "cpu")
    got = probabilities(pl.read_csv(tmp_path / "old.csv"), mm.meta["classes"])
    for slide, probs in evaluated(run["mm"], run["shards"]).items():
        assert np.allclose(got[slide], probs, atol=1e-6), slide
    moved = run["root"] / "moved"
    run["shards"].rename(moved)
    try:
        result = kdcli_run("predict", tmp_path / "old.pt", run["raw"] / "slides", "--clinical", run["sheet"], "--out",
                           tmp_path / "gone.csv", "--device", "cpu", ok=False)
    finally:
        moved.rename(run["shards"])
    assert result.exit_code == 1 and "predates the clinical encoding" in result.output, result.output
    assert "--data" in result.output and len(result.output.strip().splitlines()) == 1
