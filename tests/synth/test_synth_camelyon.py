"""The BCNB / core-biopsy WSI phantom: an OpenSlide-readable Aperio pyramid, BCNB's jpg+json layout, plausible
H&E slides with tumour outlines on the dark nests, a clinical sheet with BCNB's columns, a label signal shown
strongly by the sheet and faintly by the slide, determinism and argument checks (the shared latent itself:
tests/test_camelyon_phantom_latent.py)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import openslide
import polars as pl
import pytest

from kdcli.synth.camelyon import _CLINICAL, ALN_STATUS, CLINICAL_COLUMNS, _plan, _rng, clinical_row, synth_camelyon

SMALL = {"slides": 4, "size": 1024, "seed": 0}


def _tree_bytes(root: Path) -> dict[str, bytes]:
    # the xlsx is left out: xlsxwriter stamps a creation time into it (its content is compared separately)
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.suffix != ".xlsx"
    }


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Mann-Whitney AUC: P(a positive scores above a negative), ties counted half."""
    diff = np.asarray(pos, float)[:, None] - np.asarray(neg, float)[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


@pytest.fixture(scope="module")
def tiff(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("tiff")
    return root, synth_camelyon(root, **SMALL, format="tiff")


@pytest.fixture(scope="module")
def bcnb(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("bcnb")
    return root, synth_camelyon(root, **SMALL, format="bcnb")


def _level0(root: Path, info: dict, sl: dict) -> np.ndarray:
    if info["format"] == "bcnb":
        return cv2.imread(str(root / sl["file"]))[..., ::-1]
    with openslide.OpenSlide(str(root / sl["file"])) as s:
        return np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))


# ---------------------------------------------------------------- layout and file formats


def test_openslide_reads_the_pyramid(tiff: tuple[Path, dict]) -> None:
    root, info = tiff
    assert info["root"] == str(root) and info["format"] == "tiff"
    assert info["mpp"] == 0.5 and info["objective_power"] == 20
    assert sorted(p.name for p in (root / "slides").iterdir()) == [f"cnb_000{k}.tif" for k in range(1, 5)]
    for sl in info["slides"]:
        assert sl["file"] == f"slides/{sl['id']}.tif" and sl["annotation"] == f"annotations/{sl['id']}.json"
        assert openslide.OpenSlide.detect_format(str(root / sl["file"])) == "aperio"
        with openslide.OpenSlide(str(root / sl["file"])) as s:
            assert s.level_count == 3
            assert s.level_dimensions == ((1024, 768), (256, 192), (64, 48))
            assert s.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
            assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
            assert float(s.properties["openslide.mpp-y"]) == pytest.approx(0.5)
            assert s.properties["openslide.objective-power"] == "20"
            assert s.properties["tiff.ImageDescription"].startswith("Aperio Image Library")
            assert s.properties["openslide.level[0].tile-width"] == "256"
            # read_region at level 0 and from a reduced level agree on what is where (tiles decode correctly)
            x0, y0, x1, y1 = sl["tumour_boxes"][0]
            full = np.asarray(s.read_region((0, 0), 0, (1024, 768)).convert("RGB")).astype(np.float32)
            low = np.asarray(s.read_region((0, 0), 1, (256, 192)).convert("RGB")).astype(np.float32)
            assert full.shape == (768, 1024, 3) and low.shape == (192, 256, 3)
            assert np.abs(cv2.resize(full, (256, 192), interpolation=cv2.INTER_AREA) - low).mean() < 3
            patch = np.asarray(s.read_region((x0, y0), 0, (x1 - x0, y1 - y0)).convert("RGB"))
            assert np.array_equal(patch, full[y0:y1, x0:x1].astype(np.uint8))
            thumb = np.asarray(s.get_thumbnail((128, 128)).convert("RGB"))
            assert thumb.shape[1] == 128 and 90 <= thumb.shape[0] <= 98


def test_tiff_is_tiled_jpeg(tiff: tuple[Path, dict]) -> None:
    import tifffile

    root, info = tiff
    with tifffile.TiffFile(root / info["slides"][0]["file"]) as tf:
        assert [p.shape for p in tf.pages] == [(768, 1024, 3), (192, 256, 3), (48, 64, 3)]
        assert all(p.is_tiled and p.tilewidth == p.tilelength == 256 for p in tf.pages)
        assert all(p.compression == 7 for p in tf.pages)  # JPEG
        assert all(p.photometric == 6 and p.tags[530].value == (2, 2) for p in tf.pages)
        assert "|AppMag = 20|MPP = 0.5" in tf.pages[0].description
        assert all(p.description.startswith("Aperio Image Library") for p in tf.pages)
        # pixels per cm fall with the level's downsample (0.5 um/px at level 0: 20000 px/cm)
        assert [p.tags[282].value for p in tf.pages] == [(20000, 1), (5000, 1), (1250, 1)]


def test_bcnb_layout_jpg_and_json(bcnb: tuple[Path, dict]) -> None:
    root, info = bcnb
    assert info["format"] == "bcnb"
    files = sorted(p.name for p in (root / "WSIs").iterdir())
    assert files == sorted([f"{n}.jpg" for n in range(1, 5)] + [f"{n}.json" for n in range(1, 5)])
    assert sorted(p.name for p in root.iterdir()) == ["WSIs", "clinical.xlsx", "latents.csv"]
    for n, sl in enumerate(info["slides"], 1):
        assert sl["id"] == str(n) and sl["file"] == f"WSIs/{n}.jpg" and sl["annotation"] == f"WSIs/{n}.json"
        im = cv2.imread(str(root / sl["file"]))
        assert im.shape == (768, 1024, 3)
        ann = json.loads((root / sl["annotation"]).read_text())
        assert list(ann) == ["positive"]
        assert len(ann["positive"]) == len(sl["tumour_boxes"]) >= 1
        for i, (poly, box) in enumerate(zip(ann["positive"], sl["tumour_boxes"], strict=True)):
            assert poly["name"] == f"Annotation {i}"
            v = np.array(poly["vertices"])
            assert v.ndim == 2 and v.shape[1] == 2 and len(v) >= 8
            assert v.min() >= 0 and v[:, 0].max() < 1024 and v[:, 1].max() < 768
            assert cv2.contourArea(v.astype(np.float32)) > 500  # a real outline, not a degenerate one
            assert [v[:, 0].min(), v[:, 1].min(), v[:, 0].max(), v[:, 1].max()] == box


def test_tiff_annotations_match_boxes(tiff: tuple[Path, dict]) -> None:
    root, info = tiff
    for sl in info["slides"]:
        ann = json.loads((root / sl["annotation"]).read_text())["positive"]
        boxes = [
            [min(x for x, _ in a["vertices"]), min(y for _, y in a["vertices"])]
            + [max(x for x, _ in a["vertices"]), max(y for _, y in a["vertices"])]
            for a in ann
        ]
        assert boxes == sl["tumour_boxes"]
        assert isinstance(sl["pen"], bool) and isinstance(sl["blur"], bool)


# ---------------------------------------------------------------- what the slides look like


@pytest.mark.parametrize("fixture", ["tiff", "bcnb"])
def test_tissue_on_white_background(fixture: str, request: pytest.FixtureRequest) -> None:
    root, info = request.getfixturevalue(fixture)
    for sl in info["slides"]:
        img = _level0(root, info, sl)
        thumb = cv2.resize(img, (256, 192), interpolation=cv2.INTER_AREA)
        sat = cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)[..., 1]
        tissue = sat > 25
        assert 0.05 < tissue.mean() < 0.6, tissue.mean()
        bg = thumb[~tissue]
        assert 225 < bg.mean() < 250 and bg.std() < 8  # near-white glass
        pink = thumb[tissue].mean(0)
        assert pink[0] > pink[1] and pink[2] > pink[1]  # eosin: red and blue above green


def test_tumour_boxes_hold_dense_dark_nuclei(tiff: tuple[Path, dict]) -> None:
    root, info = tiff
    for sl in info["slides"]:
        img = _level0(root, info, sl)
        grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        tissue = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)[..., 1] > 25
        inside = np.zeros(grey.shape, bool)
        for x0, y0, x1, y1 in sl["tumour_boxes"]:
            assert 0 <= x0 < x1 < 1024 and 0 <= y0 < y1 < 768
            inside[y0 : y1 + 1, x0 : x1 + 1] = True
        dark = grey < 110  # haematoxylin-dense nuclei
        t_in, t_out = tissue & inside, tissue & ~inside
        assert t_in.sum() > 1000 and t_out.sum() > 5000
        assert grey[t_in].mean() < grey[t_out].mean() - 8
        assert dark[t_in].mean() > 2 * dark[t_out].mean() and dark[t_in].mean() > 0.08


def test_slides_differ_and_have_artefacts(tmp_path: Path) -> None:
    info = synth_camelyon(tmp_path, slides=16, size=512, format="bcnb", seed=5)
    assert any(s["pen"] for s in info["slides"]) and not all(s["pen"] for s in info["slides"])
    assert any(s["blur"] for s in info["slides"]) and not all(s["blur"] for s in info["slides"])
    for sl in info["slides"]:
        if sl["pen"]:  # ink: strongly saturated pixels that eosin never reaches
            hsv = cv2.cvtColor(cv2.imread(str(tmp_path / sl["file"])), cv2.COLOR_BGR2HSV)
            hue = hsv[..., 0][hsv[..., 1] > 120]
            assert ((hue > 35) & (hue < 130)).sum() > 50  # green to blue


# ---------------------------------------------------------------- clinical sheet


@pytest.mark.parametrize("fixture", ["tiff", "bcnb"])
def test_clinical_sheet(fixture: str, request: pytest.FixtureRequest) -> None:
    root, info = request.getfixturevalue(fixture)
    assert info["clinical"] == str(root / "clinical.xlsx")
    df = pl.read_excel(root / "clinical.xlsx")
    assert tuple(df.columns) == CLINICAL_COLUMNS
    assert df.height == len(info["slides"])
    assert [str(v) for v in df["Patient ID"]] == [s["id"] for s in info["slides"]]
    assert df["ALN status"].to_list() == [s["label"] for s in info["slides"]]
    assert set(df["ALN status"]) <= set(ALN_STATUS)
    assert set(df["ER"]) <= {"Positive", "Negative"} and set(df["HER2"]) <= {"Positive", "Negative"}
    nodes = df["Number of lymph node metastases"].to_list()
    for lab, k in zip(df["ALN status"], nodes, strict=True):
        assert (lab == "N0") == (k == 0) and (lab != "N+(1-2)" or k in (1, 2)) and (lab != "N+(>2)" or k > 2)


def _rows(slides: int, seed: int) -> list[dict]:
    """The sheet's rows of a plan of `slides` patients, as synth_camelyon writes them (without rendering)."""
    return [clinical_row(int(p.id), p.clinical_latent, p.label, _rng(seed, p.pool, p.case, _CLINICAL))
            for p in _plan(slides, seed, "bcnb", False, 0.0, 0, 0)]


def test_clinical_rows_realistic_and_signal() -> None:
    rows = _rows(600, seed=0)
    labels = [r["ALN status"] for r in rows]
    df = pl.DataFrame(rows, schema=list(CLINICAL_COLUMNS), orient="row", infer_schema_length=None)
    counts = {s: labels.count(s) for s in ALN_STATUS}
    assert counts == {"N0": 360, "N+(1-2)": 150, "N+(>2)": 90}
    assert set(df["Tumour Type"]) == {"Invasive ductal carcinoma", "Invasive lobular carcinoma", "Other type"}
    assert set(df["Molecular subtype"]) == {"Luminal A", "Luminal B", "HER2(+)", "Triple negative"}
    assert set(df["Surgical"]) == {"Breast-conserving surgery", "Modified radical mastectomy"}
    assert set(df["HER2 Expression"].drop_nulls()) == {"0", "1+", "2+", "3+"}
    assert set(df["Histological grading"].drop_nulls()) == {1, 2, 3}
    for col in ("HER2 Expression", "Histological grading", "Ki67"):  # a few blank cells, as in the real sheet
        assert 0 < df[col].null_count() < 0.15 * df.height, col
    assert df["Age(years)"].null_count() == 0 and 40 < df["Age(years)"].mean() < 60
    # subtypes follow the receptors: triple negative means ER-, PR- and HER2-
    tn = df.filter(pl.col("Molecular subtype") == "Triple negative")
    assert set(tn["ER"]) == set(tn["PR"]) == set(tn["HER2"]) == {"Negative"}
    assert set(df.filter(pl.col("HER2 Expression") == "3+")["HER2"]) == {"Positive"}
    # the record renders the tumour biology strongly: N+ tumours bigger, Ki67 higher, ER-negative more often
    pos = df.filter(pl.col("ALN status") != "N0")
    neg = df.filter(pl.col("ALN status") == "N0")
    assert pos["Tumour Size(cm)"].mean() > neg["Tumour Size(cm)"].mean() + 0.3
    auc_size = _auc(pos["Tumour Size(cm)"].to_numpy(), neg["Tumour Size(cm)"].to_numpy())
    auc_ki67 = _auc(pos["Ki67"].drop_nulls().to_numpy(), neg["Ki67"].drop_nulls().to_numpy())
    assert 0.8 < auc_size < 0.92 and 0.75 < auc_ki67 < 0.88, (auc_size, auc_ki67)
    assert (pos["ER"] == "Negative").mean() > (neg["ER"] == "Negative").mean()

    # a simple clinical score is strong yet not perfect (the teacher's modality; the slide's latent gives ~0.78)
    def z(col: str, fill: float) -> np.ndarray:
        v = df[col].fill_null(fill).cast(pl.Float64).to_numpy()
        return (v - v.mean()) / v.std()

    er_neg = (df["ER"] == "Negative").to_numpy().astype(float)
    score = z("Tumour Size(cm)", 2.0) + 0.8 * z("Ki67", 20) + 0.6 * z("Histological grading", 2) + 0.5 * er_neg
    y = (df["ALN status"] != "N0").to_numpy()
    assert 0.85 < _auc(score[y], score[~y]) < 0.95


def test_clinical_rows_per_patient_stable() -> None:
    # a patient's row depends on (seed, pool, case) and its latent only: a longer cohort keeps the shorter one's
    # patients (quota sampling keeps each class's first patients of the stream), with the same rows
    def by_case(slides: int, seed: int) -> dict[int, dict]:
        plan = _plan(slides, seed, "bcnb", False, 0.0, 0, 0)
        rows = _rows(slides, seed)
        return {p.case: {k: v for k, v in r.items() if k != "Patient ID"} for p, r in zip(plan, rows, strict=True)}

    small, large = by_case(8, 4), by_case(20, 4)
    assert set(small) < set(large) and all(large[case] == row for case, row in small.items())
    assert small != by_case(8, 5)


# slow: a statistical check on slides of its own; the camelyon phantom's other properties stay fast
@pytest.mark.slow
def test_image_signal_tracks_label(tmp_path: Path) -> None:
    # The image part of the signal: N+ slides carry more and larger tumour regions, but the classes overlap
    # (the summed box area alone reaches ~0.7-0.75 AUC, never a clean split).
    info = synth_camelyon(tmp_path, slides=100, size=512, format="bcnb", seed=1)
    boxes = [s["tumour_boxes"] for s in info["slides"]]
    area = np.array([sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in b) for b in boxes])
    count = np.array([len(b) for b in boxes])
    y = np.array([s["label"] != "N0" for s in info["slides"]])
    assert y.sum() == 40
    assert 0.62 < _auc(area[y], area[~y]) < 0.9
    assert count[y].mean() > count[~y].mean() + 0.3


# ---------------------------------------------------------------- determinism and arguments


@pytest.mark.parametrize("fixture", ["tiff", "bcnb"])
def test_deterministic_and_worker_independent(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    root, info = request.getfixturevalue(fixture)
    again = synth_camelyon(tmp_path / "again", **SMALL, format=info["format"], workers=2)
    other = synth_camelyon(tmp_path / "other", **{**SMALL, "seed": 1}, format=info["format"])
    ref = _tree_bytes(root)
    assert _tree_bytes(tmp_path / "again") == ref
    assert again["slides"] == info["slides"]
    assert pl.read_excel(tmp_path / "again" / "clinical.xlsx").equals(pl.read_excel(root / "clinical.xlsx"))
    assert _tree_bytes(tmp_path / "other") != ref
    assert other["slides"] != info["slides"]
    assert not [p for p in (tmp_path / "again").rglob("*") if ".tmp" in p.name]  # no temp files left behind


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="slides"):
        synth_camelyon(tmp_path, slides=1, size=512)
    with pytest.raises(ValueError, match="size"):
        synth_camelyon(tmp_path, slides=2, size=511)
    with pytest.raises(ValueError, match="size"):
        synth_camelyon(tmp_path, slides=2, size=100_000)
    with pytest.raises(ValueError, match="format"):
        synth_camelyon(tmp_path, slides=2, size=512, format="svs")
    with pytest.raises(ValueError, match="seed"):
        synth_camelyon(tmp_path, slides=2, size=512, seed=-1)
    with pytest.raises(ValueError, match="workers"):
        synth_camelyon(tmp_path, slides=2, size=512, workers=0)
    assert not any(tmp_path.iterdir())  # validated before anything is written
