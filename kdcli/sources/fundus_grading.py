"""Graded fundus sets, one disease per set (EyePACS/Kaggle DR, APTOS 2019, or any image+grade CSV).

    EyePACS:  trainLabels.csv  `image,level`     images train/<image>.jpeg   (names without extension)
    APTOS:    train.csv        `id_code,diagnosis` images train_images/<id_code>.png
    other:    any CSV; name the columns with --image-column/--label-column and the folder with --image-dir

Each `prepare fundus-grading` call reads one set for one task (`--task dr`, `--task amd`) and adds it to a
shard directory that records, per sample, which task it is labelled for. There is no official split, so
samples are split by patient (EyePACS `<patient>_<left|right>` names keep both eyes together), stratified by
grade and seeded.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from kdcli.errors import KdcliError
from kdcli.sources.base import Record, Scan, Source
from kdcli.sources.imaging import read_image, resize_square

GRADE_NAMES = {
    "dr": ["none", "mild", "moderate", "severe", "proliferative"],
    "amd": ["none", "early", "intermediate", "late"],
}
COLUMN_DEFAULTS = (("image", "level"), ("id_code", "diagnosis"))  # EyePACS, APTOS
IMAGE_DIRS = ("train", "train_images", "images", ".")
SUFFIXES = (".jpeg", ".jpg", ".png", ".tif", ".tiff", "")
EYE_NAME = re.compile(r"^(?P<patient>.+)_(left|right)$")


def _columns(path: Path, header: list[str], image_column: str | None, label_column: str | None) -> tuple[str, str]:
    if image_column or label_column:
        pair = (image_column or "image", label_column or "level")
        candidates = [pair]
    else:
        candidates = list(COLUMN_DEFAULTS)
    for image, label in candidates:
        if image in header and label in header:
            return image, label
    raise KdcliError(f"no {' / '.join(f'{a},{b}' for a, b in candidates)} columns (found: {', '.join(header)})",
                     path=path, hint="name them with --image-column and --label-column")


def _image_dir(labels: Path, given: str | None) -> Path:
    if given:
        folder = Path(given)
        if not folder.is_dir():
            raise KdcliError("image folder not found", path=folder)
        return folder
    for name in IMAGE_DIRS:
        if (labels.parent / name).is_dir() and any((labels.parent / name).iterdir()):
            return labels.parent / name
    raise KdcliError("no image folder (train/, train_images/ or images/) beside the label CSV", path=labels,
                     hint="point at it with --image-dir")


def _find_image(folder: Path, name: str) -> Path | None:
    for suffix in SUFFIXES:
        candidate = folder / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def patient_of(name: str) -> str:
    match = EYE_NAME.match(name)
    return match.group("patient") if match else name


def split_groups(groups: dict[str, int], ratios: tuple[float, float, float], seed: int) -> dict[str, str]:
    """Patient-level split, stratified by each patient's highest grade, seeded."""
    by_grade: dict[int, list[str]] = defaultdict(list)
    for group, grade in sorted(groups.items()):
        by_grade[grade].append(group)
    assignment = {}
    for grade, members in sorted(by_grade.items()):
        order = np.random.default_rng([seed, grade]).permutation(len(members))
        n_dev = max(1, round(ratios[1] * len(members))) if len(members) >= 3 else 0
        n_test = max(1, round(ratios[2] * len(members))) if len(members) >= 3 else 0
        for rank, index in enumerate(order):
            split = "dev" if rank < n_dev else "test" if rank < n_dev + n_test else "train"
            assignment[members[index]] = split
    return assignment


def preprocess_image(path: str | Path, size: int) -> np.ndarray:
    """One raw photo as `prepare` stores it (`kdcli predict` calls this too): RGB, zero-padded to square, resized."""
    return resize_square(read_image(path, 3), size)


class FundusGradingSource(Source):
    """Options: labels (CSV, required), task (required), image_dir, image_column, label_column,
    grades (number of grades; default 5 for dr, 4 for amd), split_seed, ratios."""

    name = "fundus-grading"

    def scan(self, raw: Path) -> Scan:
        task = self.options.get("task")
        if not task:
            raise KdcliError("--task is required (e.g. dr or amd): the label space this set is graded for")
        labels = Path(self.options.get("labels") or "")
        if not labels.is_file():
            raise KdcliError("label CSV not found", path=labels, hint="pass --labels PATH")
        folder = _image_dir(labels, self.options.get("image_dir"))
        names = GRADE_NAMES.get(task)
        grades = int(self.options.get("grades") or (len(names) if names else 0))
        rows = self._read(labels, folder, grades)
        grades = int(self.options.get("grades") or grades)
        if not names or len(names) != grades:
            names = [str(g) for g in range(grades)]
        group_grades: dict[str, int] = {}
        for name, grade, _ in rows:
            group = patient_of(name)
            group_grades[group] = max(grade, group_grades.get(group, 0))
        ratios = tuple(self.options.get("ratios") or (0.6, 0.2, 0.2))
        splits = split_groups(group_grades, ratios, int(self.options.get("split_seed", 0)))
        records = [Record(id=f"{task}:{name}", group=patient_of(name), split=splits[patient_of(name)],
                          label=grade, files={"fundus": str(path)}, task=task) for name, grade, path in rows]
        return Scan(records=records, classes=[], modalities={"fundus": 3}, pairing="unpaired",
                    tasks={task: {"classes": [f"{g} {n}" if n != str(g) else n for g, n in enumerate(names)],
                                  "ordinal": True}})

    def load(self, record: Record, size: int) -> dict[str, np.ndarray]:
        return {"fundus": preprocess_image(record.files["fundus"], size)}

    def _read(self, path: Path, folder: Path, grades: int) -> list[tuple[str, int, Path]]:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [h.strip() for h in next(reader, [])]
            image_column, label_column = _columns(path, header, self.options.get("image_column"),
                                                  self.options.get("label_column"))
            image_at, label_at = header.index(image_column), header.index(label_column)
            rows, seen = [], {}
            for number, row in enumerate(reader, start=2):
                if not any(cell.strip() for cell in row):
                    continue
                name, value = row[image_at].strip(), row[label_at].strip()
                try:
                    grade = int(float(value))
                except ValueError:
                    raise KdcliError(f"row {number}: grade {value!r} is not a number", path=path) from None
                if grades and not 0 <= grade < grades:
                    raise KdcliError(f"row {number}: grade {grade} outside 0..{grades - 1}", path=path,
                                     hint="fix the row, or declare the range with --grades N")
                if name in seen:
                    raise KdcliError(f"row {number}: image {name!r} listed twice (first at row {seen[name]})",
                                     path=path, hint="remove the duplicate row")
                seen[name] = number
                image = _find_image(folder, name)
                if image is None:
                    raise KdcliError(f"row {number}: image {name!r} not found in {folder}", path=path,
                                     hint="restore it, delete the row, or set --image-dir")
                rows.append((name, grade, image))
        if not rows:
            raise KdcliError("no rows", path=path)
        if not grades:
            self.options["grades"] = max(g for _, g, _ in rows) + 1
        return rows
