"""The MultiEYE phantom: official on-disk layout, real-download quirks, determinism, and a class
signal that is strong in OCT and faint (but present) in fundus."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from kdcli.synth.multieye import CLASSES, LAYOUT, LIST_NAME, SPLITS, synth_multieye

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
    from typer.testing import CliRunner

    from kdcli.cli import app

    for args in (["multieye", str(tmp_path / "a"), "--per-class", "1"],
                 ["fundus-grading", str(tmp_path / "b"), "--size", "8"],
                 ["fundus-grading", str(tmp_path / "c"), "--dr-layout", "kaggle"]):
        result = CliRunner().invoke(app, ["synth", *args])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert not (tmp_path / args[1]).exists()
