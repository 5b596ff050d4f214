"""prepare on breast-biopsy WSI phantoms (Aperio-style pyramids and BCNB jpgs): tissue patches at a magnification,
the clinical vector (train-only z-scores, one-hot, missing kept), labels, outlines, thumbnails, and one-line errors
(or notes with skip_bad) for damaged slides, outlines and clinical sheets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import h5py
import numpy as np
import openslide
import polars as pl
import pytest

from kdcli.errors import KdcliError
from kdcli.prepare import PrepareOptions, prepare
from kdcli.sources import SOURCES
from kdcli.sources.camelyon import CamelyonSource, SlideRecord, spread_sample, tissue_mask
from kdcli.synth.camelyon import _svs_bytes, synth_camelyon

SIZE = 32
FAST = {"patch_size": 128, "max_patches": 8}
ALN_INDEX = {"N0": 0, "N+(1-2)": 1, "N+(>2)": 2}

if "camelyon" not in SOURCES:  # the maintainer registers it in kdcli/sources/__init__.py
    SOURCES.add("camelyon", "kdcli.sources.camelyon:CamelyonSource", "breast biopsy WSIs + clinical sheet (BCNB)")


@pytest.fixture(scope="module")
def tiff(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("camelyon") / "tiff"
    return root, synth_camelyon(root, slides=8, format="tiff", size=1024, seed=0)


@pytest.fixture(scope="module")
def bcnb(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("camelyon") / "bcnb"
    return root, synth_camelyon(root, slides=8, format="bcnb", size=1024, seed=1)


def run(raw: Path, out: Path, workers: int = 1, **options):
    return prepare(PrepareOptions(source="camelyon", raw=raw, out=out, size=SIZE, workers=workers,
                                  source_options={**FAST, **options}))


def load(out: Path) -> tuple[dict, pl.DataFrame, dict]:
    return (json.loads((out / "dataset.json").read_text()), pl.read_parquet(out / "manifest.parquet"),
            json.loads((out / "records.json").read_text()))


def stored(out: Path, manifest: pl.DataFrame, record: str) -> dict[str, np.ndarray]:
    rows = manifest.filter(pl.col("record") == record).sort("position")
    arrays: dict[str, list] = {}
    for row in rows.iter_rows(named=True):
        with h5py.File(out / "shards" / row["shard"], "r") as handle:
            assert handle["id"][row["index"]].decode() == row["id"] == f"{record}:{row['position']:04d}"
            for name in ("wsi", "clinical", "clinical_mask", "coords"):
                arrays.setdefault(name, []).append(handle[name][row["index"]])
    result = {name: np.stack(values) for name, values in arrays.items()}
    result["label"] = rows["label"].to_numpy()
    return result


def sheet(raw: Path) -> pl.DataFrame:
    return pl.read_excel(raw / "clinical.xlsx", infer_schema_length=0)


def copy_raw(raw: Path, tmp_path: Path) -> Path:
    target = tmp_path / "raw"
    shutil.copytree(raw, target)
    return target


def write_csv(frame: pl.DataFrame, path: Path) -> Path:
    frame.write_csv(path)
    return path


def expect_error(raw: Path, out: Path, match: str, **options) -> str:
    with pytest.raises(KdcliError, match=match) as caught:
        run(raw, out, **options)
    message = str(caught.value)
    assert "\n" not in message and not out.exists()
    return message


# ---------------------------------------------------------------- end to end


def test_tiff_slides_become_bags_of_tissue_patches(tiff, tmp_path):
    raw, synth = tiff
    out = tmp_path / "out"
    run(raw, out)
    meta, manifest, records = load(out)
    assert meta["source"] == "camelyon" and meta["task"] == "mil" and meta["pairing"] == "paired"
    assert meta["classes"] == ["N0", "N+"]
    assert meta["modalities"] == {"wsi": {"shape": [SIZE, SIZE, 3], "dtype": "uint8"}}
    assert meta["targets"]["coords"] == {"shape": [2], "dtype": "int32", "role": "target"}
    assert meta["targets"]["clinical"]["role"] == "input" and meta["targets"]["clinical_mask"]["role"] == "input"
    assert meta["extra"]["mag"] == 20.0 and meta["extra"]["patch_size"] == 128
    slides = {s["id"]: s for s in synth["slides"]}
    assert set(records) == set(slides) == set(manifest["record"].unique())
    assert manifest["group"].to_list() == manifest["record"].to_list()  # one slide per patient
    # seeded, stratified: every split holds slides, and train holds both classes
    by_record = manifest.unique("record")
    assert set(by_record["split"]) == {"train", "dev", "test"}
    assert set(by_record.filter(pl.col("split") == "train")["label"]) == {0, 1}
    for slide_id, slide in slides.items():
        info = records[slide_id]
        width, height = info["dimensions"]
        assert (info["native_mag"], info["level"], info["patch_level0"]) == (20.0, 0, 128)
        assert info["thumbnail_level"] == 1 and info["thumbnail_downsample"] == 16.0  # 8 mask px per patch
        assert 1 <= info["patches"] == min(8, info["tissue_patches"])
        arrays = stored(out, manifest, slide_id)
        assert arrays["wsi"].shape == (info["patches"], SIZE, SIZE, 3) and arrays["wsi"].dtype == np.uint8
        assert set(arrays["label"]) == {min(ALN_INDEX[slide["label"]], 1)}
        coords = arrays["coords"]
        assert coords.dtype == np.int32 and len({tuple(c) for c in coords}) == len(coords)
        assert (coords >= 0).all() and (coords % 128 == 0).all()
        assert (coords[:, 0] + 128 <= width).all() and (coords[:, 1] + 128 <= height).all()
        with openslide.OpenSlide(str(raw / slide["file"])) as handle:  # independent look at the pixels
            for (x, y), patch in zip(coords, arrays["wsi"], strict=True):
                region = np.asarray(handle.read_region((int(x), int(y)), 0, (128, 128)))[..., :3]
                saturation = cv2.cvtColor(region, cv2.COLOR_RGB2HSV)[..., 1]
                assert (saturation > 8).mean() > 0.2  # on tissue (fat holes and ragged edges aside), not background
                expected = cv2.resize(region, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
                assert np.abs(expected.astype(int) - patch.astype(int)).mean() < 2  # the pixels at those coords


def test_bcnb_jpgs_join_integer_patient_ids(bcnb, tmp_path):
    raw, synth = bcnb
    out = tmp_path / "out"
    run(raw, out, binary=False)
    meta, manifest, records = load(out)
    assert meta["classes"] == ["N0", "N+(1-2)", "N+(>2)"]
    assert sheet(raw)["Patient ID"].to_list()[:2] == ["1", "2"]  # integers in the sheet, stems "1".."8"
    for slide in synth["slides"]:
        info = records[slide["id"]]
        assert info["native_mag"] == 20.0 and info["dimensions"] == [1024, 768] and info["outlines"] >= 1
        labels = manifest.filter(pl.col("record") == slide["id"])["label"]
        assert labels.len() == info["patches"] >= 1 and set(labels) == {ALN_INDEX[slide["label"]]}
    assert set(manifest["label"]) == {0, 1, 2}


def test_workers_get_the_same_clinical_vectors_and_patches(bcnb, tmp_path):
    raw, _ = bcnb
    one = run(raw, tmp_path / "one").meta
    two = run(raw, tmp_path / "two", workers=2).meta  # records (and their vectors) pickled to worker processes
    assert one.content_hash == two.content_hash


def test_magnification_sets_the_patch_extent(tiff, tmp_path):
    raw, _ = tiff
    run(raw, tmp_path / "m20")
    run(raw, tmp_path / "m10", mag=10)
    _, manifest10, records10 = load(tmp_path / "m10")
    records20 = load(tmp_path / "m20")[2]
    for slide_id, info in records10.items():
        assert info["patch_level0"] == 2 * records20[slide_id]["patch_level0"] == 256
        assert info["mag"] == 10.0 and info["level"] == 0  # downsample 2 needed: level 0 (1) is closest below
        assert info["tissue_patches"] < records20[slide_id]["tissue_patches"]
        coords = stored(tmp_path / "m10", manifest10, slide_id)["coords"]
        assert (coords % 256 == 0).all() and (coords[:, 0] + 256 <= 1024).all()


def test_level0_is_only_read_patch_by_patch(tiff, tmp_path, monkeypatch):
    raw, _ = tiff
    calls = []
    original = openslide.OpenSlide.read_region

    def spy(self, location, level, size):
        calls.append((level, tuple(size)))
        return original(self, location, level, size)

    monkeypatch.setattr(openslide.OpenSlide, "read_region", spy)
    run(raw, tmp_path / "out", mag=10)
    records = load(tmp_path / "out")[2]
    level0 = [size for level, size in calls if level == 0]
    assert level0 and set(level0) == {(256, 256)}  # one patch side at 10x on a 20x slide
    assert len(level0) == sum(info["patches"] for info in records.values())
    assert set(calls) - {(0, (256, 256))} == {(2, (64, 48))}  # the thumbnail: the 16x level, once per slide


# ---------------------------------------------------------------- clinical vector


def test_clinical_vector_train_zscores_onehots_and_missing(tiff, tmp_path):
    raw, _ = tiff
    frame = sheet(raw)
    ids = frame["Patient ID"].to_list()
    frame = frame.with_columns(  # one missing Ki67, one missing HER2 Expression; Surgical garbage (unused)
        pl.when(pl.col("Patient ID") == ids[0]).then(None).otherwise(pl.col("Ki67")).alias("Ki67"),
        pl.when(pl.col("Patient ID") == ids[1]).then(None).otherwise(pl.col("HER2 Expression"))
        .alias("HER2 Expression"),
        pl.lit("anything").alias("Surgical"),
    )
    csv = write_csv(frame, tmp_path / "clinical.csv")
    out = tmp_path / "out"
    run(raw, out, clinical=str(csv))
    meta, manifest, _ = load(out)
    clinical = meta["extra"]["clinical"]
    features, encoding = clinical["features"], clinical["encoding"]
    assert len(features) == 23 and meta["prepare"]["source_options"]["clinical"] == str(csv)
    assert not any(f.split("=")[0] in ("Surgical", "Number of lymph node metastases", "ALN status", "Patient ID")
                   for f in features)
    splits = dict(manifest.unique("record").select("record", "split").iter_rows())
    rows = {r["Patient ID"]: r for r in frame.iter_rows(named=True)}
    for name in ("Age(years)", "Tumour Size(cm)", "Ki67"):
        train = [float(rows[i][name]) for i in ids if splits[i] == "train" and rows[i][name] is not None]
        every = [float(rows[i][name]) for i in ids if rows[i][name] is not None]
        stats = encoding["numeric"][name]
        assert stats["mean"] == pytest.approx(np.mean(train)) and stats["std"] == pytest.approx(np.std(train))
        assert stats["mean"] != pytest.approx(np.mean(every))  # dev/test values did not leak into the stats
    for slide_id in ids:
        arrays = stored(out, manifest, slide_id)
        vector, mask = arrays["clinical"], arrays["clinical_mask"]
        assert vector.dtype == np.float16 and mask.dtype == np.uint8 and vector.shape[1] == 23
        assert (vector == vector[0]).all() and (mask == mask[0]).all()  # the same for every patch of the slide
        vector, mask, row = vector[0].astype(float), mask[0], rows[slide_id]
        for name in ("Age(years)", "Tumour Size(cm)", "Ki67"):
            at = features.index(name)
            if row[name] is None:
                assert (vector[at], mask[at]) == (0.0, 0)
            else:
                stats = encoding["numeric"][name]
                assert mask[at] == 1
                assert vector[at] == pytest.approx((float(row[name]) - stats["mean"]) / stats["std"], abs=2e-2)
        for name, values in encoding["categorical"].items():
            at = [features.index(f"{name}={v}") for v in values]
            if row[name] is None:
                assert not vector[at].any() and not mask[at].any()
            else:
                assert mask[at].all() and vector[at].tolist() == [float(v == row[name]) for v in values]
    assert rows[ids[0]]["Ki67"] is None and stored(out, manifest, ids[0])["clinical_mask"][0][2] == 0


# ---------------------------------------------------------------- outlines, thumbnails


def test_annotated_only_keeps_patches_inside_the_outlines(tiff, tmp_path):
    raw, synth = tiff
    options = {"patch_size": 64, "max_patches": 0, "min_tissue": 0.25}
    run(raw, tmp_path / "all", **options)
    # a small tumour (a low image latent) may hold no 64 px patch centre: such a slide is skipped, and said why
    run(raw, tmp_path / "tumour", annotated_only=True, skip_bad=True, **options)
    _, manifest, records = load(tmp_path / "tumour")
    everything = load(tmp_path / "all")[2]
    skipped = {s: r["skipped"] for s, r in records.items() if "skipped" in r}
    assert len(skipped) <= 2 and all("inside the tumour outlines" in reason for reason in skipped.values())
    for slide in synth["slides"]:
        if slide["id"] in skipped:
            continue
        info = records[slide["id"]]
        assert info["annotated_only"] and info["patches"] < everything[slide["id"]]["patches"]
        polygons = [np.array(p["vertices"], np.float32).reshape(-1, 1, 2)
                    for p in json.loads((raw / slide["annotation"]).read_text())["positive"]]
        for x, y in stored(tmp_path / "tumour", manifest, slide["id"])["coords"]:
            centre = (float(x) + 32, float(y) + 32)
            assert any(cv2.pointPolygonTest(p, centre, False) >= 0 for p in polygons)


def test_thumbnails_written_when_asked(bcnb, tmp_path):
    raw, synth = bcnb
    run(raw, tmp_path / "out", thumbnails=str(tmp_path / "out.partial" / "thumbnails"))  # as prepare's CLI does
    folder = tmp_path / "out" / "thumbnails"  # the staging folder became the dataset
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{s['id']}.png" for s in synth["slides"])
    image = cv2.imread(str(folder / "1.png"))
    assert image is not None and image.shape[0] >= 48 and image.std() > 10
    recorded = load(tmp_path / "out")[0]["prepare"]["source_options"]["thumbnails"]
    assert Path(recorded) == folder  # where the PNGs are, not the staging folder they were written to
    run(raw, tmp_path / "plain")
    assert not list(tmp_path.glob("plain*/thumbnails"))


def test_tissue_mask_and_spread_sample_units():
    blank = np.full((64, 64, 3), 240, np.uint8)
    assert not tissue_mask(blank, 8, 8).any()
    tissue = blank.copy()
    cv2.circle(tissue, (32, 32), 20, (200, 120, 180), -1)
    cv2.circle(tissue, (32, 32), 3, (240, 240, 240), -1)  # a small hole: filled
    cv2.circle(tissue, (5, 5), 1, (200, 120, 180), -1)  # a speck: dropped
    mask = tissue_mask(tissue, 8, 8)
    assert mask[32, 32] and not mask[5, 5] and not mask[0, 63]
    picks = spread_sample(100, 8, seed=3)
    assert picks == spread_sample(100, 8, seed=3) and len(picks) == 8
    assert [p // 12.5 for p in picks] == list(range(8))  # one per equal run of candidates
    assert spread_sample(5, 8, seed=0) == list(range(5)) and spread_sample(50, 0, seed=0) == list(range(50))


# ---------------------------------------------------------------- bad input


def test_unreadable_slide(tiff, tmp_path):
    raw = copy_raw(tiff[0], tmp_path)
    (raw / "slides" / "cnb_0003.tif").write_bytes(b"not a tiff at all" * 100)
    message = expect_error(raw, tmp_path / "out", "slide cnb_0003")
    assert "OpenSlide" in message and "--skip-bad" in message
    result = run(raw, tmp_path / "out", skip_bad=True)
    assert any(n.startswith("skipped slide cnb_0003") for n in result.notes)
    assert "cnb_0003" not in load(tmp_path / "out")[2]


def test_blank_white_slide(tiff, tmp_path):
    raw = copy_raw(tiff[0], tmp_path)
    levels = [np.full((768 // d, 1024 // d, 3), 242, np.uint8) for d in (1, 4, 16)]
    (raw / "slides" / "cnb_0002.tif").write_bytes(_svs_bytes(levels))
    expect_error(raw, tmp_path / "out", r"slide cnb_0002: no tissue found")
    result = run(raw, tmp_path / "out", skip_bad=True)
    _, manifest, records = load(tmp_path / "out")
    assert records["cnb_0002"]["skipped"].startswith("no tissue found")
    assert "cnb_0002" not in set(manifest["record"]) and any("cnb_0002" in n for n in result.notes)


def test_invalid_outline_json(bcnb, tmp_path):
    raw = copy_raw(bcnb[0], tmp_path)
    (raw / "WSIs" / "3.json").write_text('{"positive": [{"vertices": [[1, 2], [3')
    expect_error(raw, tmp_path / "out", r"^slide 3: \S+/WSIs/3\.json: not a valid outline JSON")
    (raw / "WSIs" / "3.json").write_text('{"positive": [{"vertices": [[1, 2]]}]}')
    expect_error(raw, tmp_path / "out", r"3\.json: outline 0: vertices must be")
    run(raw, tmp_path / "out", skip_bad=True)
    assert "skipped" in load(tmp_path / "out")[2]["3"]


def test_sheet_without_id_column(bcnb, tmp_path):
    raw = bcnb[0]
    csv = write_csv(sheet(raw).rename({"Patient ID": "ID"}), tmp_path / "clinical.csv")
    message = expect_error(raw, tmp_path / "out", r"clinical\.csv: no id column 'Patient ID'", clinical=str(csv))
    assert "ID, Age(years)" in message  # the sheet's columns, to pick from
    run(raw, tmp_path / "out", clinical=str(csv), id_column="ID")  # and the fix works


def test_ids_on_one_side_only(bcnb, tmp_path):
    raw = bcnb[0]
    frame = sheet(raw)
    csv = write_csv(frame.filter(pl.col("Patient ID") != "4"), tmp_path / "fewer.csv")
    expect_error(raw, tmp_path / "out", r"1 slide\(s\) without a row in fewer\.csv: 4", clinical=str(csv))
    result = run(raw, tmp_path / "out", clinical=str(csv), skip_bad=True)
    assert "4" not in load(tmp_path / "out")[2] and any("without a row" in n for n in result.notes)
    extra = frame.head(1).with_columns(pl.lit("77").alias("Patient ID"))
    csv = write_csv(pl.concat([frame, extra]), tmp_path / "more.csv")
    expect_error(raw, tmp_path / "more", r"1 more\.csv row\(s\) without a slide in RAW: 77", clinical=str(csv))


def test_unknown_category_value(bcnb, tmp_path):
    raw = bcnb[0]
    frame = sheet(raw).with_columns(
        pl.when(pl.col("Patient ID") == "2").then(pl.lit("Positve")).otherwise(pl.col("ER")).alias("ER"))
    csv = write_csv(frame, tmp_path / "clinical.csv")
    expect_error(raw, tmp_path / "out", r"clinical\.csv row 3 \(Patient ID 2\): ER 'Positve' is not one of Positive",
                 clinical=str(csv))
    result = run(raw, tmp_path / "out", clinical=str(csv), skip_bad=True)
    assert "2" not in load(tmp_path / "out")[2] and any(n.startswith("skipped slide 2") for n in result.notes)


def test_unknown_aln_status(bcnb, tmp_path):
    raw = bcnb[0]
    frame = sheet(raw).with_columns(
        pl.when(pl.col("Patient ID") == "5").then(pl.lit("N2")).otherwise(pl.col("ALN status")).alias("ALN status"))
    csv = write_csv(frame, tmp_path / "clinical.csv")
    expect_error(raw, tmp_path / "out", r"row 6 \(Patient ID 5\): ALN status 'N2' is not one of N0",
                 clinical=str(csv))


def test_options_and_records_contract(bcnb):
    raw = bcnb[0]
    with pytest.raises(KdcliError, match="--min-tissue"):
        CamelyonSource(min_tissue=2)
    scan = CamelyonSource(**FAST).scan(raw)
    record = scan.records[0]
    assert isinstance(record, SlideRecord) and list(record.files) == ["wsi"]  # the manifest's modality: "wsi"
    assert len(record.clinical) == len(record.clinical_mask) == scan.arrays["clinical"]["shape"][0] == 23
    assert record.outline.endswith(f"WSIs/{record.id}.json")
    with pytest.raises(KdcliError, match="above the slide's native"):
        info, samples = CamelyonSource(**FAST, mag=40, native_mag=20).read(record, SIZE)
