"""Graded fundus sets, one disease per set (EyePACS/Kaggle DR, APTOS 2019, or any image+grade CSV).

    EyePACS:  trainLabels.csv  `image,level`     images train/<image>.jpeg   (names without extension)
    APTOS:    train.csv        `id_code,diagnosis` images train_images/<id_code>.png
    other:    any CSV; name the columns with --image-column/--label-column and the folder with --image-dir

Each `prepare fundus-grading` call reads one set for one task (`--task dr`, `--task amd`) and adds it to a
shard directory that records, per sample, which task it is labelled for. There is no official split, so
samples are split by patient (EyePACS `<patient>_<left|right>` names keep both eyes together), stratified by
grade and seeded, unless `--splits FILE` gives each image its split (CSV `image,split` or JSON {"train":
[...], "dev": [...], "test": [...]}; `kdcli synth fundus-grading` writes one per set).

Grades must be whole numbers in 0..grades-1: a fractional (2.5), infinite or NaN grade, a negative one, an
image listed twice (with its two grades named when they differ), an empty or non-UTF-8 CSV are refused with
the file and row named, before anything is written.
"""

from __future__ import annotations

import csv
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kdcli.errors import KdcliError
from kdcli.sources.base import PhotoSource, Record, Scan
from kdcli.sources.imaging import preprocess_photo
from kdcli.sources.splits import read_split_file

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
        # with 3+ patients a split with a non-zero ratio gets at least one; a zero ratio stays empty
        n_dev = max(1, round(ratios[1] * len(members))) if len(members) >= 3 and ratios[1] > 0 else 0
        n_test = max(1, round(ratios[2] * len(members))) if len(members) >= 3 and ratios[2] > 0 else 0
        for rank, index in enumerate(order):
            split = "dev" if rank < n_dev else "test" if rank < n_dev + n_test else "train"
            assignment[members[index]] = split
    return assignment




def _open_text(path: Path):
    """The CSV's text, refused in one line when it is empty or not UTF-8 (Excel's BOM is fine)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise KdcliError(f"cannot read ({exc.strerror or exc})", path=path) from None
    if not raw.strip():
        raise KdcliError("is empty (no header, no rows)", path=path, hint="point --labels at the set's label CSV")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise KdcliError(f"line {line}: byte 0x{raw[exc.start]:02x} is not UTF-8 text", path=path,
                         hint="save the file as UTF-8 (or plain ASCII)") from None


def read_splits(path: Path) -> dict[str, str]:
    """image name -> train | dev | test, from a CSV (`image,split`) or a JSON ({"train": [names], ...})."""
    return read_split_file(path, "image", ("image",))


def parse_grade(value: str, number: int, path: Path) -> int:
    """A CSV cell as a whole grade (`2`, `2.0`), or one clear error naming the row."""
    try:
        grade = float(value)
    except ValueError:
        raise KdcliError(f"row {number}: grade {value!r} is not a number", path=path) from None
    if not math.isfinite(grade):
        raise KdcliError(f"row {number}: grade {value!r} is not a finite number", path=path,
                         hint="fix or delete the row")
    if grade != int(grade):
        raise KdcliError(f"row {number}: grade {value!r} is not a whole grade", path=path,
                         hint="grades are whole numbers 0, 1, 2, ...; round the row deliberately or delete it")
    if grade < 0:
        raise KdcliError(f"row {number}: grade {value!r} is negative", path=path, hint="grades start at 0")
    return int(grade)


def _declared_grades(value: object) -> int | None:
    """--grades as given (None: not given); 0, 1 or a non-integer is refused, never replaced by the default."""
    if value is None:
        return None
    try:
        count = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        count = -1
    if count < 2 or str(count) != str(value).strip():
        raise KdcliError(f"--grades {value}: a grading has at least 2 grades (a whole number)",
                         hint="give the number of grades, e.g. --grades 5 for DR 0-4, or leave it out")
    return count


preprocess_image = preprocess_photo  # one raw photo as `prepare` stores it (kdcli.sources.imaging)


@dataclass
class FundusGradingOptions:
    """A graded fundus set for one task; a second call with another --task adds to the same --out."""

    labels: Path = field(metadata={"help": "Label CSV (EyePACS image,level or APTOS id_code,diagnosis)."})
    task: str = field(metadata={"help": "The task this set is graded for, e.g. dr or amd."})
    image_dir: Path | None = field(default=None, metadata={
        "help": "Image folder (default: train/, train_images/ or images/ beside the CSV)."})
    image_column: str | None = field(default=None, metadata={"help": "CSV column with image names."})
    label_column: str | None = field(default=None, metadata={"help": "CSV column with grades."})
    grades: int | None = field(default=None, metadata={"help": "Number of grades (default 5 for dr, 4 for amd)."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the patient-level 60/20/20 split."})
    splits: Path | None = field(default=None, metadata={
        "help": "Each image's split: CSV image,split or JSON {train: [...], dev: [...], test: [...]} (default: the "
                "seeded split)."})


class FundusGradingSource(PhotoSource):
    """Options: labels (CSV, required), task (required), image_dir, image_column, label_column,
    grades (number of grades, at least 2; default 5 for dr, 4 for amd, else the largest grade + 1), splits
    (CSV `image,split` or JSON: the split of every image), split_seed, ratios."""

    name = "fundus-grading"
    Options = FundusGradingOptions
    raw_help = "The set's folder (holds the label CSV and the images)."
    appends = True

    def scan(self, raw: Path) -> Scan:
        task = self.options.get("task")
        if not task:
            raise KdcliError("--task is required (e.g. dr or amd): the label space this set is graded for")
        labels = Path(self.options.get("labels") or "")
        if not labels.is_file():
            raise KdcliError("label CSV not found", path=labels, hint="pass --labels PATH")
        declared = _declared_grades(self.options.get("grades"))
        folder = _image_dir(labels, self.options.get("image_dir"))
        names = GRADE_NAMES.get(task)
        grades = declared or (len(names) if names else 0)
        rows = self._read(labels, folder, grades)
        if not grades:  # an unknown task without --grades: the largest grade seen sets the range
            grades = self.options["grades"] = max(g for _, g, _ in rows) + 1
        if not names or len(names) != grades:
            names = [str(g) for g in range(grades)]
        if self.options.get("splits"):
            splits = self._listed_splits(Path(self.options["splits"]), [name for name, _, _ in rows])
        else:
            group_grades: dict[str, int] = {}
            for name, grade, _ in rows:
                group = patient_of(name)
                group_grades[group] = max(grade, group_grades.get(group, 0))
            ratios = tuple(self.options.get("ratios") or (0.6, 0.2, 0.2))
            by_group = split_groups(group_grades, ratios, int(self.options.get("split_seed", 0)))
            splits = {name: by_group[patient_of(name)] for name, _, _ in rows}
        records = [Record(id=f"{task}:{name}", group=patient_of(name), split=splits[name],
                          label=grade, files={"fundus": str(path)}, task=task) for name, grade, path in rows]
        return Scan(records=records, classes=[], modalities={"fundus": 3}, pairing="unpaired",
                    tasks={task: {"classes": [f"{g} {n}" if n != str(g) else n for g, n in enumerate(names)],
                                  "ordinal": True}})

    def load(self, record: Record, size: int) -> dict[str, np.ndarray]:
        return {"fundus": preprocess_image(record.files["fundus"], size)}

    @staticmethod
    def _listed_splits(path: Path, names: list[str]) -> dict[str, str]:
        listed = read_splits(path)
        unlisted = [name for name in names if name not in listed]
        if unlisted:
            raise KdcliError(f"{len(unlisted)} image(s) of the label CSV are not listed: {', '.join(unlisted[:5])}"
                             f"{' ...' if len(unlisted) > 5 else ''}", path=path,
                             hint="give every image a split (train, dev or test)")
        absent = sorted(set(listed) - set(names))
        if absent:
            raise KdcliError(f"{len(absent)} listed image(s) are not in the label CSV: {', '.join(absent[:5])}"
                             f"{' ...' if len(absent) > 5 else ''}", path=path,
                             hint="is this the splits file of the other set?")
        # a patient with eyes in several splits is prepare's leakage check's (refused unless --allow-leakage)
        return {name: listed[name] for name in names}

    def _read(self, path: Path, folder: Path, grades: int) -> list[tuple[str, int, Path]]:
        reader = csv.reader(_open_text(path).splitlines())
        header = [h.strip() for h in next(reader, [])]
        image_column, label_column = _columns(path, header, self.options.get("image_column"),
                                              self.options.get("label_column"))
        image_at, label_at = header.index(image_column), header.index(label_column)
        rows, seen = [], {}
        for number, row in enumerate(reader, start=2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) <= max(image_at, label_at):
                raise KdcliError(f"row {number} has too few columns", path=path)
            name, value = row[image_at].strip(), row[label_at].strip()
            grade = parse_grade(value, number, path)
            if grades and grade >= grades:
                raise KdcliError(f"row {number}: grade {grade} outside 0..{grades - 1}", path=path,
                                 hint="fix the row, or declare the range with --grades N")
            if name in seen:
                first, first_grade = seen[name]
                conflict = f" with grades {first_grade} and {grade}" if first_grade != grade else ""
                raise KdcliError(f"row {number}: image {name!r} listed twice{conflict} (first at row {first})",
                                 path=path, hint="keep one row per image")
            seen[name] = (number, grade)
            image = _find_image(folder, name)
            if image is None:
                raise KdcliError(f"row {number}: image {name!r} not found in {folder}", path=path,
                                 hint="restore it, delete the row, or set --image-dir")
            rows.append((name, grade, image))
        if not rows:
            raise KdcliError("no rows", path=path)
        return rows
