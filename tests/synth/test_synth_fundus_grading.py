"""The SALL DR/AMD grading phantom: Kaggle-style layouts, balanced labels, hidden second grades that are returned
but never written, determinism, and lesion signals that rise with each disease's grade."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

from kdcli.synth.fundus_grading import AMD_GRADES, DR_GRADES, synth_fundus_grading

SMALL = {"per_class": 3, "amd_per_class": 3, "size": 32, "seed": 0}
# set -> layout -> (csv name, header, image folder, extension)
EXPECTED = {
    "eyepacs": ("trainLabels.csv", ["image", "level"], "train", ".jpeg"),
    "aptos": ("train.csv", ["id_code", "diagnosis"], "train_images", ".png"),
    "amd": ("labels.csv", ["image", "level"], "images", ".png"),
}


def _rows(path: Path) -> tuple[list[str], list[tuple[str, int]]]:
    with open(path, newline="") as f:
        header, *rows = list(csv.reader(f))
    return header, [(name, int(g)) for name, g in rows]


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", params=["eyepacs", "aptos"])
def small(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, dict]:
    root = tmp_path_factory.mktemp(request.param)
    return request.param, root, synth_fundus_grading(root, **SMALL, dr_layout=request.param)


def test_grade_names() -> None:
    assert DR_GRADES == ("none", "mild", "moderate", "severe", "proliferative")
    assert AMD_GRADES == ("none", "early", "intermediate", "late")


def test_layout_headers_and_balanced_labels(small: tuple[str, Path, dict]) -> None:
    layout, root, info = small
    assert info["root"] == str(root)
    for name, key, n_grades in (("dr", layout, len(DR_GRADES)), ("amd", "amd", len(AMD_GRADES))):
        csv_name, header, folder, ext = EXPECTED[key]
        st = info["sets"][name]
        assert st["labels"] == str(root / name / csv_name)
        assert st["images"] == str(root / name / folder)
        got_header, rows = _rows(root / name / csv_name)
        assert got_header == header
        assert st["counts"] == [3] * n_grades
        assert sorted(g for _, g in rows) == sorted(list(range(n_grades)) * 3)
        names = [n for n, _ in rows]
        assert len(set(names)) == len(names)
        for n in names:
            assert "." not in n  # the CSV names images without their extension, as Kaggle's do
            assert (root / name / folder / f"{n}{ext}").is_file(), n
        assert sorted(p.name for p in (root / name / folder).iterdir()) == sorted(f"{n}{ext}" for n in names)
    _, dr_rows = _rows(Path(info["sets"]["dr"]["labels"]))
    _, amd_rows = _rows(Path(info["sets"]["amd"]["labels"]))
    if layout == "eyepacs":
        assert all(n.split("_")[0].isdigit() and n.split("_")[1] in ("left", "right") for n, _ in dr_rows)
    else:
        assert all(len(n) == 12 and int(n, 16) >= 0 for n, _ in dr_rows)
    assert all(n.startswith("amd_") and len(n) == 8 for n, _ in amd_rows)
    assert not {n for n, _ in dr_rows} & {n for n, _ in amd_rows}  # disjoint sets of eyes


def test_images_are_colour_fundus_photos(small: tuple[str, Path, dict]) -> None:
    _, root, info = small
    ims = [cv2.imread(str(p)) for st in info["sets"].values() for p in sorted(Path(st["images"]).iterdir())]
    assert all(im is not None and im.shape == (32, 32, 3) and im.dtype == np.uint8 for im in ims)
    mean_bgr = np.mean([im[12:20, 12:20].reshape(-1, 3).mean(0) for im in ims], 0)
    assert mean_bgr[2] > mean_bgr[1] > mean_bgr[0]  # orange-red retina
    assert np.mean([im[0, 0].max() for im in ims]) < 10  # on black


def test_hidden_grades_returned_and_in_the_root_sidecar_never_in_a_set(small: tuple[str, Path, dict]) -> None:
    layout, root, info = small
    for name, prior_grades in (("dr", len(AMD_GRADES)), ("amd", len(DR_GRADES))):
        st = info["sets"][name]
        _, rows = _rows(Path(st["labels"]))
        assert set(st["hidden"]) == {n for n, _ in rows}
        assert all(0 <= g < prior_grades for g in st["hidden"].values())
    # In each set's folder: its label CSV (two columns), its splits.csv and the images; the latents beside the sets.
    files = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    others = {f for f in files if not f.endswith((".png", ".jpeg"))}
    assert others == {f"dr/{EXPECTED[layout][0]}", f"amd/{EXPECTED['amd'][0]}", "dr/splits.csv", "amd/splits.csv",
                      "latents.csv"}
    for st in info["sets"].values():
        assert all(len(line.split(",")) == 2 for line in Path(st["labels"]).read_text().splitlines())
    with open(root / "latents.csv", newline="") as f:
        latents = {(row["set"], row["image"]): row for row in csv.DictReader(f)}
    for name, other in (("dr", "amd"), ("amd", "dr")):
        for image, hidden in info["sets"][name]["hidden"].items():
            assert int(latents[(name, image)][f"{other}_grade"]) == hidden


def test_deterministic_and_worker_independent(small: tuple[str, Path, dict], tmp_path: Path) -> None:
    layout, root, info = small
    again = synth_fundus_grading(tmp_path / "again", **SMALL, dr_layout=layout)
    synth_fundus_grading(tmp_path / "pool", **SMALL, dr_layout=layout, workers=2)
    other = synth_fundus_grading(tmp_path / "other", **{**SMALL, "seed": 1}, dr_layout=layout)
    ref = _tree_bytes(root)
    assert _tree_bytes(tmp_path / "again") == ref
    assert _tree_bytes(tmp_path / "pool") == ref
    assert again["sets"]["dr"]["hidden"] == info["sets"]["dr"]["hidden"]
    assert _tree_bytes(tmp_path / "other") != ref
    assert other["sets"]["amd"]["hidden"] != info["sets"]["amd"]["hidden"]


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="per_class"):
        synth_fundus_grading(tmp_path, per_class=2, size=32)
    with pytest.raises(ValueError, match="size"):
        synth_fundus_grading(tmp_path, per_class=3, size=31)
    with pytest.raises(ValueError, match="dr_layout"):
        synth_fundus_grading(tmp_path, per_class=3, size=32, dr_layout="messidor")
    assert not any(tmp_path.iterdir())  # validated before anything is written


# ---------------------------------------------------------------- grade signal


def _features(info: dict, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: own grade, hidden grade, [dark-red lesion fraction, pale macular fraction, grey-green fraction].

    Colour ratios relative to the image's own median make the features immune to exposure and camera tint;
    haemorrhage (G/R ~0.45x the background) is redder than a vessel (~0.65x)."""
    st = info["sets"][name]
    _, rows = _rows(Path(st["labels"]))
    ext = next(Path(st["images"]).iterdir()).suffix
    feats = []
    for n, _ in rows:
        im = cv2.imread(f"{st['images']}/{n}{ext}").astype(np.float32) / 255
        b, g, r = im[..., 0], im[..., 1], im[..., 2]
        s = im.shape[0]
        retina = r > 0.15
        gr, br = g / np.maximum(r, 1e-3), b / np.maximum(r, 1e-3)
        gr, br = gr / np.median(gr[retina]), br / np.median(br[retina])
        yy, xx = np.mgrid[:s, :s]
        macula = retina & (np.hypot(xx - s / 2 + 0.5, yy - s / 2 + 0.5) < 0.18 * s)  # the disc lies further out
        feats.append([(retina & (gr < 0.5)).mean(), (macula & (gr > 1.3)).mean(), (macula & (br > 3.0)).mean()])
    hidden = np.array([st["hidden"][n] for n, _ in rows])
    return np.array([g for _, g in rows]), hidden, np.array(feats) * 100


@pytest.fixture(scope="module")
def signal(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return synth_fundus_grading(tmp_path_factory.mktemp("signal"), per_class=10, amd_per_class=10, size=96, seed=0)


def test_red_lesions_rise_with_dr_grade(signal: dict) -> None:
    grade, _, f = _features(signal, "dr")
    red = [f[grade == k, 0].mean() for k in range(len(DR_GRADES))]
    # microaneurysms < + blots < haemorrhages everywhere + beading < + pre-retinal bleed: every step clearly up
    assert all(hi > 1.25 * lo for lo, hi in zip(red, red[1:], strict=False)), red
    assert red[4] > 5 * red[0], red


def test_macular_lesions_rise_with_amd_grade(signal: dict) -> None:
    grade, _, f = _features(signal, "amd")
    pale = [f[grade == k, 1].mean() for k in range(len(AMD_GRADES))]
    green = [f[grade == k, 2].mean() for k in range(len(AMD_GRADES))]
    # drusen: none < small < large confluent; late AMD keeps some drusen around its CNV
    assert pale[1] > 2 * pale[0] and pale[2] > 1.5 * pale[1] and pale[3] > pale[1], pale
    assert green[3] > 0.3 and green[3] > 10 * max(green[:3]), green  # grey-green CNV: late AMD's alone


def test_hidden_grade_is_visible(signal: dict) -> None:
    # The premise of SALL: each set's eyes also show the other disease, at the hidden grade.
    _, hidden_amd, f = _features(signal, "dr")
    assert f[hidden_amd >= 2, 1].mean() > 3 * f[hidden_amd == 0, 1].mean()
    _, hidden_dr, f = _features(signal, "amd")
    assert f[hidden_dr >= 3, 0].mean() > 2 * f[hidden_dr == 0, 0].mean()
