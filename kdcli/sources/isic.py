"""ISIC dermoscopy challenges: an image folder and the ground-truth CSV, as downloaded.

    2019: ISIC_2019_Training_GroundTruth.csv  `image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK` (one-hot, 1.0/0.0)
          ISIC_2019_Training_Metadata.csv     `image,...,lesion_id,...` (optional: images of a lesion stay together)
          ISIC_2019_Training_Input/<image>.jpg
    2020: ISIC_2020_Training_GroundTruth.csv  `image_name,patient_id,...,target` (0 benign, 1 malignant)
          train/<image_name>.jpg (or jpeg/train/)

The release is told from the CSV's header. There is no official labelled split: patients (2020 patient_id, 2019
lesion_id, else the image) are split by seeded `--ratios`, stratified by class, unless `--splits FILE` gives each
image its split. A 2019 class no image has (UNK in the training set) is left out with a note. Refused with the
row named: a 2019 row that is not one-hot, a 2020 target other than 0/1, an image listed twice or missing.
This file and one registry line are all a new source needs (see kdcli/sources/table.py for a generic CSV).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from kdcli.errors import KdcliError
from kdcli.sources.base import PhotoSource, Record, Scan
from kdcli.sources.imaging import preprocess_photo
from kdcli.sources.splits import parse_ratios, read_split_file, stratified_split
from kdcli.sources.text import decoding, open_text

CLASSES_2019 = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
CLASSES_2020 = ["benign", "malignant"]
LABEL_FILES = ("ISIC_2019_Training_GroundTruth.csv", "ISIC_2020_Training_GroundTruth.csv",
               "ISIC_2020_Training_GroundTruth_v2.csv", "train.csv")
METADATA_2019 = "ISIC_2019_Training_Metadata.csv"
IMAGE_DIRS = ("ISIC_2019_Training_Input", "train", "jpeg/train", "images", ".")
SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class IsicOptions:
    """ISIC 2019 (8 diagnoses) or 2020 (benign/malignant) dermoscopy: the image folder and the ground-truth CSV."""

    labels: str = field(default="", metadata={
        "help": "Ground-truth CSV (default: the ISIC_2019/2020 ground truth, or train.csv, in RAW).",
        "metavar": "CSV"})
    image_dir: str = field(default="", metadata={
        "help": "Image folder (default: ISIC_2019_Training_Input/, train/ or jpeg/train/ in RAW).", "metavar": "DIR"})
    splits: str = field(default="", metadata={
        "help": "Each image's split: CSV image,split or JSON {train: [...], dev: [...], test: [...]} "
                "(default: seeded patient split).", "metavar": "FILE"})
    ratios: str = field(default="0.7,0.1,0.2", metadata={"help": "train,dev,test fractions of the patients."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the patient split."})


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    with open_text(path) as handle, decoding(path):
        reader = csv.DictReader(handle, restval="")  # a short row's missing cells read as empty
        rows = [(reader.line_num, row) for row in reader]  # line_num: the file's line, blank lines counted
        header = list(reader.fieldnames or [])
    if not header:
        raise KdcliError("is empty (no header, no rows)", path=path)
    return header, rows


def _find(raw: Path, given: str, names: tuple[str, ...], what: str, folder: bool = False) -> Path:
    if given:
        path = Path(given)
        if not (path.is_dir() if folder else path.is_file()):
            raise KdcliError(f"{what} not found", path=path)
        return path
    for name in names:
        candidate = raw / name
        if (candidate.is_dir() and any(candidate.glob("*.jp*g"))) if folder else candidate.is_file():
            return candidate
    raise KdcliError(f"no {what} in RAW (looked for {', '.join(names)})", path=raw,
                     hint=f"pass --{'image-dir' if folder else 'labels'}")


def _one_hot(path: Path, number: int, row: dict[str, str], classes: list[str]) -> int:
    try:
        values = [float(row[c] or 0) for c in classes]
    except ValueError:
        raise KdcliError(f"row {number}: a class cell is not a number", path=path) from None
    hot = [i for i, v in enumerate(values) if v == 1.0]
    if len(hot) != 1 or any(v not in (0.0, 1.0) for v in values):
        raise KdcliError(f"row {number}: image {row['image']!r} is not one-hot over {','.join(classes)}", path=path,
                         hint="each row has exactly one 1.0")
    return hot[0]


def _target(path: Path, number: int, row: dict[str, str]) -> int:
    value = (row["target"] or "").strip()
    if value not in ("0", "1"):
        raise KdcliError(f"row {number}: target {value!r} is not 0 or 1", path=path)
    return int(value)


class IsicSource(PhotoSource):
    name = "isic"
    Options: ClassVar[type] = IsicOptions
    raw_help: ClassVar[str] = "Folder of the ISIC download (ground-truth CSV and image folder)."
    default_size: ClassVar[int] = 224

    def __init__(self, **options):
        try:
            self.config = IsicOptions(**options)
        except TypeError as exc:  # an option name the dataclass does not know
            raise KdcliError(f"isic options: {exc}") from None
        super().__init__(**options)

    def scan(self, raw: Path) -> Scan:
        raw, options = Path(raw), self.config
        labels = _find(raw, options.labels, LABEL_FILES, "ground-truth CSV")
        images = _find(raw, options.image_dir, IMAGE_DIRS, "image folder", folder=True)
        header, rows = _read_csv(labels)
        notes: list[str] = []
        if "image" in header and set(CLASSES_2019[:8]) <= set(header):
            release, id_column = "2019", "image"
            columns = [c for c in CLASSES_2019 if c in header]
            found = [(number, row["image"].strip(), _one_hot(labels, number, row, columns)) for number, row in rows]
            used = sorted({label for *_, label in found})
            unused = [c for i, c in enumerate(columns) if i not in used]
            if unused:
                notes.append(f"classes without images left out: {', '.join(unused)}")
            classes = [columns[i] for i in used]
            found = [(number, name, used.index(label)) for number, name, label in found]
            groups = self._lesions(labels.parent / METADATA_2019)
        elif {"image_name", "patient_id", "target"} <= set(header):
            release, id_column, classes = "2020", "image_name", list(CLASSES_2020)
            found = [(number, row["image_name"].strip(), _target(labels, number, row)) for number, row in rows]
            groups = {row["image_name"].strip(): row["patient_id"].strip() for _, row in rows}
        else:
            raise KdcliError(f"neither the ISIC 2019 nor the 2020 ground-truth header (found: {', '.join(header)})",
                             path=labels, hint="2019: image,MEL,NV,...; 2020: image_name,patient_id,...,target")
        records = self._records(labels, images, found, groups, notes)
        return Scan(records=records, classes=classes, modalities={"dermoscopy": 3}, pairing="unpaired",
                    extra={"release": release, "id_column": id_column}, notes=notes)

    def load(self, record: Record, size: int) -> dict[str, np.ndarray]:
        return {"dermoscopy": preprocess_photo(record.files["dermoscopy"], size)}

    @staticmethod
    def _lesions(metadata: Path) -> dict[str, str]:
        """2019 image -> lesion_id where the metadata sheet gives one (the same lesion imaged twice is one group)."""
        if not metadata.is_file():
            return {}
        _, rows = _read_csv(metadata)
        return {row["image"].strip(): row["lesion_id"].strip() for _, row in rows
                if (row.get("lesion_id") or "").strip()}

    def _records(self, labels: Path, images: Path, found: list[tuple[int, str, int]], groups: dict[str, str],
                 notes: list[str]) -> list[Record]:
        seen: dict[str, int] = {}
        files: dict[str, Path] = {}
        for number, name, _ in found:
            if name in seen:
                raise KdcliError(f"row {number}: image {name!r} is also on row {seen[name]}", path=labels,
                                 hint="keep one row per image")
            seen[name] = number
            file = next((images / f"{name}{s}" for s in SUFFIXES if (images / f"{name}{s}").is_file()), None)
            if file is None:
                raise KdcliError(f"row {number}: image {name!r} not found in {images}", path=labels,
                                 hint="restore it, delete the row, or set --image-dir")
            files[name] = file
        group_of = {name: groups.get(name) or name for _, name, _ in found}
        options = self.config
        if options.splits:
            listed = read_split_file(Path(options.splits), "image", ("image", "image_name"))
            missing = [name for _, name, _ in found if name not in listed]
            if missing:
                raise KdcliError(f"{len(missing)} image(s) have no split, e.g. {missing[0]}", path=options.splits,
                                 hint="list every image of the ground-truth CSV")
            split_of = {name: listed[name] for _, name, _ in found}
        else:
            first: dict[str, int] = {}
            for _, name, label in found:
                first.setdefault(group_of[name], label)
            by_group = stratified_split(first, parse_ratios(options.ratios), options.split_seed, "isic-split")
            split_of = {name: by_group[group_of[name]] for _, name, _ in found}
            notes.append(f"{len(first)} patients split {options.ratios} by class (seed {options.split_seed})")
        return [Record(id=name, group=group_of[name], split=split_of[name], label=label,
                       files={"dermoscopy": str(files[name])}) for _, name, label in found]
