"""The WSI phantom's generative story (issue 14): one tumour-biology latent per patient drawn first, the ALN status
a threshold of it, the clinical record and the slide rendering it (strongly / faintly); train-only, boundary-biased
label noise recorded beside the data; the independent control (slide and record share only the label); a fixed
extra test set; the split the files depend on written to splits.json; same arguments, same bytes."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from kdcli.synth.camelyon import (
    CLINICAL_COLUMNS,
    NPLUS_THRESHOLD,
    SLIDE_GAIN,
    _plan,
    _rng,
    aln_status,
    class_counts,
    clinical_row,
    draw_biology,
    synth_camelyon,
)

TINY = {"size": 512, "format": "bcnb"}  # slides are expensive: the smallest size the generator takes


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    diff = np.asarray(pos, float)[:, None] - np.asarray(neg, float)[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def _within_class_correlation(patients, first: str, second: str) -> float:
    """Correlation of two latents after removing each class's mean: what they share beyond the label."""
    labels = np.array([p.clean_label for p in patients])
    a = np.array([getattr(p, first) for p in patients])
    b = np.array([getattr(p, second) for p in patients])
    for status in set(labels):
        a[labels == status] -= a[labels == status].mean()
        b[labels == status] -= b[labels == status].mean()
    return float(np.corrcoef(a, b)[0, 1])


@pytest.fixture(scope="module")
def cohorts():
    """2,000 planned patients per design (no rendering: the plan is what the files render)."""
    return {design: _plan(2000, 0, "tiff", design == "independent", 0.2, 0, 0)
            for design in ("shared", "independent")}


def test_label_is_a_threshold_of_the_patient_latent_drawn_first(cohorts):
    shared = cohorts["shared"]
    assert {p.clean_label for p in shared if p.biology < NPLUS_THRESHOLD} == {"N0"}
    assert all(p.clean_label == aln_status(p.biology) for p in shared)
    # the latent comes from a stream keyed by the patient alone: redrawing it from (seed, pool, case) gives it back
    assert all(p.biology == draw_biology(0, p.pool, p.case) for p in shared[:50])
    counts = {s: sum(p.clean_label == s for p in shared) for s in ("N0", "N+(1-2)", "N+(>2)")}
    assert counts == class_counts(2000) == {"N0": 1200, "N+(1-2)": 500, "N+(>2)": 300}
    margins = np.abs(np.array([p.biology for p in shared]) - NPLUS_THRESHOLD)
    assert (margins < 0.1).mean() > 0.05  # borderline patients exist on both sides of the threshold


def test_one_latent_drives_slide_and_record_in_the_shared_design(cohorts):
    shared = cohorts["shared"]
    assert all(p.clinical_latent == p.biology for p in shared)
    sampling = np.array([(p.image_latent - SLIDE_GAIN * p.biology) / math.sqrt(1 - SLIDE_GAIN**2) for p in shared])
    assert abs(sampling.mean()) < 0.1 and abs(sampling.std() - 1) < 0.1  # the needle's luck: N(0, 1), own stream
    assert abs(np.corrcoef(sampling, [p.biology for p in shared])[0, 1]) < 0.06
    assert _within_class_correlation(shared, "image_latent", "clinical_latent") > 0.25
    # strong in the record, faint in the slide
    y = np.array([p.clean_label != "N0" for p in shared])
    image = np.array([p.image_latent for p in shared])
    assert 0.74 < _auc(image[y], image[~y]) < 0.82


def test_independent_control_shares_only_the_label(cohorts):
    shared, control = cohorts["shared"], cohorts["independent"]
    assert abs(_within_class_correlation(control, "image_latent", "clinical_latent")) < 0.06
    # the same patients, labels, splits and flips; each modality alone distributed as in the shared design
    assert [(p.id, p.clean_label, p.label, p.split) for p in control] == \
           [(p.id, p.clean_label, p.label, p.split) for p in shared]
    for status in ("N0", "N+(1-2)", "N+(>2)"):
        for latent in ("image_latent", "clinical_latent"):
            a = [getattr(p, latent) for p in shared if p.clean_label == status]
            b = [getattr(p, latent) for p in control if p.clean_label == status]
            assert abs(np.mean(a) - np.mean(b)) < 0.12 and abs(np.std(a) - np.std(b)) < 0.1, (status, latent)
    assert all(aln_status(p.clinical_latent) == p.clean_label for p in control)


def test_label_noise_flips_train_labels_only_near_the_boundary(cohorts):
    shared = cohorts["shared"]
    flipped = [p for p in shared if p.label != p.clean_label]
    assert {p.split for p in flipped} == {"train"}
    train = [p for p in shared if p.split == "train"]
    assert 0.16 < len(flipped) / len(train) < 0.24  # rho = 0.2 of the training labels
    assert all((p.label == "N0") != (p.clean_label == "N0") for p in flipped)  # across N0 / N+
    margin = np.abs(np.array([p.biology for p in flipped]) - NPLUS_THRESHOLD)
    everyone = np.abs(np.array([p.biology for p in train]) - NPLUS_THRESHOLD)
    assert (margin < 0.25).mean() > 2 * (everyone < 0.25).mean()  # borderline patients flip far more often
    assert not [p for p in _plan(400, 0, "tiff", False, 0.0, 0, 0) if p.label != p.clean_label]


def test_clinical_record_renders_the_latent_strongly():
    biology = [draw_biology(3, "main", case) for case in range(3000)]
    rows = [clinical_row(case, b, aln_status(b), _rng(3, "main", case, 4)) for case, b in enumerate(biology)]
    frame = pl.DataFrame(rows, schema=list(CLINICAL_COLUMNS), orient="row", infer_schema_length=None)
    y = np.array([aln_status(b) != "N0" for b in biology])
    size = frame["Tumour Size(cm)"].to_numpy()
    assert 0.8 < _auc(size[y], size[~y]) < 0.92  # alone, tumour size says more than the slide's whole latent
    unlabeled = clinical_row(1, 0.3, None, _rng(3, "main", 1, 4))
    assert unlabeled["ALN status"] is None and unlabeled["Number of lymph node metastases"] is None
    staged = clinical_row(1, 0.3, "N+(1-2)", _rng(3, "main", 1, 4))
    assert {k: v for k, v in staged.items() if k not in ("ALN status", "Number of lymph node metastases")} == \
           {k: v for k, v in unlabeled.items() if k not in ("ALN status", "Number of lymph node metastases")}


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("noisy") / "raw"
    return root, synth_camelyon(root, slides=10, test_slides=4, label_noise=0.45, seed=2, **TINY)


def test_files_record_the_noise_the_split_and_the_latents(noisy):
    root, info = noisy
    slides = {s["id"]: s for s in info["slides"]}
    sheet = {str(r["Patient ID"]): r for r in pl.read_excel(root / "clinical.xlsx").iter_rows(named=True)}
    assert {i: r["ALN status"] for i, r in sheet.items()} == {i: s["label"] for i, s in slides.items()}
    flipped = {i for i, s in slides.items() if s["label"] != s["clean_label"]}
    assert flipped and {slides[i]["split"] for i in flipped} == {"train"} and info["flipped"] == len(flipped)
    with open(root / "label_noise.csv") as handle:
        listed = list(csv.DictReader(handle))
    assert {r["id"] for r in listed} == flipped
    assert all(r["clean_label"] == slides[r["id"]]["clean_label"] and r["label"] == slides[r["id"]]["label"]
               for r in listed)
    assert info["splits_file"] == "splits.json"
    assert json.loads((root / "splits.json").read_text()) == info["splits"]
    assert info["splits"]["test"] == [str(100_001 + k) for k in range(4)]  # the extra test slides, and only they
    assert {s["split"] for s in info["slides"] if s["pool"] == "main"} == {"train", "dev"}
    with open(root / "latents.csv") as handle:
        latents = {r["id"]: r for r in csv.DictReader(handle)}
    assert set(latents) == set(slides)
    assert all(abs(float(latents[i]["biology"]) - s["biology"]) < 1e-5 for i, s in slides.items())


def test_extra_test_slides_do_not_depend_on_the_training_size(noisy, tmp_path):
    root, info = noisy
    other = synth_camelyon(tmp_path / "other", slides=6, test_slides=4, label_noise=0.45, seed=2, **TINY)
    tests = [s for s in info["slides"] if s["pool"] == "test"]
    assert [s for s in other["slides"] if s["pool"] == "test"] == tests
    for s in tests:
        for name in (s["file"], s["annotation"]):
            assert (tmp_path / "other" / name).read_bytes() == (root / name).read_bytes()


def test_same_arguments_same_bytes(noisy, tmp_path):
    root, info = noisy
    again = synth_camelyon(tmp_path / "again", slides=10, test_slides=4, label_noise=0.45, seed=2, workers=2, **TINY)
    assert again == {**info, "root": str(tmp_path / "again"), "clinical": str(tmp_path / "again" / "clinical.xlsx")}
    assert _tree(tmp_path / "again") == _tree(root)  # the xlsx too: no clock inside


def test_rejects_bad_new_arguments(tmp_path):
    for bad in ({"label_noise": 0.5}, {"label_noise": -0.1}, {"test_slides": 1}, {"test_slides": -2},
                {"unlabeled": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            synth_camelyon(tmp_path, slides=4, **TINY, **bad)
    assert not any(tmp_path.iterdir())
