"""`kdcli predict` on raw files: the same pixels as `prepare` stored and the same probabilities as `kdcli
evaluate --predictions` on the shards (multieye fundus + OCT with CLAHE/median, chest X-rays with DICOMs,
BraTS label volumes, slides); inputs as files, folders and globs; bad inputs one line each; output formats.

Fast tests use a checkpoint written by hand (an untrained test_resnet, a few hundred milliseconds); the slow
ones train 1-epoch test_resnet / plain U-Net checkpoints on phantoms through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl
import pytest
import torch
from conftest import kdcli_run

from kdcli.engine.checkpoint import load_checkpoint, save_checkpoint
from kdcli.models.classifier import Classifier, default_normalisation
from kdcli.predict.inputs import case_items, expand, image_items
from kdcli.shards.reader import ShardStore

ONE_EPOCH = ["--epochs", "1", "--batch-size", "8", "--workers", "0", "--model", "test_resnet", "--device", "cpu"]


def probabilities(frame: pl.DataFrame, classes: list[str]) -> np.ndarray:
    return frame.select([f"prob_{c}" for c in classes]).to_numpy()


# ------------------------------------------------------------------------------------ hand-made checkpoint
def handmade_classifier(path: Path, source: str = "multieye", modality: str = "fundus", channels: int = 3,
                        size: int = 32, classes: list[str] | None = None, options: dict | None = None,
                        record: bool = True) -> Path:
    """An untrained test_resnet with the meta training writes (and its preprocessing record unless told not)."""
    classes = classes or [f"c{i}" for i in range(4)]
    mean, std = default_normalisation(channels)
    spec = {"backbone": "test_resnet", "head": "linear", "in_chans": channels, "num_classes": len(classes),
            "mean": mean, "std": std}
    torch.manual_seed(0)
    model = Classifier(spec).eval()
    meta = {"kind": "teacher", "task": "classification", "model": spec, "classes": classes, "modality": modality,
            "method": "supervised", "data": {"path": str(path.parent / "gone"), "source": source,
                                             "content_hash": "sha256:0"}}
    if record:
        meta["preprocess"] = {"source": source, "size": size, "options": options or {},
                              "modalities": {modality: {"shape": [size, size, channels], "dtype": "uint8"}}}
    save_checkpoint(path, meta, model.state_dict())
    return path


def write_png(path: Path, seed: int, side: int = 40) -> Path:
    import cv2

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), rng.integers(0, 256, (side, side + 8, 3), dtype=np.uint8))
    return path


@pytest.fixture()
def photos(tmp_path) -> dict[str, Path]:
    folder = tmp_path / "photos"
    good = [write_png(folder / f"eye{i}.png", i) for i in range(3)]
    truncated = folder / "broken.png"
    truncated.write_bytes(good[0].read_bytes()[:60])
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image\n")
    return {"folder": folder, "good": good, "broken": truncated, "notes": notes,
            "checkpoint": handmade_classifier(tmp_path / "fundus.pt")}


def test_bad_inputs_are_one_line_each_and_the_rest_is_written(photos, tmp_path) -> None:
    out = tmp_path / "preds.csv"
    result = kdcli_run("predict", photos["checkpoint"], photos["folder"], photos["notes"], tmp_path / "missing.png",
                       str(tmp_path / "none" / "*.png"), "--out", out, "--device", "cpu", ok=False)
    assert result.exit_code == 1, result.output
    failed = [line for line in result.output.splitlines() if line.startswith("failed ")]
    assert len(failed) == 4, result.output  # truncated PNG, text file, missing file, empty pattern
    assert any("broken.png" in line and "decode" in line for line in failed)
    assert any("missing.png: no such file" in line for line in failed)
    assert "Traceback" not in result.output and "error: 4 input(s) failed" in result.output
    frame = pl.read_csv(out)
    assert frame["id"].to_list() == ["eye0", "eye1", "eye2"]
    assert np.allclose(probabilities(frame, ["c0", "c1", "c2", "c3"]).sum(1), 1.0, atol=1e-5)


def test_strict_stops_at_the_first_bad_input_and_writes_nothing(photos, tmp_path) -> None:
    out = tmp_path / "preds.csv"
    result = kdcli_run("predict", photos["checkpoint"], photos["folder"], "--out", out, "--strict", "--device", "cpu",
                       ok=False)
    assert result.exit_code == 1 and "broken.png" in result.output and "error:" in result.output, result.output
    assert not out.exists() and not list(tmp_path.glob(".preds*"))


def test_output_formats_agree(photos, tmp_path) -> None:
    frames = {}
    for suffix in ("csv", "parquet", "json"):
        out = tmp_path / f"preds.{suffix}"
        kdcli_run("predict", photos["checkpoint"], *photos["good"], "--out", out, "--device", "cpu", "--batch-size",
                  "2")
        frames[suffix] = (pl.read_csv(out) if suffix == "csv" else pl.read_parquet(out) if suffix == "parquet"
                          else pl.DataFrame(json.loads(out.read_text())))
    classes = ["c0", "c1", "c2", "c3"]
    assert np.allclose(probabilities(frames["csv"], classes), probabilities(frames["parquet"], classes))
    assert np.allclose(probabilities(frames["json"], classes), probabilities(frames["parquet"], classes))
    assert frames["json"]["prediction_name"].to_list() == [classes[i] for i in
                                                           probabilities(frames["json"], classes).argmax(1)]
    assert not (tmp_path / "preds").exists()  # no per-input files without --explain


@pytest.mark.slow  # Grad-CAM's import alone takes seconds
def test_explain_writes_a_grad_cam_overlay_per_image(photos, tmp_path) -> None:
    import cv2

    out = tmp_path / "preds.csv"
    kdcli_run("predict", photos["checkpoint"], *photos["good"], "--out", out, "--device", "cpu", "--explain")
    pngs = sorted((tmp_path / "preds").glob("*.gradcam.png"))
    assert [p.name for p in pngs] == ["eye0.gradcam.png", "eye1.gradcam.png", "eye2.gradcam.png"]
    assert pl.read_csv(out)["explanation"].to_list() == [str(p) for p in pngs]
    panel = cv2.imread(str(pngs[0]))
    assert panel.shape[1] > 2 * panel.shape[0]  # the image and its overlay side by side


def test_a_bad_out_name_is_refused_before_any_work(photos, tmp_path) -> None:
    result = kdcli_run("predict", tmp_path / "no-such.pt", photos["folder"], "--out", tmp_path / "preds.xlsx", ok=False)
    assert result.exit_code == 2 and ".csv, .parquet or .json" in result.output, result.output


def test_a_checkpoint_without_a_preprocessing_record_needs_its_dataset(photos, tmp_path) -> None:
    old = handmade_classifier(tmp_path / "old.pt", record=False)
    result = kdcli_run("predict", old, photos["good"][0], "--out", tmp_path / "p.csv", "--device", "cpu", ok=False)
    assert result.exit_code == 1 and "--data" in result.output and "Traceback" not in result.output, result.output


def test_multi_head_checkpoints_give_every_head_its_columns(tmp_path) -> None:
    spec = {"backbone": "test_resnet", "head": "multi", "in_chans": 3, "num_classes": 0, "tasks": {"dr": 5, "amd": 4},
            "mean": list(default_normalisation(3)[0]), "std": list(default_normalisation(3)[1])}
    tasks = {"dr": [str(i) for i in range(5)], "amd": [str(i) for i in range(4)]}
    meta = {"kind": "student", "task": "classification", "model": spec, "classes": [], "tasks": tasks,
            "modality": "fundus", "method": "sall", "data": {"path": "", "source": "fundus-grading"},
            "preprocess": {"source": "fundus-grading", "size": 32, "options": {},
                           "modalities": {"fundus": {"shape": [32, 32, 3], "dtype": "uint8"}}}}
    save_checkpoint(tmp_path / "sall.pt", meta, Classifier(spec).state_dict())
    image = write_png(tmp_path / "eye.png", 1)
    kdcli_run("predict", tmp_path / "sall.pt", image, "--out", tmp_path / "p.csv", "--device", "cpu")
    frame = pl.read_csv(tmp_path / "p.csv")
    for task, classes in tasks.items():
        probs = frame.select([f"prob_{task}_{c}" for c in classes]).to_numpy()
        assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
        assert frame[f"prediction_{task}"].to_list() == probs.argmax(1).tolist()


# ----------------------------------------------------------------------------------------- inputs
def test_inputs_expand_folders_and_globs_once_each(tmp_path) -> None:
    a = write_png(tmp_path / "a" / "x.png", 0)
    b = write_png(tmp_path / "b" / "x.png", 1)
    c = write_png(tmp_path / "b" / "deep" / "y.jpg", 2)
    (tmp_path / "b" / "readme.md").write_text("")
    files, failures = expand([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "*" / "x.png")],
                             (".png", ".jpg"), "images")
    assert files == [a, b, c] and failures == []  # a folder's files before its sub-folders'; the glob adds none
    items, _ = image_items([str(a), str(b)])
    assert [i.id for i in items] == [str(tmp_path / "a" / "x"), str(tmp_path / "b" / "x")]  # same stem: paths


def test_brats_files_group_into_cases_and_unnamed_files_need_a_single_sequence_model(tmp_path) -> None:
    case = tmp_path / "BraTS2021_00001"
    case.mkdir()
    for name in ("t1", "t1ce", "t2", "flair", "seg"):
        (case / f"BraTS2021_00001_{name}.nii.gz").write_bytes(b"")
    (case / "W39_1998.09.19_Segm.nii").write_bytes(b"")  # BraTS 2020's misnamed label: a label, not a sequence
    (tmp_path / "scan.nii").write_bytes(b"")
    items, failures, namings = case_items([str(case), str(tmp_path / "scan.nii")], ["t1", "t1ce", "t2", "flair"])
    assert [(i.id, sorted(i.files)) for i in items] == [("BraTS2021_00001", ["flair", "t1", "t1ce", "t2"])]
    assert len(failures) == 1 and "which sequence" in failures[0].reason
    assert namings == {"BraTS2021_00001": "2018-2021"}
    items, failures, _ = case_items([str(tmp_path / "scan.nii")], ["t1ce"])
    assert failures == [] and items[0].files == {"t1ce": str(tmp_path / "scan.nii")}


# ------------------------------------------------------------------------- equality with evaluate (slow)
def multieye_images(raw: Path, split: str) -> dict[str, Path]:
    """Test-split name -> raw file, per modality folder, from MultiEYE's list files."""
    from kdcli.sources.multieye import LAYOUT, parse_list, resolve_image

    found = {}
    for modality, (folder, subfolder, _) in LAYOUT.items():
        rows = parse_list(raw / folder / split / "large9cls.txt")
        image_dir = raw / folder / "train" / "ImageData" / subfolder
        found[modality] = {name: resolve_image(image_dir, name) for name, _, _ in rows}
    return found


@pytest.fixture(scope="module")
def multieye_run(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predict-multieye")
    kdcli_run("synth", "multieye", root / "raw", "--per-class", "3", "--size", "40")
    # CLAHE and a median filter: preprocessing predict must repeat from the checkpoint's record
    kdcli_run("prepare", "multieye", root / "raw", "--out", root / "shards", "--size", "32", "--clahe", "--median", "3")
    for modality in ("fundus", "oct"):
        kdcli_run("teach", "--data", root / "shards", "--modality", modality, "--out", root / f"{modality}.pt",
                  *ONE_EPOCH)
    return {"root": root, "raw": root / "raw", "shards": root / "shards"}


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["fundus", "oct"])
def test_predict_on_raw_multieye_files_equals_evaluate_on_the_shards(multieye_run, modality) -> None:
    root, checkpoint = multieye_run["root"], multieye_run["root"] / f"{modality}.pt"
    meta = load_checkpoint(checkpoint).meta
    assert meta["preprocess"]["options"] == {"clahe": True, "median": 3}
    kdcli_run("evaluate", checkpoint, "--predictions", root / f"{modality}.eval.csv", "--device", "cpu", "--json")
    files = multieye_images(multieye_run["raw"], "test")[modality]
    out = root / f"{modality}.predict.csv"
    kdcli_run("predict", checkpoint, *files.values(), "--out", out, "--device", "cpu", "--batch-size", "4")
    evaluated = pl.read_csv(root / f"{modality}.eval.csv").with_columns(
        pl.col("id").str.replace(f"^{modality}:", ""))
    predicted = pl.read_csv(out)
    joined = evaluated.join(predicted, on="id", suffix="_raw")
    assert joined.height == evaluated.height == len(files)
    classes = meta["classes"]
    assert np.allclose(probabilities(joined, classes), joined.select([f"prob_{c}_raw" for c in classes]).to_numpy(),
                       atol=1e-6)
    assert joined["prediction"].to_list() == joined["prediction_raw"].to_list()


@pytest.mark.slow
def test_predict_reads_the_pixels_prepare_stored(multieye_run) -> None:
    """Bit for bit: the per-file preprocessing predict runs is the one `prepare` ran (CLAHE, median, resize)."""
    from kdcli.predict.images import image_reader

    store = ShardStore(multieye_run["shards"])
    record = load_checkpoint(multieye_run["root"] / "fundus.pt").meta["preprocess"]
    files = multieye_images(multieye_run["raw"], "test")
    for modality in ("fundus", "oct"):
        rows = store.rows("test", modality)
        reader = image_reader(record, modality)
        for sample, shard, index in zip(rows["id"], rows["shard"], rows["index"], strict=True):
            stored = store.read(shard, int(index), modality)
            assert np.array_equal(reader(str(files[modality][sample.split(":", 1)[1]])), stored), sample
        plain = image_reader({**record, "options": {}}, modality)  # without CLAHE/median: not what was stored
        sample, shard, index = rows["id"][0], rows["shard"][0], rows["index"][0]
        assert not np.array_equal(plain(str(files[modality][sample.split(":", 1)[1]])),
                                  store.read(shard, int(index), modality))


@pytest.mark.slow
def test_predict_on_raw_xrays_and_dicoms_equals_evaluate(tmp_path) -> None:
    raw, shards = tmp_path / "raw", tmp_path / "shards"
    kdcli_run("synth", "cxr", raw, "--per-class", "3", "--size", "96", "--dicom-fraction", "0.5", "--gaze", "none")
    kdcli_run("prepare", "cxr", raw, "--out", shards, "--size", "32")
    kdcli_run("teach", "--data", shards, "--modality", "xray", "--out", tmp_path / "xray.pt", "--head", "linear",
              *ONE_EPOCH)
    kdcli_run("evaluate", tmp_path / "xray.pt", "--predictions", tmp_path / "eval.parquet", "--device", "cpu", "--json")
    kdcli_run("predict", tmp_path / "xray.pt", str(raw / "images_*" / "images"), "--out", tmp_path / "raw.parquet",
              "--device", "cpu", "--workers", "1")
    evaluated, predicted = pl.read_parquet(tmp_path / "eval.parquet"), pl.read_parquet(tmp_path / "raw.parquet")
    assert predicted["path"].str.ends_with(".dcm").any(), "the phantom should hold DICOMs"
    # the CSV names images .png even where the file on disk is the DICOM of the same stem
    predicted = predicted.with_columns(pl.col("path").str.split("/").list.last().str.replace(r"\.dcm$", ".png")
                                       .alias("id"))
    joined = evaluated.join(predicted, on="id", suffix="_raw")
    classes = load_checkpoint(tmp_path / "xray.pt").meta["classes"]
    assert joined.height == evaluated.height > 0
    assert np.allclose(probabilities(joined, classes), joined.select([f"prob_{c}_raw" for c in classes]).to_numpy(),
                       atol=1e-6)
    listed = [c for c, p in zip(classes, probabilities(joined, classes)[0], strict=True) if p >= 0.5]
    assert (joined["findings"][0] or "") == "|".join(listed)


def scrambled(checkpoint: Path, out: Path) -> Path:
    """The checkpoint with a random 1x1 output layer: a 1-epoch U-Net says background everywhere, which would
    make any two label volumes equal; this one paints every class somewhere."""
    loaded = load_checkpoint(checkpoint)
    state = dict(loaded.model)
    generator = torch.Generator().manual_seed(0)
    state["head.weight"] = torch.randn(state["head.weight"].shape, generator=generator) * 2
    state["head.bias"] = torch.zeros_like(state["head.bias"])
    save_checkpoint(out, loaded.meta, state)
    return out


@pytest.mark.slow
def test_predict_on_raw_brats_cases_writes_the_volumes_evaluate_writes(tmp_path) -> None:
    raw, shards = tmp_path / "raw", tmp_path / "shards"
    kdcli_run("synth", "brats", raw, "--cases", "6", "--size", "32")
    kdcli_run("prepare", "brats", raw, "--out", shards, "--size", "32")
    kdcli_run("teach", "--data", shards, "--modality", "t1ce", "--out", tmp_path / "t1ce.pt", "--epochs", "1",
              "--batch-size", "16", "--workers", "0", "--model", "plain-4-2", "--device", "cpu")
    checkpoint = scrambled(tmp_path / "t1ce.pt", tmp_path / "scrambled.pt")
    kdcli_run("evaluate", checkpoint, "--data", shards, "--predictions", tmp_path / "evaluated", "--device", "cpu",
              "--json")
    cases = sorted(p.name.removesuffix(".nii.gz") for p in (tmp_path / "evaluated").glob("*.nii.gz"))
    assert cases
    result = kdcli_run("predict", checkpoint, *(raw / c for c in cases), "--out", tmp_path / "cases.csv", "--device",
                       "cpu", "--explain")
    assert "failed" not in result.output
    single = kdcli_run("predict", checkpoint, raw / cases[0] / f"{cases[0]}_t1ce.nii.gz", "--out",
                       tmp_path / "one.json",
                       "--device", "cpu")
    assert "failed" not in single.output
    table = pl.read_csv(tmp_path / "cases.csv")
    assert table["id"].to_list() == cases
    for case, labels in zip(cases, table["labels"], strict=True):
        expected, got = nib.load(tmp_path / "evaluated" / f"{case}.nii.gz"), nib.load(labels)
        assert np.array_equal(np.asarray(expected.dataobj), np.asarray(got.dataobj)), case
        assert np.allclose(expected.affine, got.affine) and got.shape == nib.load(raw / case /
                                                                                 f"{case}_t1ce.nii.gz").shape
        assert len(np.unique(np.asarray(got.dataobj))) > 1, "scrambled model should paint some tumour"
    assert table["voxels_wt"].to_list() == [int((np.asarray(nib.load(p).dataobj) > 0).sum()) for p in table["labels"]]
    one = json.loads((tmp_path / "one.json").read_text())[0]
    assert np.array_equal(np.asarray(nib.load(one["labels"]).dataobj),
                          np.asarray(nib.load(tmp_path / "evaluated" / f"{cases[0]}.nii.gz").dataobj))
    assert Path(table["explanation"][0]).is_file()


@pytest.mark.slow
def test_predict_on_raw_slides_scores_them_as_evaluate_does(tmp_path) -> None:
    from kdcli.data.bags import BagView
    from kdcli.mil import predict_bags
    from kdcli.train import load_model

    raw, shards = tmp_path / "raw", tmp_path / "shards"
    kdcli_run("synth", "camelyon", raw, "--slides", "8", "--size", "1024")
    kdcli_run("prepare", "camelyon", raw, "--out", shards, "--patch-size", "128", "--max-patches", "6", "--size", "32")
    kdcli_run("teach", "--data", shards, "--modality", "wsi", "--out", tmp_path / "wsi.pt", "--epochs", "1",
              "--batch-size", "4", "--workers", "0", "--model", "test_resnet", "--device", "cpu")
    kdcli_run("predict", tmp_path / "wsi.pt", raw / "slides", "--out", tmp_path / "slides.csv", "--device", "cpu")
    table = pl.read_csv(tmp_path / "slides.csv")
    checkpoint = load_checkpoint(tmp_path / "wsi.pt")
    model, store = load_model(checkpoint), ShardStore(shards)
    got = dict(zip(table["id"], probabilities(table, checkpoint.meta["classes"]), strict=True))
    compared = 0
    for split in ("train", "dev", "test"):
        view = BagView(store, split)
        expected = predict_bags(model, view, torch.device("cpu"), bag_size=checkpoint.meta["bag_size"])["probs"]
        for slide, probs in zip(view.records, expected, strict=True):
            assert np.allclose(got[slide], probs, atol=1e-6), slide
            compared += 1
    assert compared == table.height == 8
    assert all(Path(p).is_file() for p in table["heatmap"])


def test_slide_models_predict_cannot_feed_are_refused_in_one_line(tmp_path) -> None:
    from kdcli.models.mil import MILClassifier, mil_spec

    spec = mil_spec("test_resnet", 2, ["mm"], clinical_dims=4, hidden=8, clinical_hidden=4)
    meta = {"kind": "teacher", "task": "mil", "model": spec, "classes": ["N0", "N+"], "modality": "wsi,clinical",
            "method": "supervised", "data": {"path": "", "source": "camelyon"}, "bag_size": 16,
            "preprocess": {"source": "camelyon", "size": 32, "options": {},
                           "modalities": {"wsi": {"shape": [32, 32, 3], "dtype": "uint8"}}}}
    save_checkpoint(tmp_path / "mm.pt", meta, MILClassifier(spec).state_dict())
    (tmp_path / "slide.tif").write_bytes(b"")
    result = kdcli_run("predict", tmp_path / "mm.pt", tmp_path / "slide.tif", "--out", tmp_path / "p.csv", ok=False)
    assert result.exit_code == 2 and "no WSI-only head" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "p.csv").exists()
