"""The MultiEYE phantom: official on-disk layout, real-download quirks, determinism, a class signal that is
strong in OCT and faint (but present) in fundus, one latent per eye shared by its modalities (not under
--independent), boundary-biased training-only label noise, a fixed test pool and the concept embeddings."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import kdcli_run

from kdcli.synth.multieye import CLASSES, LAYOUT, LIST_NAME, SPLITS, Latent, synth_multieye

SMALL = {"per_class": 3, "size": 32, "seed": 0}


def _read_list(path: Path) -> list[tuple[str, int]]:
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            name, label = line.split()  # any whitespace: the OCT test list is tab-separated
            rows.append((name, int(label)))
    return rows


def _lists(root: Path, mod: str) -> dict[str, list[tuple[str, int]]]:
    return {split: _read_list(root / LAYOUT[mod][0] / split / LIST_NAME) for split in SPLITS}


def _image_path(root: Path, mod: str, name: str) -> Path:
    list_root, folder = LAYOUT[mod]
    return root / list_root / "train" / "ImageData" / folder / f"{name}.png"


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("multieye")
    return root, synth_multieye(root, **SMALL)


def test_classes_in_official_order() -> None:
    assert CLASSES == ("NOR", "AMD", "CSC", "DR", "GLC", "MEM", "MYO", "RVO", "WAMD")


def test_layout_and_summary(small: tuple[Path, dict]) -> None:
    root, info = small
    assert info["root"] == str(root)
    assert info["classes"] == list(CLASSES)
    for split in SPLITS:
        assert (root / "assemble" / split / "large9cls.txt").is_file()
        assert (root / "assemble_oct" / split / "large9cls.txt").is_file()
    fundus_dir = root / "assemble/train/ImageData/cfp-clahe-224x224"
    oct_dir = root / "assemble_oct/train/ImageData/oct-filter-448x448"
    assert len(list(fundus_dir.glob("*.png"))) == len(list(oct_dir.glob("*.png"))) == 27
    # Images live only under train/ImageData, whatever split lists them.
    assert not (root / "assemble/dev/ImageData").exists()
    assert not (root / "assemble_oct/test/ImageData").exists()
    for mod in ("fundus", "oct"):
        lists = _lists(root, mod)
        assert info["counts"][mod] == {split: len(rows) for split, rows in lists.items()}
        for split, rows in lists.items():
            # per_class=3 -> one of each class in every split; label = index into CLASSES
            assert sorted(label for _, label in rows) == list(range(len(CLASSES))), (mod, split)
            for name, _ in rows:
                assert not name.endswith(".png")
                assert _image_path(root, mod, name).is_file(), (mod, name)
        names = [name for rows in lists.values() for name, _ in rows]
        assert len(set(names)) == 27
        assert any("." in name.rstrip(".") for name in names)  # inner dots, as in real names


def test_list_file_quirks(small: tuple[Path, dict]) -> None:
    root, _ = small
    for mod in ("fundus", "oct"):
        for split in SPLITS:
            text = (root / LAYOUT[mod][0] / split / LIST_NAME).read_text()
            assert text.endswith("\n\n")
            lines = [line for line in text.split("\n") if line]
            assert any(line != line.rstrip() for line in lines)
            tabbed = mod == "oct" and split == "test"
            for line in lines:
                name, label = line.rstrip().split("\t" if tabbed else " ")
                assert label.isdigit() and name
                assert ("\t" in line) == tabbed


def test_unpaired_by_default(small: tuple[Path, dict]) -> None:
    root, _ = small
    fundus = {n for rows in _lists(root, "fundus").values() for n, _ in rows}
    oct_ = {n for rows in _lists(root, "oct").values() for n, _ in rows}
    assert not fundus & oct_
    assert all(n.startswith("f-") for n in fundus) and all(n.startswith("o-") for n in oct_)


def test_mixed_sizes_and_bit_depths(small: tuple[Path, dict]) -> None:
    root, _ = small
    fundus = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in root.glob("assemble/train/ImageData/*/*")]
    octs = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in root.glob("assemble_oct/train/ImageData/*/*")]
    assert all(im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3 for im in fundus)
    shapes = [im.shape[:2] for im in fundus]
    assert shapes.count((32, 32)) > len(shapes) // 2 and (32, 40) in shapes
    assert all(im.ndim == 2 and im.shape == (32, 32) for im in octs)
    depths = [im.dtype for im in octs]
    assert depths.count(np.uint8) > len(depths) // 2 and np.uint16 in depths
    wide = [im for im in octs if im.dtype == np.uint16]
    assert max(int(im.max()) for im in wide) > 255  # really 16-bit data, not 8-bit values in a 16-bit file
    # Fundus: orange-red retina (R > G > B) on black.
    mean_bgr = np.mean([im[12:20, 12:20].reshape(-1, 3).mean(0) for im in fundus], 0)
    assert mean_bgr[2] > mean_bgr[1] > mean_bgr[0]
    assert np.mean([im[0, 0].max() for im in fundus]) < 10


def test_deterministic_and_worker_independent(small: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = small
    synth_multieye(tmp_path / "again", **SMALL)
    synth_multieye(tmp_path / "pool", **SMALL, workers=2)
    synth_multieye(tmp_path / "other", **{**SMALL, "seed": 1})
    ref = _tree_bytes(root)
    assert _tree_bytes(tmp_path / "again") == ref
    assert _tree_bytes(tmp_path / "pool") == ref
    other = _tree_bytes(tmp_path / "other")
    assert other.keys() != ref.keys()


def test_paired_mode_shares_eyes(tmp_path: Path) -> None:
    synth_multieye(tmp_path, **SMALL, paired=True)
    fundus, oct_ = _lists(tmp_path, "fundus"), _lists(tmp_path, "oct")
    for split in SPLITS:
        assert sorted(fundus[split]) == sorted(oct_[split]), split
        for name, _ in fundus[split]:
            assert _image_path(tmp_path, "oct", name).is_file()


def test_rejects_too_few_per_class(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="per_class"):
        synth_multieye(tmp_path, per_class=2, size=32)
    with pytest.raises(ValueError, match="seed"):
        synth_multieye(tmp_path, per_class=3, size=32, seed=-1)


# ---------------------------------------------------------------- class signal


def _load(root: Path, mod: str, splits: tuple[str, ...], side: int = 16) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for split in splits:
        for name, label in _lists(root, mod)[split]:
            im = cv2.imread(str(_image_path(root, mod, name)), cv2.IMREAD_UNCHANGED)
            im = im.astype(np.float32) / (65535.0 if im.dtype == np.uint16 else 255.0)
            h, w = im.shape[:2]
            im = im[:, (w - h) // 2 : (w - h) // 2 + h]  # wide fundus photos: keep the square retina
            xs.append(cv2.resize(im, (side, side), interpolation=cv2.INTER_AREA).ravel())
            ys.append(label)
    return np.stack(xs), np.array(ys)


def _ridge_probe(root: Path, mod: str) -> float:
    """Test accuracy of a linear probe on 16x16 thumbnails (trained on train+dev): a cheap signal gauge."""
    xtr, ytr = _load(root, mod, ("train", "dev"))
    xte, yte = _load(root, mod, ("test",))
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-3
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    w = np.linalg.solve(xtr.T @ xtr + len(xtr) * np.eye(xtr.shape[1]), xtr.T @ np.eye(len(CLASSES))[ytr])
    return float(((xte @ w).argmax(1) == yte).mean())


@pytest.fixture(scope="module")
def signal_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[float, Path]:
    roots = {}
    for sig in (1.0, 0.0):
        roots[sig] = tmp_path_factory.mktemp(f"signal{sig:g}")
        synth_multieye(roots[sig], per_class=30, size=32, seed=0, fundus_signal=sig)
    return roots


def test_class_means_differ_from_normal_far_more_in_oct(signal_sets: dict[float, Path]) -> None:
    root = signal_sets[1.0]
    gaps = {}
    for mod in ("fundus", "oct"):
        x, y = _load(root, mod, SPLITS)
        means = x.reshape(len(x), 16, 16, -1)[:, 3:13, 2:14]  # central region: macula / fovea
        means = np.stack([means[y == c].mean(0) for c in range(len(CLASSES))])
        gaps[mod] = float(np.median(np.abs(means[1:] - means[0]).mean((1, 2))))
    assert gaps["oct"] > 2.0 * gaps["fundus"], gaps


def test_linear_probe_oct_strong_fundus_faint(signal_sets: dict[float, Path]) -> None:
    oct_acc = _ridge_probe(signal_sets[1.0], "oct")
    fundus_acc = _ridge_probe(signal_sets[1.0], "fundus")
    no_signal_acc = _ridge_probe(signal_sets[0.0], "fundus")
    chance = 1 / len(CLASSES)
    assert oct_acc >= 0.45, oct_acc
    assert chance + 0.05 <= fundus_acc <= oct_acc - 0.2, (fundus_acc, oct_acc)
    assert no_signal_acc < fundus_acc, (no_signal_acc, fundus_acc)


def test_impossible_arguments_are_a_usage_error_through_the_cli(tmp_path):
    for args in (["multieye", str(tmp_path / "a"), "--per-class", "1"],
                 ["fundus-grading", str(tmp_path / "b"), "--size", "8"],
                 ["fundus-grading", str(tmp_path / "c"), "--dr-layout", "kaggle"]):
        result = kdcli_run("synth", *args, ok=False)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert not (tmp_path / args[1]).exists()


# ---------------------------------------------------------------- the shared latent, label noise, pools


def _latent_rows(info: dict, modality: str) -> dict[str, dict]:
    return {im["name"]: im for im in info["images"] if im["modality"] == modality}


def _neighbour_and_margin(latent: Latent) -> tuple[int, float]:
    order = np.argsort(-latent.scores(), kind="stable")
    top = np.log(latent.scores()[order[:2]])
    return int(order[1]), float(top[0] - top[1])


def test_label_is_the_thresholded_score_of_the_latent_and_borderline_eyes_exist(small: tuple[Path, dict]) -> None:
    _, info = small
    margins = []
    for im in info["images"]:
        scores = im["latent"].scores()
        assert int(np.argmax(scores)) == im["clean_label"] == im["label"]  # no label noise by default
        margins.append(_neighbour_and_margin(im["latent"])[1])
        assert (im["clean_label"] == 0) == (im["latent"].severity < 0.15)
    assert min(margins) < 0.3 < max(margins)


def _fundus_predicts_oct_severity(tmp_path: Path, independent: bool) -> float:
    """Held-out correlation between a ridge read-out of fundus thumbnails and the OCT image's latent severity,
    both centred within class: how much a paired eye's fundus photo says about its B-scan beyond the label."""
    info = synth_multieye(tmp_path, per_class=30, size=32, seed=0, paired=True, independent=independent,
                          fundus_signal=3.0)
    oct_severity = {name: im["latent"].severity for name, im in _latent_rows(info, "oct").items()}
    x, y = _load(tmp_path, "fundus", SPLITS)
    names = [name for split in SPLITS for name, _ in _lists(tmp_path, "fundus")[split]]
    target = np.array([oct_severity[name] for name in names])
    for c in range(len(CLASSES)):
        x[y == c] -= x[y == c].mean(0)
        target[y == c] -= target[y == c].mean()
    order = np.random.default_rng(0).permutation(len(target))
    fit, held = order[: len(order) // 2], order[len(order) // 2 :]
    sd = x[fit].std(0) + 1e-3
    xf, xh = x[fit] / sd, x[held] / sd
    w = np.linalg.solve(xf.T @ xf + 0.1 * len(fit) * np.eye(x.shape[1]), xf.T @ target[fit])
    return float(np.corrcoef(xh @ w, target[held])[0, 1])


def test_paired_eyes_render_one_latent_unless_independent(tmp_path: Path) -> None:
    shared = synth_multieye(tmp_path / "shared", **SMALL, paired=True)
    control = synth_multieye(tmp_path / "control", **SMALL, paired=True, independent=True)
    for info in (shared, control):
        fundus, oct_ = _latent_rows(info, "fundus"), _latent_rows(info, "oct")
        assert fundus.keys() == oct_.keys()
        for name, im in fundus.items():
            assert im["clean_label"] == oct_[name]["clean_label"] == int(np.argmax(im["latent"].scores()))
            if info is shared:
                assert im["latent"] == oct_[name]["latent"], name
            else:  # a latent of its own, of the same class
                assert im["latent"].severity != oct_[name]["latent"].severity, name
    # The control changes the fundus images only: OCT byte-identical, every fundus photo redrawn.
    for name in _latent_rows(shared, "oct"):
        assert (_image_path(tmp_path / "shared", "oct", name).read_bytes()
                == _image_path(tmp_path / "control", "oct", name).read_bytes())
        assert (_image_path(tmp_path / "shared", "fundus", name).read_bytes()
                != _image_path(tmp_path / "control", "fundus", name).read_bytes())
    # Unpaired: each modality's eyes are cases of their own.
    info = synth_multieye(tmp_path / "unpaired", **SMALL)
    assert not _latent_rows(info, "fundus").keys() & _latent_rows(info, "oct").keys()


# slow: a statistical check on a paired phantom of its own
@pytest.mark.slow
def test_paired_fundus_pixels_carry_the_oct_latent_beyond_the_class(tmp_path: Path) -> None:
    shared = _fundus_predicts_oct_severity(tmp_path / "shared", independent=False)
    control = _fundus_predicts_oct_severity(tmp_path / "control", independent=True)
    assert shared > 0.35, shared
    assert abs(control) < 0.2, control


def _read_noise_csv(path: Path) -> list[dict]:
    import csv

    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_label_noise_flips_training_labels_to_the_confusable_neighbour(tmp_path: Path) -> None:
    rho = 0.2
    info = synth_multieye(tmp_path, per_class=60, size=16, seed=0, label_noise=rho)
    flips = {(row["name"], row["modality"]): row for row in _read_noise_csv(tmp_path / "label_noise.csv")}
    low, high = [], []  # flipped or not, by margin
    for mod in ("fundus", "oct"):
        rows = _latent_rows(info, mod)
        lists = _lists(tmp_path, mod)
        for split in SPLITS:
            for name, listed in lists[split]:
                im = rows[name]
                assert listed == im["label"]  # the lists carry what the raters wrote
                if split != "train":
                    assert listed == im["clean_label"], (mod, split, name)  # dev and test stay clean
                    continue
                flipped = listed != im["clean_label"]
                assert flipped == ((name, mod) in flips)
                neighbour, margin = _neighbour_and_margin(im["latent"])
                if flipped:
                    assert listed == neighbour, (mod, name)
                    assert int(flips[name, mod]["clean_label"]) == im["clean_label"]
                    assert int(flips[name, mod]["noisy_label"]) == listed
                (low if margin < 0.3 else high).append(flipped)
        train = info["counts"][mod]["train"]
        assert abs(info["flipped"][mod] / train - rho) < 0.06, (mod, info["flipped"][mod], train)
    assert len(flips) == sum(info["flipped"].values())
    assert np.mean(low) > 2 * np.mean(high), (np.mean(low), np.mean(high))  # borderline eyes flip most


def test_label_noise_keeps_paired_eyes_paired(tmp_path: Path) -> None:
    from kdcli.sources.multieye import MultiEyeSource

    info = synth_multieye(tmp_path, **SMALL, paired=True, label_noise=0.45)
    assert info["flipped"]["fundus"] == info["flipped"]["oct"] > 0
    for split in SPLITS:
        assert sorted(_lists(tmp_path, "fundus")[split]) == sorted(_lists(tmp_path, "oct")[split])
    assert MultiEyeSource().scan(tmp_path).pairing == "paired"


def test_test_pool_is_identical_whatever_per_class(tmp_path: Path) -> None:
    options = {"size": 16, "seed": 0, "test_per_class": 4, "dev_per_class": 2, "label_noise": 0.3}
    infos = {n: synth_multieye(tmp_path / str(n), per_class=n, **options) for n in (3, 8)}
    for n, info in infos.items():
        for mod in ("fundus", "oct"):
            assert info["counts"][mod] == {"train": 9 * n, "dev": 18, "test": 36}
    for mod in ("fundus", "oct"):
        for split in ("dev", "test"):
            lists = [(tmp_path / str(n) / LAYOUT[mod][0] / split / LIST_NAME).read_bytes() for n in (3, 8)]
            assert lists[0] == lists[1], (mod, split)
            for name, _ in _lists(tmp_path / "3", mod)[split]:
                assert (_image_path(tmp_path / "3", mod, name).read_bytes()
                        == _image_path(tmp_path / "8", mod, name).read_bytes()), (mod, name)
        # Disjoint from the training eyes.
        train = {name for name, _ in _lists(tmp_path / "8", mod)["train"]}
        assert not train & {name for name, _ in _lists(tmp_path / "8", mod)["test"]}
    # Without a dev pool, per_class is split 75/25 between train and dev.
    info = synth_multieye(tmp_path / "plain", per_class=8, size=16, test_per_class=4)
    assert info["counts"]["oct"] == {"train": 54, "dev": 18, "test": 36}


def test_new_options_are_deterministic_and_worker_independent(tmp_path: Path) -> None:
    options = {**SMALL, "paired": True, "independent": True, "label_noise": 0.3, "test_per_class": 2}
    synth_multieye(tmp_path / "one", **options)
    synth_multieye(tmp_path / "pool", **options, workers=2)
    synth_multieye(tmp_path / "again", **options)
    assert _tree_bytes(tmp_path / "one") == _tree_bytes(tmp_path / "pool") == _tree_bytes(tmp_path / "again")


def test_concept_embeddings_orthonormal_and_loadable(small: tuple[Path, dict]) -> None:
    from kdcli.models.concepts import load_concept_embeddings
    from kdcli.sources.multieye import MultiEyeSource

    root, info = small
    concepts = MultiEyeSource().scan(root).extra["concepts"]
    assert info["concepts"] == concepts
    raw = np.load(info["concept_embeddings"])
    assert raw.shape == (len(concepts), 512) and raw.dtype == np.float32
    np.testing.assert_allclose(raw @ raw.T, np.eye(len(concepts)), atol=1e-5)
    np.testing.assert_allclose(load_concept_embeddings(root / "concept_embeddings.npy", len(concepts)), raw,
                               atol=1e-6)


@pytest.mark.parametrize("bad", [{"label_noise": 0.5}, {"label_noise": -0.1}, {"test_per_class": -1},
                                 {"dev_per_class": -2}, {"per_class": 1, "test_per_class": 3}])
def test_rejects_impossible_new_options(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(ValueError, match="label_noise|per_class"):
        synth_multieye(tmp_path, **{**SMALL, **bad})


def test_new_options_through_the_cli(tmp_path: Path) -> None:
    result = kdcli_run("synth", "multieye", str(tmp_path / "a"), "--per-class", "3", "--size", "16",
                       "--label-noise", "0.3", "--paired", "--independent", "--test-per-class", "2",
                       "--dev-per-class", "1")
    assert (tmp_path / "a" / "label_noise.csv").is_file() and (tmp_path / "a" / "concept_embeddings.npy").is_file()
    assert len(_lists(tmp_path / "a", "oct")["test"]) == 18 and len(_lists(tmp_path / "a", "oct")["train"]) == 27
    result = kdcli_run("synth", "multieye", str(tmp_path / "b"), "--label-noise", "0.6", ok=False)
    assert result.exit_code == 2 and "label_noise" in result.output and "Traceback" not in result.output
