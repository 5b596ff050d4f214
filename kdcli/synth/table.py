"""Phantom of a lab's own table: per sample one latent rendered as a colour `photo` (PNG) and a grey `scan` (PNG
or NIfTI), listed in `table.csv` the way `prepare table` reads it.

Latent per sample i (its own random stream, seeded by (seed, i)): the class c = i mod 3 (normal, benign,
malignant), a lesion centre and, for the multi-label variant, two findings (spots, ring) set by i's place in a
fixed pattern so every split holds both values. The scan shows the lesion clearly (radius and brightness grow with
c); the photo shows the same lesion faintly (a darker patch whose contrast grows with c), so a scan teacher knows
more than a photo student. Two samples per patient; patients go to train/dev/test in the order 3:1:1.
`unpaired`: every row fills one modality only (photo on even rows, scan on odd ones), so no sample has both.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np

from kdcli.synth._options import takes

CLASSES = ["normal", "benign", "malignant"]
FINDINGS = ["spots", "ring"]
SPLIT_CYCLE = ("train", "train", "train", "dev", "test")  # patient p goes to SPLIT_CYCLE[p % 5]
CSV_NAME = "table.csv"


@dataclass
class TableSynthOptions:
    """A lab's table phantom: a colour photo and a grey scan per sample, from one latent, and table.csv (columns
    id, patient, split, label or finding columns, photo, scan) for `kdcli prepare table`."""

    out_help: ClassVar[str] = "Folder to write: photo/, scan/ and table.csv."

    samples: int = field(default=30, metadata={"help": "Rows (samples); two per patient."})
    size: int = field(default=64, metadata={"help": "Image side in pixels."})
    seed: int = field(default=0, metadata={"help": "Random seed; same seed, same bytes."})
    unpaired: bool = field(default=False, metadata={
        "help": "Each row fills one modality only (photo or scan), as two separate collections."})
    multilabel: bool = field(default=False, metadata={
        "help": "Finding columns spots,ring (0/1) instead of one label column (prepare with --label-columns)."})
    scan_format: str = field(default="png", metadata={"help": "Scan files as png or nifti (.nii.gz)."})

    def report(self, summary: dict, out: Path) -> list[str]:
        counts = summary["counts"]
        return [f"wrote {summary['samples']} samples ({counts['train']}/{counts['dev']}/{counts['test']} "
                f"train/dev/test{', unpaired' if self.unpaired else ''}) and {summary['csv']}"]


def findings_of(index: int) -> tuple[int, int]:
    return int(index % 4 >= 2), index % 2


def _scan(rng: np.random.Generator, size: int, label: int, centre: np.ndarray, found: tuple[int, int]) -> np.ndarray:
    image = rng.normal(60, 12, (size, size)).clip(0, 255).astype(np.uint8)
    x, y = (centre * size).astype(int)
    cv2.circle(image, (int(x), int(y)), max(1, int(size * (0.08 + 0.07 * label))), int(140 + 40 * label), -1)
    if found[0]:
        for point in rng.uniform(0.1, 0.9, (4, 2)) * size:
            cv2.circle(image, tuple(int(v) for v in point), max(1, size // 24), 250, -1)
    if found[1]:
        cv2.circle(image, (size // 2, size // 2), int(size * 0.42), 230, max(1, size // 20))
    return image


def _photo(rng: np.random.Generator, size: int, label: int, centre: np.ndarray, found: tuple[int, int]) -> np.ndarray:
    image = (np.array([120, 140, 180], np.float64) + rng.normal(0, 14, (size, size, 3))).clip(0, 255)
    patch = np.zeros((size, size), np.uint8)
    x, y = (centre * size).astype(int)
    cv2.circle(patch, (int(x), int(y)), max(1, int(size * (0.1 + 0.05 * label))), 1, -1)
    alpha = 0.15 + 0.12 * label + (0.1 if found[0] else 0.0)
    image[patch > 0] *= 1.0 - alpha
    if found[1]:
        ring = np.zeros((size, size), np.uint8)
        cv2.circle(ring, (size // 2, size // 2), int(size * 0.42), 1, max(1, size // 20))
        image[ring > 0] *= 0.8
    return image.round().astype(np.uint8)  # BGR, as cv2 writes it


def _write_scan(path: Path, image: np.ndarray) -> None:
    if path.name.endswith(".nii.gz"):
        import nibabel as nib

        nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), str(path))
    else:
        cv2.imwrite(str(path), image)


@takes(TableSynthOptions)
def synth_table(out: Path, samples: int = 30, size: int = 64, seed: int = 0, unpaired: bool = False,
                multilabel: bool = False, scan_format: str = "png") -> dict:
    if samples < 10:
        raise ValueError(f"samples must be >= 10 (every split needs patients of each class), got {samples}")
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if scan_format not in ("png", "nifti"):
        raise ValueError(f"scan_format must be png or nifti, got {scan_format!r}")
    out = Path(out)
    for folder in ("photo", "scan"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if scan_format == "nifti" else ".png"
    label_header = FINDINGS if multilabel else ["label"]
    rows, counts = [], {"train": 0, "dev": 0, "test": 0}
    for index in range(samples):
        rng = np.random.default_rng([seed, index])
        label, centre, found = index % 3, rng.uniform(0.3, 0.7, 2), findings_of(index)
        ident, patient = f"s{index:04d}", f"p{index // 2:04d}"
        split = SPLIT_CYCLE[(index // 2) % len(SPLIT_CYCLE)]
        counts[split] += 1
        photo_cell = scan_cell = ""
        if not unpaired or index % 2 == 0:
            photo_cell = f"photo/{ident}.png"
            cv2.imwrite(str(out / photo_cell), _photo(rng, size, label, centre, found))
        if not unpaired or index % 2 == 1:
            scan_cell = f"scan/{ident}{suffix}"
            _write_scan(out / scan_cell, _scan(rng, size, label, centre, found))
        labels = [str(v) for v in found] if multilabel else [CLASSES[label]]
        rows.append([ident, patient, split, *labels, photo_cell, scan_cell])
    with open(out / CSV_NAME, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "patient", "split", *label_header, "photo", "scan"])
        writer.writerows(rows)
    return {"csv": out / CSV_NAME, "samples": samples, "counts": counts, "classes": FINDINGS if multilabel else CLASSES}
