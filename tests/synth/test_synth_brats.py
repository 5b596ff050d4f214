"""The BraTS phantom: each release's real layout and quirks, NIfTI geometry and dtypes, label conventions,
determinism, the shared design (one per-case latent rendered by every sequence, strongly in T1/T2/FLAIR, weakly
and per case in T1ce), train-only rater noise, the fixed extra test set, and the negative control (today's
fixed contrasts: oedema plain in FLAIR/T2, only faint in T1ce; ET bright in T1ce)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl
import pytest
from conftest import kdcli_run
from scipy import ndimage as ndi

from kdcli.synth.brats import MISNAMED_2020, affine, synth_brats

SEQS = ("t1", "t1ce", "t2", "flair")
SUFFIXES = {
    "2018": ("_t1.nii.gz", "_t1ce.nii.gz", "_t2.nii.gz", "_flair.nii.gz", "_seg.nii.gz"),
    "2019": ("_t1.nii.gz", "_t1ce.nii.gz", "_t2.nii.gz", "_flair.nii.gz", "_seg.nii.gz"),
    "2020": ("_t1.nii", "_t1ce.nii", "_t2.nii", "_flair.nii", "_seg.nii"),
    "2021": ("_t1.nii.gz", "_t1ce.nii.gz", "_t2.nii.gz", "_flair.nii.gz", "_seg.nii.gz"),
    "2023": ("-t1n.nii.gz", "-t1c.nii.gz", "-t2w.nii.gz", "-t2f.nii.gz", "-seg.nii.gz"),
}
ID_RE = {
    "2018": r"Brats18_(2013_\d{1,2}|CBICA_[A-Z]{3}|TCIA\d\d_\d{3})_1",
    "2019": r"BraTS19_(2013_\d{1,2}|CBICA_[A-Z]{3}|TCIA\d\d_\d{3})_1",
    "2020": r"BraTS20_Training_\d{3}",
    "2021": r"BraTS2021_\d{5}",
    "2023": r"BraTS-GLI-\d{5}-\d{3}",
}
DTYPE = {"2018": np.int16, "2019": np.int16, "2020": np.float32, "2021": np.float32, "2023": np.int16}


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(root: Path, case: dict) -> dict[str, nib.Nifti1Image]:
    return {name: nib.load(root / rel) for name, rel in case["files"].items()}


@pytest.fixture(scope="module", params=list(SUFFIXES))
def layout(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, dict]:
    root = tmp_path_factory.mktemp(f"brats{request.param}")
    return request.param, root, synth_brats(root, cases=4, size=32, naming=request.param, seed=3)


def test_layout_matches_release(layout: tuple[str, Path, dict]) -> None:
    naming, root, info = layout
    assert info["root"] == str(root) and info["naming"] == naming
    canon = ("t1", "t1ce", "t2", "flair", "seg")
    assert info["sequences"] == dict(zip(canon, SUFFIXES[naming], strict=True))
    cases = info["cases"]
    ids = [c["id"] for c in cases]
    assert len(cases) == 4 and len(set(ids)) == 4
    assert all(re.fullmatch(ID_RE[naming], i) for i in ids), ids
    expected_files = set()
    for k, c in enumerate(cases):
        if naming in ("2018", "2019"):
            assert c["folder"] == f"{c['grade']}/{c['id']}"
        elif naming == "2020":
            assert c["id"] == f"BraTS20_Training_{k + 1:03d}"
            assert c["folder"] == f"MICCAI_BraTS2020_TrainingData/{c['id']}"
        else:
            assert c["folder"] == c["id"]
        names = [f"{c['id']}{s}" for s in SUFFIXES[naming]]
        if naming == "2020" and k == len(cases) - 1:  # the real release's misnamed label file, on the last case
            names[-1] = MISNAMED_2020
        assert [c["files"][n] for n in canon] == [f"{c['folder']}/{n}" for n in names]
        expected_files |= {f"{c['folder']}/{n}" for n in names}
    if naming == "2020":
        assert MISNAMED_2020 == "W39_1998.09.19_Segm.nii"
        expected_files.add("MICCAI_BraTS2020_TrainingData/name_mapping.csv")
        with open(root / "MICCAI_BraTS2020_TrainingData/name_mapping.csv", newline="") as f:
            header, *rows = list(csv.reader(f))
        assert header == ["Grade", "BraTS_2017_subject_ID", "BraTS_2018_subject_ID", "BraTS_2019_subject_ID",
                          "BraTS_2020_subject_ID"]
        assert [(r[0], r[4]) for r in rows] == [(c["grade"], c["id"]) for c in cases]
        assert all(re.fullmatch(r"Brats18_\w+_1", r[2]) for r in rows)
    assert {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} == expected_files
    if naming in ("2018", "2019"):
        assert {p.name for p in root.iterdir()} == {"HGG", "LGG"}
        assert [c["grade"] for c in cases] == ["HGG"] * 3 + ["LGG"]  # ~2/3 HGG
    if naming == "2021":
        nums = [int(i[-5:]) for i in ids]
        assert nums[0] == 0 and all(b > a for a, b in zip(nums, nums[1:], strict=False))


def test_volumes_share_geometry_dtype_and_skull_strip(layout: tuple[str, Path, dict]) -> None:
    naming, root, info = layout
    for c in info["cases"]:
        imgs = _load(root, c)
        aff = imgs["seg"].affine
        assert np.allclose(aff, affine((32, 32, 21)))
        assert np.allclose(np.abs(np.diag(aff)[:3]), [7.5, 7.5, 155 / 21])  # the real 240x240x155 mm field
        for name, im in imgs.items():
            assert im.shape == (32, 32, 21), name  # depth round(32 * 155 / 240)
            assert np.array_equal(im.affine, aff), name
            assert int(im.header["sform_code"]) == 1 and int(im.header["qform_code"]) == 1
        assert imgs["seg"].get_data_dtype() == np.uint8
        data = {n: np.asarray(imgs[n].dataobj) for n in (*SEQS, "seg")}
        brain = data["t1"] != 0
        for n in SEQS:
            assert imgs[n].get_data_dtype() == DTYPE[naming], n
            assert data[n].dtype == DTYPE[naming]
            assert np.array_equal(data[n] != 0, brain), n  # exactly 0 outside the brain, > 0 inside
            assert data[n].min() == 0 and (data[n][brain] > 0).all()
        assert 0.15 < brain.mean() < 0.6
        assert not brain[:, :, 0].any() and not brain[:, :, -1].any() and not brain[0].any()
        assert not (data["seg"] > 0)[~brain].any()


def test_labels_and_tumour_extent(layout: tuple[str, Path, dict]) -> None:
    naming, root, info = layout
    et = 3 if naming == "2023" else 4
    assert info["label_values"] == [0, 1, 2, et]
    for c in info["cases"]:
        seg = np.asarray(nib.load(root / c["files"]["seg"]).dataobj)
        values = np.unique(seg).tolist()
        assert values == c["labels"]
        assert set(values) <= {0, 1, 2, et} and {0, 1, 2} <= set(values)
        assert (et in values) == (c["grade"] == "HGG")  # here: the set's one LGG is the non-enhancing kind
        zs = np.flatnonzero(seg.any((0, 1)))
        assert c["tumour_slices"] == [zs[0], zs[-1]]
        assert 0 < zs.size < 0.6 * seg.shape[2]  # tumour in some axial slices only
        assert np.array_equal(zs, np.arange(zs[0], zs[-1] + 1))  # one connected lesion
        tumour = seg > 0
        if et in values:  # nested: the enhancing rim lies around the core, oedema around both
            core = ndi.binary_dilation(seg == 1)
            assert (seg[core & ~(seg == 1)] != 0).all()
        assert (seg == 2).sum() > 0.3 * tumour.sum()


def test_some_cases_do_not_enhance(tmp_path: Path) -> None:
    info = synth_brats(tmp_path, cases=12, size=16, naming="2021", seed=5)
    no_et = [c for c in info["cases"] if 4 not in c["labels"]]
    assert 1 <= len(no_et) <= 4 and all(c["grade"] == "LGG" for c in no_et)
    assert sum(c["grade"] == "LGG" for c in info["cases"]) == 4


# ---------------------------------------------------------------- contrast design


@pytest.fixture(scope="module")
def contrast(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[float]]:
    """Per case of the negative control (today's fixed design), from the files alone: region means in units of
    the image's own noise sigma."""
    root = tmp_path_factory.mktemp("contrast")
    info = synth_brats(root, cases=4, size=64, naming="2021", seed=0, independent=True)
    out: dict[str, list[float]] = {}
    for c in info["cases"]:
        v = {n: np.asarray(im.dataobj).astype(np.float64) for n, im in _load(root, c).items()}
        seg, brain = v["seg"], v["t1"] > 0
        tumour, normal = seg > 0, brain & (seg == 0)
        # White matter by its T1 brightness (oedema is only 0.5 sigma darker there); CSF by its T2 brightness.
        wm = v["t1"] > 0.86 * np.median(v["t1"][normal])
        csf = v["t2"] > 1.6 * np.median(v["t2"][normal])
        shell = ndi.binary_dilation(tumour, iterations=2) & normal & wm & ~csf  # normal brain around the tumour
        oedema = (seg == 2) & wm
        for n in ("t1ce", "flair", "t2"):
            img = v[n]
            d = np.diff(img, axis=0)[normal[1:] & normal[:-1]]
            sigma = 1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2)  # robust, from neighbour pairs
            out.setdefault(f"{n}_oedema", []).append((img[oedema].mean() - img[shell].mean()) / sigma)
            if n == "t1ce" and (seg == 4).any():
                out.setdefault("t1ce_et_vs_ncr", []).append((img[seg == 4].mean() - img[seg == 1].mean()) / sigma)
                out.setdefault("t1ce_et_vs_brain", []).append(img[seg == 4].mean() / np.median(img[normal]))
    return out


def test_oedema_plain_in_flair_and_t2(contrast: dict[str, list[float]]) -> None:
    assert min(contrast["flair_oedema"]) > 8, contrast["flair_oedema"]  # designed 16 sigma
    assert min(contrast["t2_oedema"]) > 10, contrast["t2_oedema"]  # designed 22 sigma


def test_oedema_faint_but_present_in_t1ce(contrast: dict[str, list[float]]) -> None:
    t1ce = contrast["t1ce_oedema"]
    # designed +0.25 sigma: zero or a plain 1-sigma shift would both fail here
    assert 0.1 < np.mean(t1ce) < 0.5, t1ce
    assert max(abs(x) for x in t1ce) < 1.0, t1ce
    assert np.mean(t1ce) < 0.05 * np.mean(contrast["flair_oedema"])


def test_enhancing_rim_bright_in_t1ce(contrast: dict[str, list[float]]) -> None:
    assert len(contrast["t1ce_et_vs_ncr"]) >= 2
    assert min(contrast["t1ce_et_vs_ncr"]) > 20, contrast["t1ce_et_vs_ncr"]
    assert min(contrast["t1ce_et_vs_brain"]) > 1.4, contrast["t1ce_et_vs_brain"]


# ---------------------------------------------------------------- shared latent vs the control


def _region_ratios(root: Path, info: dict) -> dict[str, np.ndarray]:
    """Per case, from the files alone: T1ce ET and necrosis means over the normal white matter around the tumour,
    and each sequence's relative oedema excess over it (per-case gains cancel in these ratios)."""
    rows: dict[str, list[float]] = {}
    for c in info["cases"]:
        v = {n: np.asarray(im.dataobj).astype(np.float64) for n, im in _load(root, c).items()}
        seg, brain = v["seg"], v["t1"] > 0
        normal = brain & (seg == 0)
        wm = v["t1"] > 0.86 * np.median(v["t1"][normal])
        csf = v["t2"] > 1.6 * np.median(v["t2"][normal])
        shell = ndi.binary_dilation(seg > 0, iterations=2) & normal & wm & ~csf
        ref = {n: v[n][shell].mean() for n in SEQS}
        et = (seg == 4).any()
        rows.setdefault("t1ce_et", []).append(v["t1ce"][seg == 4].mean() / ref["t1ce"] if et else np.nan)
        rows.setdefault("t1ce_ncr", []).append(v["t1ce"][seg == 1].mean() / ref["t1ce"])
        for n in ("t1ce", "t2", "flair"):
            rows.setdefault(f"{n}_oedema", []).append(v[n][(seg == 2) & wm].mean() / ref[n] - 1)
    return {k: np.asarray(x) for k, x in rows.items()}


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    keep = ~(np.isnan(a) | np.isnan(b))
    ranks = [np.argsort(np.argsort(x[keep])) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


@pytest.fixture(scope="module")
def designs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, dict[str, np.ndarray]]]:
    made = {}
    for design in ("shared", "independent"):
        root = tmp_path_factory.mktemp(design)
        info = synth_brats(root, cases=10, size=32, naming="2021", seed=0, independent=design == "independent")
        made[design] = (info, _region_ratios(root, info))
    return made


def test_one_latent_drives_every_sequence_of_a_case(designs) -> None:
    info, measured = designs["shared"]
    assert info["design"] == "shared"
    latent = {k: np.asarray([c["latent"][k] for c in info["cases"]]) for k in ("enhancement", "liquefaction", "water")}
    assert all(c["latent"]["enhancing"] == (4 in c["labels"]) for c in info["cases"])
    # the student's sequence follows the latent, case by case ...
    assert _spearman(latent["enhancement"], measured["t1ce_et"]) > 0.8, measured["t1ce_et"]
    assert _spearman(latent["liquefaction"], measured["t1ce_ncr"]) < -0.8, measured["t1ce_ncr"]
    # ... and so do the teacher's, from the same latent (oedema water content)
    assert _spearman(latent["water"], measured["t2_oedema"]) > 0.8, measured["t2_oedema"]
    assert _spearman(latent["water"], measured["flair_oedema"]) > 0.8, measured["flair_oedema"]
    # T1ce shows it weakly: barely enhancing rims exist, oedema is present but a small fraction of FLAIR's
    assert np.nanmax(measured["t1ce_et"]) - np.nanmin(measured["t1ce_et"]) > 0.25
    assert np.nanmin(measured["t1ce_et"]) < 1.3
    assert (measured["t1ce_oedema"] > 0).all()
    assert measured["t1ce_oedema"].mean() < 0.15 * measured["flair_oedema"].mean()
    assert (measured["flair_oedema"] > 0.3).all() and (measured["t2_oedema"] > 0.5).all()


def test_control_has_no_latent_and_fixed_student_contrast(designs) -> None:
    info, measured = designs["independent"]
    shared = designs["shared"][1]
    assert info["design"] == "independent" and all(c["latent"] is None for c in info["cases"])
    assert len({str(c["contrast"]) for c in info["cases"]}) == 1  # one table for every case
    for key in ("t1ce_et", "t1ce_ncr", "t2_oedema"):  # constant up to noise, where the shared design varies
        spread = np.nanmax(measured[key]) - np.nanmin(measured[key])
        assert spread < 0.1 and spread < 0.25 * (np.nanmax(shared[key]) - np.nanmin(shared[key])), (key, spread)


def _arrays(root: Path, rel: str) -> np.ndarray:
    return np.asarray(nib.load(root / rel).dataobj)


@pytest.fixture(scope="module")
def noisy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """The same 8 + 2 cases at RHO 0, 0.5 and 0.9 (shared design), and the control at RHO 0 and 0.5."""
    made = {}
    for name, rho, independent in (("clean", 0.0, False), ("rho5", 0.5, False), ("rho9", 0.9, False),
                                   ("control", 0.0, True), ("control5", 0.5, True)):
        root = tmp_path_factory.mktemp(name)
        made[name] = (root, synth_brats(root, cases=8, size=24, naming="2021", seed=2, test_cases=2,
                                        label_noise=rho, independent=independent))
    return made


def test_label_noise_only_on_train_label_files(noisy) -> None:
    clean_root, clean = noisy["clean"]
    root, info = noisy["rho5"]
    assert clean["splits"] == info["splits"] and clean["splits_file"] == info["splits_file"] == "splits.json"
    assert json.loads((root / "splits.json").read_text()) == info["splits"]
    assert set(info["splits"]["train"]) and set(info["splits"]["dev"])
    assert not (clean_root / "clean_labels").exists()
    train = [c for c in info["cases"] if c["split"] == "train"]
    held = [c for c in info["cases"] if c["split"] != "train"]
    for a, b in zip(clean["cases"], info["cases"], strict=True):
        for n in SEQS:  # the pixels never see the rater
            assert (clean_root / a["files"][n]).read_bytes() == (root / b["files"][n]).read_bytes()
    for c in held:
        assert "clean_seg" not in c and "rater" not in c
        assert (root / c["files"]["seg"]).read_bytes() == (clean_root / c["files"]["seg"]).read_bytes()
    for c in train:
        assert c["clean_seg"] == f"clean_labels/{c['id']}.nii.gz"
        assert (root / c["clean_seg"]).read_bytes() == (clean_root / c["files"]["seg"]).read_bytes()
        assert not np.array_equal(_arrays(root, c["files"]["seg"]), _arrays(root, c["clean_seg"]))
        assert c["labels"] == np.unique(_arrays(root, c["files"]["seg"])).tolist()
    assert sorted(p.name for p in (root / "clean_labels").iterdir()) == sorted(f"{c['id']}.nii.gz" for c in train)
    # raters disagree like BraTS raters (Dice ~0.7-0.9), more so as RHO grows
    wt = np.mean([c["rater"]["dice_wt"] for c in train])
    worse = np.mean([c["rater"]["dice_wt"] for c in noisy["rho9"][1]["cases"] if c["split"] == "train"])
    assert 0.75 < wt < 0.97 and worse < wt - 0.05, (wt, worse)
    assert sum(c["rater"]["fingers_dropped"] for c in noisy["rho9"][1]["cases"] if "rater" in c) >= 1


def test_rater_noise_misleads_given_the_pixels_only_in_the_shared_design(noisy) -> None:
    """Voxels a rater added to the oedema are normal tissue in the shared design's FLAIR (labels noisy given the
    pixels) but oedema in the control's (the control renders the rater's map: labels exact at every RHO)."""
    ratios = {}
    for name in ("rho5", "control5"):
        root, info = noisy[name]
        added, normal = [], []
        for c in info["cases"]:
            if "clean_seg" not in c:
                continue
            seg, clean = _arrays(root, c["files"]["seg"]), _arrays(root, c["clean_seg"])
            flair = _arrays(root, c["files"]["flair"]).astype(np.float64)
            added.append(flair[(seg == 2) & (clean == 0)])
            normal.append(flair[(seg == 0) & (clean == 0) & (flair > 0)])
        ratios[name] = np.concatenate(added).mean() / np.median(np.concatenate(normal))
        assert sum(a.size for a in added) > 50, name
    assert ratios["rho5"] < 1.25 and ratios["control5"] > 1.4, ratios
    # the control's held-out cases are untouched, its train images follow the rater's map
    control_root, control = noisy["control"]
    root, info = noisy["control5"]
    for a, b in zip(control["cases"], info["cases"], strict=True):
        same = (control_root / a["files"]["flair"]).read_bytes() == (root / b["files"]["flair"]).read_bytes()
        assert same == (b["split"] != "train"), b["id"]


def test_prepare_reads_the_split_and_ignores_clean_labels(noisy, tmp_path) -> None:
    from kdcli.prepare import PrepareOptions, prepare

    root, info = noisy["rho5"]
    prepare(PrepareOptions(source="brats", raw=root, out=tmp_path / "out", size=16,
                           source_options={"splits": str(root / info["splits_file"])}))
    records = json.loads((tmp_path / "out" / "records.json").read_text())
    assert sorted(records) == sorted(c["id"] for c in info["cases"])  # no case made of clean_labels/
    manifest = pl.read_parquet(tmp_path / "out" / "manifest.parquet")
    split_of = dict(zip(manifest["record"], manifest["split"], strict=True))
    assert all(split_of[c["id"]] == c["split"] for c in info["cases"])
    assert all(records[c["id"]]["label_file"] == Path(c["files"]["seg"]).name for c in info["cases"])


@pytest.mark.parametrize(("naming", "independent"), [("2021", False), ("2018", True), ("2020", False),
                                                      ("2023", False)])
def test_extra_test_cases_do_not_depend_on_cases(naming: str, independent: bool, tmp_path: Path) -> None:
    kw = {"size": 16, "naming": naming, "seed": 4, "independent": independent, "label_noise": 0.3}
    small = synth_brats(tmp_path / "small", cases=3, test_cases=3, **kw)
    large = synth_brats(tmp_path / "large", cases=6, test_cases=3, **kw)
    plain = synth_brats(tmp_path / "plain", cases=6, **kw)
    tests = [[c for c in info["cases"] if c["test_case"]] for info in (small, large)]
    assert [c["id"] for c in tests[0]] == [c["id"] for c in tests[1]] and len(tests[0]) == 3
    assert small["splits"]["test"] == large["splits"]["test"] == [c["id"] for c in tests[0]]
    assert not set(small["splits"]["test"]) & {c["id"] for c in large["cases"] if not c["test_case"]}
    assert all(c["split"] in ("train", "dev") for c in large["cases"] if not c["test_case"])
    for a, b in zip(*tests, strict=True):
        assert a["folder"] == b["folder"] and a["grade"] == b["grade"] and "clean_seg" not in a
        for name in (*SEQS, "seg"):
            assert (tmp_path / "small" / a["files"][name]).read_bytes() == \
                (tmp_path / "large" / b["files"][name]).read_bytes(), (a["id"], name)
    # and adding the test set leaves the main cases' pixels alone (the control renders its rater's map, so
    # there only where the case kept its split)
    compared = 0
    for a, b in zip(plain["cases"], large["cases"], strict=False):
        assert a["id"] == b["id"]
        if not independent or a["split"] == b["split"]:
            compared += 1
            assert (tmp_path / "plain" / a["files"]["t1ce"]).read_bytes() == \
                (tmp_path / "large" / b["files"]["t1ce"]).read_bytes()
    assert compared >= 3
    if naming == "2020":  # the extra subjects are listed in name_mapping.csv like any new 2020 subject
        with open(tmp_path / "large/MICCAI_BraTS2020_TrainingData/name_mapping.csv", newline="") as f:
            rows = list(csv.reader(f))[1:]
        assert [r[4] for r in rows] == [c["id"] for c in large["cases"]]


# ---------------------------------------------------------------- determinism and arguments


@pytest.mark.parametrize("naming", ["2021", "2020"])
def test_deterministic_and_worker_independent(naming: str, tmp_path: Path) -> None:
    kw = {"cases": 3, "size": 16, "naming": naming}
    ref_info = synth_brats(tmp_path / "ref", **kw)
    again = synth_brats(tmp_path / "again", **kw)
    synth_brats(tmp_path / "pool", **kw, workers=2)
    synth_brats(tmp_path / "other", **kw, seed=1)
    ref = _tree_bytes(tmp_path / "ref")
    assert _tree_bytes(tmp_path / "again") == ref
    assert _tree_bytes(tmp_path / "pool") == ref
    assert {k: v for k, v in again.items() if k != "root"} == {k: v for k, v in ref_info.items() if k != "root"}
    other = _tree_bytes(tmp_path / "other")
    assert other != ref
    common = set(other) & set(ref)
    assert common and all(other[f] != ref[f] for f in common if not f.endswith(".csv"))
    assert not [p for p in (tmp_path / "ref").rglob("*") if p.name.startswith(".")]  # no temp files left


def test_new_options_deterministic_and_worker_independent(tmp_path: Path) -> None:
    kw = {"cases": 4, "size": 16, "naming": "2023", "label_noise": 0.4, "test_cases": 2}
    ref_info = synth_brats(tmp_path / "ref", **kw)
    synth_brats(tmp_path / "pool", **kw, workers=3)
    ref = _tree_bytes(tmp_path / "ref")
    assert any(f.startswith("clean_labels/") for f in ref) and "splits.json" in ref
    assert _tree_bytes(tmp_path / "pool") == ref
    assert {k: v for k, v in synth_brats(tmp_path / "again", **kw).items() if k != "root"} == \
        {k: v for k, v in ref_info.items() if k != "root"}
    assert _tree_bytes(tmp_path / "again") == ref


def test_cli_exposes_the_new_options(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    result = kdcli_run("synth", "brats", str(out), "--cases", "4", "--size", "16", "--label-noise",
                       "0.3", "--test-cases", "2", "--independent")
    assert "independent design" in result.output and f"--splits {out / 'splits.json'}" in result.output
    splits = json.loads((out / "splits.json").read_text())
    assert len(splits["test"]) == 2 and all(i.startswith("BraTS2021_9") for i in splits["test"])
    assert sorted(p.stem.removesuffix(".nii") for p in (out / "clean_labels").iterdir()) == sorted(splits["train"])
    bad = kdcli_run("synth", "brats", str(tmp_path / "bad"), "--label-noise", "1.5", ok=False)
    assert bad.exit_code != 0 and "label_noise must be between 0 and 1" in bad.output
    assert not (tmp_path / "bad").exists()


def test_gzip_header_has_no_timestamp(tmp_path: Path) -> None:
    info = synth_brats(tmp_path, cases=1, size=16, naming="2023")
    raw = (tmp_path / info["cases"][0]["files"]["t1ce"]).read_bytes()
    assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\0\0\0\0"  # gzip magic, mtime 0


def test_depth_default_and_override(tmp_path: Path) -> None:
    info = synth_brats(tmp_path / "a", cases=1, size=48, naming="2021")
    assert nib.load(tmp_path / "a" / info["cases"][0]["files"]["flair"]).shape == (48, 48, 31)
    info = synth_brats(tmp_path / "b", cases=1, size=16, depth=12, naming="2021")
    assert nib.load(tmp_path / "b" / info["cases"][0]["files"]["seg"]).shape == (16, 16, 12)
    # size 240 is the real grid: 1 mm voxels, the BraTS affine
    assert np.array_equal(affine((240, 240, 155)), [[-1, 0, 0, 0], [0, -1, 0, 239], [0, 0, 1, 0], [0, 0, 0, 1]])


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cases"):
        synth_brats(tmp_path, cases=0)
    with pytest.raises(ValueError, match="size"):
        synth_brats(tmp_path, size=15)
    with pytest.raises(ValueError, match="naming"):
        synth_brats(tmp_path, naming="2022")
    with pytest.raises(ValueError, match="depth"):
        synth_brats(tmp_path, size=32, depth=4)
    with pytest.raises(ValueError, match="workers"):
        synth_brats(tmp_path, workers=0)
    for rho in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="label_noise"):
            synth_brats(tmp_path, label_noise=rho)
    for count in (-1, 1001):
        with pytest.raises(ValueError, match="test_cases"):
            synth_brats(tmp_path, test_cases=count)
    with pytest.raises(ValueError, match="reserved"):  # BraTS20_Training_5001 is the first extra test case
        synth_brats(tmp_path, cases=5001, naming="2020", test_cases=1)
    assert not any(tmp_path.iterdir())  # validated before anything is written
