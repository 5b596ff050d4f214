"""The chest X-ray phantom's generative story (issue 14): one latent per image drives the X-ray (weakly) and the
gaze and boxes (strongly), labels are its thresholded score, look-alike distractors the gaze avoids, training-only
label noise recorded beside the data, an independent control whose annotations carry nothing beyond the label,
and a fixed test pool that does not depend on the training size."""

from __future__ import annotations

import csv
import inspect
from pathlib import Path

import cv2
import numpy as np
import pytest

from kdcli.bench_distill import generator_options
from kdcli.synth._chest import AMP, FINDINGS, THRESHOLD
from kdcli.synth.cxr import NOISE_NAME, Latent, _synth, flip_probabilities, synth_cxr

SIZE = 64
BASE = {"per_class": 3, "size": SIZE, "layout": "nih", "gaze": "egd", "annotated_fraction": 1.0, "seed": 5}


def _tree(root: Path, suffixes: tuple[str, ...] = (".png", ".dcm", ".jpg")) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix in suffixes}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("shared")
    return root, synth_cxr(root, **BASE)


@pytest.fixture(scope="module")
def control(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("independent")
    return root, synth_cxr(root, **BASE, independent=True)


def _fixations_per_target(info: dict, targets: str = "image", within: float = 4.0) -> tuple[float, float]:
    """Fixations within `within` px of a labelled lesion (of the image, or of the latent the annotation was drawn
    from), per lesion, and of a distractor spot of the image, per spot."""
    on_lesions = lesions = on_spots = spots = 0
    for v in info["images"].values():
        if not v["fixations"]:
            continue
        points = np.array(v["fixations"])
        if targets == "image":
            centres = [lesion["centre"] for lesion in v["lesions"].values() if lesion["severity"] > THRESHOLD]
        else:
            centres = [c for f, c in v["annotation_lesions"].items() if f in v["clean_findings"]]
        for x, y in centres:
            lesions += 1
            on_lesions += int((np.hypot(points[:, 0] - x, points[:, 1] - y) < within).sum())
        for x, y, _ in (s for d in v["distractors"] for s in d["spots"]):
            spots += 1
            on_spots += int((np.hypot(points[:, 0] - x, points[:, 1] - y) < within).sum())
    return on_lesions / max(lesions, 1), on_spots / max(spots, 1)


def test_labels_are_the_thresholded_latent_and_borderline_cases_exist(shared) -> None:
    _, info = shared
    margins = []
    for v in info["images"].values():
        assert set(v["clean_findings"]) == {f for f, s in v["severity"].items() if s > THRESHOLD}
        assert v["findings"] == v["clean_findings"]  # no label noise asked for
        assert set(v["boxes"]) == set(v["clean_findings"]) <= set(v["lesions"]) == set(v["severity"])
        margins += [s - THRESHOLD for s in v["severity"].values()]
    margins = np.array(margins)
    # lesions just below the threshold (labelled absent) and just above it (labelled present): borderline cases
    assert ((margins > -0.1) & (margins < 0)).sum() >= 3 and ((margins > 0) & (margins < 0.1)).sum() >= 3
    normal = [v for v in info["images"].values() if not v["clean_findings"]]
    assert len(normal) == 3 * len(FINDINGS) and all(v["lesions"] for v in normal)  # faint lesions, no label
    assert any(v["distractors"] for v in normal) and any(v["distractors"] for v in info["images"].values()
                                                         if v["clean_findings"])  # whatever the label


# slow: a statistical check on a phantom of its own; the cxr phantom's other properties stay fast
@pytest.mark.slow
def test_the_xray_renders_the_latent_weakly_with_contrast_growing_with_severity(tmp_path) -> None:
    args = {**BASE, "gaze": "none", "annotated_fraction": 0.0, "per_class": 4}
    info = _synth(tmp_path / "with", **args)
    _synth(tmp_path / "without", **args, draw=False)
    gains: dict[str, list[tuple[float, float]]] = {}
    for v in info["images"].values():
        if v["bits"] != 8:
            continue
        a, b = (cv2.imread(str(tmp_path / d / v["path"]), cv2.IMREAD_UNCHANGED).astype(float) for d in
                ("with", "without"))
        for name, lesion in v["lesions"].items():
            if name not in AMP or len(v["lesions"]) > 1:  # one lesion: its box holds its contrast alone
                continue
            x, y, w, h = lesion["box"]
            box = (a - b)[int(y): int(np.ceil(y + h)), int(x): int(np.ceil(x + w))]
            gains.setdefault(name, []).append((lesion["severity"], abs(box).max() / 255 / abs(AMP[name])))
    pooled = np.array([pair for pairs in gains.values() for pair in pairs])
    assert len(pooled) >= 15
    assert np.corrcoef(pooled[:, 0], pooled[:, 1])[0, 1] > 0.6  # the image shows the severity, not the label
    faint = pooled[pooled[:, 0] < THRESHOLD]
    assert len(faint) and (faint[:, 1] > 0.02).all()  # below the threshold: faint but present


def test_the_same_latent_drives_image_and_annotation(shared) -> None:
    _, info = shared
    for v in info["images"].values():
        # the gaze is drawn to the very lesions the image renders, boxes are the labelled ones among them
        assert v["annotation_lesions"] == {f: lesion["centre"] for f, lesion in v["lesions"].items()}
    on_lesion, on_distractor = _fixations_per_target(info)
    assert on_lesion > 5 * on_distractor  # the gaze dwells on the lesions, not on their look-alikes


def test_independent_control_shares_images_and_labels_but_not_the_annotation(shared, control) -> None:
    (root, info), (root_c, info_c) = shared, control
    assert info["design"] == "shared" and info_c["design"] == "independent"
    assert _tree(root) == _tree(root_c)  # the X-rays are byte-identical: the student's input is the same
    assert (root / "Data_Entry_2017.csv").read_bytes() == (root_c / "Data_Entry_2017.csv").read_bytes()
    for name, v in info_c["images"].items():
        assert v["clean_findings"] == info["images"][name]["clean_findings"]
        assert set(v["boxes"]) == set(v["clean_findings"])
    # gaze vs lesions: in the control the fixations follow a latent of their own, not the image's lesions, and
    # tell a lesion from a look-alike no better than chance (what the label implies: e.g. a big heart, looked at)
    on_lesion, on_distractor = _fixations_per_target(info)
    on_lesion_c, on_distractor_c = _fixations_per_target(info_c)
    on_own_c, _ = _fixations_per_target(info_c, "annotation")
    assert on_lesion_c < 0.4 * on_lesion and on_own_c > 0.7 * on_lesion
    assert on_lesion_c / max(on_distractor_c, 0.1) < 0.4 * on_lesion / max(on_distractor, 0.1)
    # its boxes sit where its own latent's lesions are, not where the image's are
    boxes, boxes_c = (_rows_of_bbox(r) for r in (root, root_c))
    moved = [k for k in boxes if boxes[k] != boxes_c.get(k)]
    assert set(boxes) == set(boxes_c) and len(moved) > 0.8 * len(boxes)


def _rows_of_bbox(root: Path) -> dict[tuple[str, str], tuple[float, ...]]:
    with open(root / "BBox_List_2017.csv", newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    return {(r[0], r[1]): tuple(float(x) for x in r[2:6]) for r in rows}


def test_label_noise_flips_training_labels_only_near_the_threshold_and_is_recorded(tmp_path, shared) -> None:
    root, info = shared
    noisy = synth_cxr(tmp_path / "noisy", **{**BASE, "per_class": 4, "gaze": "none"}, label_noise=0.3)
    synth_cxr(tmp_path / "clean", **{**BASE, "per_class": 4, "gaze": "none"})
    assert _tree(tmp_path / "noisy") == _tree(tmp_path / "clean")  # the pixels never see the noise
    flipped = {n for n, v in noisy["images"].items() if v["findings"] != v["clean_findings"]}
    assert flipped and noisy["flipped"] == len(flipped)
    assert all(noisy["images"][n]["prepare_split"] == "train" for n in flipped)  # dev and test stay clean
    assert all(v["findings"] == v["clean_findings"] for v in noisy["images"].values()
               if v["prepare_split"] != "train")
    recorded = {r["name"]: r for r in _rows(tmp_path / "noisy" / NOISE_NAME)}
    assert set(recorded) == flipped
    for name, row in recorded.items():
        v = noisy["images"][name]
        assert row["clean_labels"] == ("|".join(v["clean_findings"]) or "No Finding")
        assert row["noisy_labels"] == ("|".join(v["findings"]) or "No Finding")
    assert not (root / NOISE_NAME).exists() and not (tmp_path / "clean" / NOISE_NAME).exists()
    # only lesions that exist flip, and the borderline ones most often
    near, far = [], []
    for v in noisy["images"].values():
        if v["prepare_split"] != "train":
            continue
        changed = set(v["findings"]) ^ set(v["clean_findings"])
        assert changed <= set(v["severity"])
        for f, s in v["severity"].items():
            (near if abs(s - THRESHOLD) < 0.1 else far).append(f in changed)
    assert np.mean(near) > np.mean(far)  # at rho = 0.3 the borderline lesions alone cannot supply the flips
    # the expected share of changed training images is rho; at rho = 0.1 the flips are strongly boundary-biased
    for rho in (0.1, 0.3):
        chances = [flip_probabilities(Latent(tuple(v["severity"].get(f, 0.0) for f in FINDINGS), ()), rho)
                   for v in noisy["images"].values() if v["prepare_split"] == "train"]
        assert np.mean([1 - np.prod(1 - p) for p in chances]) == pytest.approx(rho, abs=0.06)
        if rho == 0.1:
            pairs = [(abs(s - THRESHOLD) < 0.1, p[FINDINGS.index(f)]) for v, p in zip(
                (v for v in noisy["images"].values() if v["prepare_split"] == "train"), chances, strict=True)
                for f, s in v["severity"].items()]
            assert np.mean([p for n, p in pairs if n]) > 4 * np.mean([p for n, p in pairs if not n])


# slow: two syntheses of their own
@pytest.mark.slow
def test_the_test_pool_does_not_depend_on_the_training_size(tmp_path) -> None:
    small = synth_cxr(tmp_path / "small", **{**BASE, "per_class": 2}, test_per_class=1)
    large = synth_cxr(tmp_path / "large", **{**BASE, "per_class": 3}, test_per_class=1)
    tests = [{n: v for n, v in s["images"].items() if v["pool"] == "test"} for s in (small, large)]
    assert len(tests[0]) == 2 * len(FINDINGS) and set(tests[0]) == set(tests[1])
    assert all(v["split"] == "test" for v in tests[0].values())
    for name, v in tests[0].items():
        other = tests[1][name]
        assert (v["severity"], v["findings"], v["fixations"]) == (other["severity"], other["findings"],
                                                                  other["fixations"])
        a = (tmp_path / "small" / v["path"]).read_bytes()
        assert a == (tmp_path / "large" / other["path"]).read_bytes(), name
    main = [v for v in small["images"].values() if v["pool"] == "main"]
    assert main and all(v["split"] == "train_val" for v in main)  # the main pool no longer holds a test split
    listed = set((tmp_path / "small" / "test_list.txt").read_text().split())
    assert listed == set(tests[0])


# slow: two full syntheses, one through a worker pool
@pytest.mark.slow
def test_same_arguments_same_bytes_whatever_workers(tmp_path) -> None:
    args = {**BASE, "per_class": 2, "layout": "mimic", "gaze": "reflacx", "dicom_fraction": 0.2,
            "annotated_fraction": 0.5, "label_noise": 0.2, "test_per_class": 1, "unlabeled": 6}
    synth_cxr(tmp_path / "a", **args)
    synth_cxr(tmp_path / "b", **args, workers=2)
    # every file, CSVs and sidecars included
    a, b = ({str(p.relative_to(tmp_path / d)): p.read_bytes() for p in sorted((tmp_path / d).rglob("*"))
             if p.is_file()} for d in ("a", "b"))
    assert a == b and "latents.csv" in a and NOISE_NAME in a


@pytest.mark.parametrize(("kwargs", "match"), [({"label_noise": 0.5}, "label_noise"),
                                               ({"label_noise": -0.1}, "label_noise"),
                                               ({"test_per_class": -1}, "test_per_class"),
                                               ({"unlabeled": -2}, "unlabeled")])
def test_bad_new_options_are_refused_before_writing(tmp_path, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        synth_cxr(tmp_path / "x", **{**BASE, **kwargs})
    assert not any(tmp_path.iterdir())


def test_bench_distill_finds_every_option_it_passes() -> None:
    wanted = {"independent": True, "label_noise": 0.1, "test_per_class": 20, "per_class": 4, "unlabeled": 10}
    taken, missing = generator_options(synth_cxr, wanted)
    assert taken == wanted and not missing
    assert inspect.signature(synth_cxr).parameters["independent"].default is False
