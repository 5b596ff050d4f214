"""A lab's own data from one CSV: one row per sample, one path column per modality.

    id,patient,split,label,fundus,oct
    e001,p01,train,DR,fundus/e001.png,oct/e001.png
    e002,p01,train,NOR,fundus/e002.png,
    e003,p02,test,AMD,fundus/e003.png,oct/e003.png

Columns (names are options, case and surrounding spaces ignored):
  - id: unique per row (required); patient: the group splits never cut (default: each id its own patient);
  - split: train, dev (val, validation) or test; without the column patients are split by seeded `--ratios`,
    stratified by label;
  - label: class names or whole numbers (a grade); a `grade` column is read when there is no `label` column;
    `--classes` fixes the class order and refuses any other label; an empty label is an unlabeled training
    sample (distillation terms only). Multi-label: `--label-columns A,B,C`, each cell 1, 0 or empty (unknown,
    left out of the loss and the metrics);
  - one column per modality holding a path (relative to the CSV's folder or `--root`): PNG/JPEG/TIFF/BMP
    images, DICOM (.dcm) or NIfTI (.nii, .nii.gz; a volume gives its middle slice along the last axis).
    `--modalities` names them; by default every other column whose filled cells all end in such a suffix.
Pairing: when every labelled row fills every modality column the data is paired (one record per row, all its
modalities); otherwise unpaired, one record per row and filled modality (id `modality:id`).
Refused with the file and row named, before anything is written: a missing column or file, a duplicate id, an
unknown split or label, a patient in two splits (unless --allow-leakage, via prepare), a modality column whose
name cannot be an array name. An image that does not decode is named when prepare reads it.
"""

from __future__ import annotations

import csv
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import ClassVar

import numpy as np

from kdcli.errors import KdcliError
from kdcli.extras import require
from kdcli.sources.base import UNLABELED, Record, Scan, Source
from kdcli.sources.imaging import read_image, resize_square, resize_square_step
from kdcli.sources.splits import SPLIT_ALIASES, parse_ratios, stratified_split
from kdcli.sources.text import decoding, open_text

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
FILE_SUFFIXES = IMAGE_SUFFIXES + DICOM_SUFFIXES + NIFTI_SUFFIXES
MODALITY_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")  # shard array names and `--modality` values
RESERVED = {"id", "label", "labels", "index", "group", "split", "position"}  # arrays a shard holds already
IGNORE = 255  # an unknown multi-label cell: what the multi-label loss and metrics leave out
SPLIT_TAG = "table-split"


@dataclass
class TableOptions:
    """A lab's own data: a CSV with one row per sample (id, patient, split, label or label columns) and one path
    column per modality (PNG/JPEG/TIFF, DICOM, NIfTI), paired or unpaired."""

    modalities: str = field(default="", metadata={
        "help": "Comma list of the path columns, one per modality (default: every column whose cells are image, "
                "DICOM or NIfTI paths).", "metavar": "COLS"})
    root: str = field(default="", metadata={
        "help": "Folder the paths are relative to (default: the CSV's folder).", "metavar": "DIR"})
    id_column: str = field(default="id", metadata={"help": "Column with each sample's unique id."})
    patient_column: str = field(default="patient", metadata={
        "help": "Column with the patient (splits keep a patient together; default if absent: one per id)."})
    split_column: str = field(default="split", metadata={
        "help": "Column with train/dev/test (val = dev); if absent, patients are split by --ratios."})
    label_column: str = field(default="label", metadata={
        "help": "Column with the class name or grade (a `grade` column is read when this one is absent)."})
    label_columns: str = field(default="", metadata={
        "help": "Multi-label: comma list of 0/1 columns, one per finding (an empty cell is unknown).",
        "metavar": "COLS"})
    classes: str = field(default="", metadata={
        "help": "Comma list of the classes in order; any other label is refused (default: the labels found, "
                "sorted; whole numbers 0..max).", "metavar": "NAMES"})
    channels: str = field(default="", metadata={
        "help": "Stored channels per modality, e.g. fundus=3,oct=1 (default: from the column's first file; "
                "DICOM and NIfTI are grey).", "metavar": "MOD=C,..."})
    ratios: str = field(default="0.7,0.1,0.2", metadata={
        "help": "train,dev,test fractions of the patients when the CSV has no split column."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the patient split by --ratios."})


@dataclass(frozen=True)
class TableRecord(Record):
    labels: tuple[int, ...] = ()  # multi-label targets (1, 0 or IGNORE per finding); empty for single-label
    channels: tuple[tuple[str, int], ...] = ()  # (modality, stored channels): what `load` decodes each file to


def _fold(name: str) -> str:
    return name.strip().lower()


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def is_dicom(path: str | Path) -> bool:
    return str(path).lower().endswith(DICOM_SUFFIXES)


def read_nifti(path: str | Path) -> np.ndarray:
    """A NIfTI image as grey uint8 (H, W): a 2-D image, or a volume's middle slice along its last axis, scaled
    from its 0.5..99.5 percentiles (MRI and CT have no fixed range)."""
    nib = require("nibabel", "mri", "reading NIfTI columns")
    try:
        data = np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)
    except FileNotFoundError:
        raise KdcliError("listed file does not exist", path=path, hint="fix the CSV or restore the file") from None
    except Exception as exc:  # nibabel, gzip and zlib raise many types for a damaged or foreign file
        raise KdcliError(f"will not load as NIfTI ({type(exc).__name__})", path=path,
                         hint="re-export it, or drop its row from the CSV") from None
    data = np.squeeze(data)
    if data.ndim == 3:
        data = data[:, :, data.shape[2] // 2]
    if data.ndim != 2:
        raise KdcliError(f"NIfTI of shape {data.shape}: expected a 2-D image or a 3-D volume", path=path)
    if not np.isfinite(data).all():
        raise KdcliError("NIfTI holds NaN or infinite values", path=path)
    low, high = np.percentile(data, [0.5, 99.5])
    return np.round(np.clip((data - low) / max(high - low, 1e-12), 0.0, 1.0) * 255.0).astype(np.uint8)


def read_file(path: str | Path, channels: int) -> np.ndarray:
    """Any supported file as uint8 (H, W, channels)."""
    if is_dicom(path) or is_nifti(path):
        if is_dicom(path):
            from kdcli.sources.cxr import read_xray

            grey = read_xray(path)
        else:
            grey = read_nifti(path)
        return np.repeat(grey[:, :, None], channels, axis=2)
    return read_image(path, channels)


def preprocess_file(path: str | Path, channels: int, size: int) -> np.ndarray:
    """One raw file as `prepare table` stores it (`kdcli predict` can call this): decoded to the modality's
    channels, zero-padded to square and resized."""
    return resize_square(read_file(path, channels), size)


def _first_channels(path: Path) -> int:
    """1 for grey files (DICOM, NIfTI, single-channel images), else 3."""
    if is_dicom(path) or is_nifti(path):
        return 1
    import cv2

    image = cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise KdcliError("image will not decode (truncated or not an image)", path=path,
                         hint="re-export it, or drop its row from the CSV")
    return 1 if image.ndim == 2 or image.shape[2] == 1 else 3


@dataclass
class _Row:
    number: int
    id: str
    patient: str
    split: str  # "" when the CSV has no split column (filled by the seeded split)
    label: int
    labels: tuple[int, ...]
    files: dict[str, Path]


@dataclass
class _Layout:
    """Where things are in the CSV: its path, header, the folder paths are relative to, and the columns."""

    csv: Path
    header: list[str]
    base: Path
    id_at: int
    patient_at: int | None
    split_at: int | None
    finding_at: list[int]
    modalities: dict[str, int]  # modality -> column


class TableSource(Source):
    """Options: see TableOptions."""

    name = "table"
    Options: ClassVar[type] = TableOptions
    raw_help: ClassVar[str] = "The CSV: one row per sample (id, patient, split, label, one path column per modality)."
    default_size: ClassVar[int] = 224

    raw_suffixes: ClassVar[tuple[str, ...]] = FILE_SUFFIXES
    raw_kind: ClassVar[str] = "images (PNG, JPEG, TIFF, DICOM or NIfTI)"

    @classmethod
    def raw_image_reader(cls, record: dict, modality: str) -> Callable[[str], np.ndarray]:
        channels = int(record["modalities"][modality]["shape"][2])  # each modality's channels: its stored shape
        return functools.partial(preprocess_file, channels=channels, size=int(record["size"]))

    @classmethod
    def preprocessing_steps(cls, record: dict, meta: dict) -> list[str]:
        grey = int(record["modalities"][meta["modality"]]["shape"][2]) == 1
        return [f"decode to {'grey' if grey else 'RGB'} uint8: PNG/JPEG/TIFF (16-bit / 257); DICOM: as prepare cxr "
                "(modality LUT, VOI LUT or window, else min-max); NIfTI: a volume's middle slice along the last axis, "
                "scaled from its 0.5..99.5 percentiles" + ("" if grey else "; grey files repeated to 3 channels"),
                resize_square_step(int(record["size"]))]

    def __init__(self, **options):
        known = {f.name for f in fields(TableOptions)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise KdcliError(f"unknown table option(s): {', '.join(unknown)}")
        super().__init__(**options)
        self.config = TableOptions(**options)

    # ------------------------------------------------------------ scan

    def scan(self, raw: Path) -> Scan:
        path = Path(raw)
        if path.is_dir():
            raise KdcliError("is a folder; `prepare table` reads one CSV", path=path,
                             hint="pass the CSV file itself")
        if not path.is_file():
            raise KdcliError("CSV not found", path=path)
        header, rows = self._read_csv(path)
        options, notes = self.config, []
        columns = {_fold(name): at for at, name in enumerate(header)}
        id_at = self._column(path, header, columns, options.id_column, "the sample ids")
        patient_at = columns.get(_fold(options.patient_column))
        split_at = columns.get(_fold(options.split_column))
        multilabel = _comma_list(options.label_columns)
        label_at, label_name = None, options.label_column
        if not multilabel:
            label_at = columns.get(_fold(options.label_column))
            if label_at is None and _fold(options.label_column) == "label" and "grade" in columns:
                label_at, label_name = columns["grade"], "grade"
            if label_at is None:
                self._column(path, header, columns, options.label_column, "the labels (or pass --label-columns)")
        finding_at = [self._column(path, header, columns, name, "a finding of --label-columns") for name in multilabel]
        used = {id_at, patient_at, split_at, label_at, *finding_at} - {None}
        modalities = self._modalities(path, header, columns, rows, used, notes)
        if patient_at is None:
            notes.append(f"no {options.patient_column!r} column: each id is its own patient")
        base = Path(options.root) if options.root else path.parent
        if options.root and not base.is_dir():
            raise KdcliError("--root folder not found", path=base)
        label_texts = [row[label_at].strip() if label_at is not None else "" for _, row in rows]
        classes = multilabel or self._classes(path, rows, label_texts, label_name)
        layout = _Layout(path, header, base, id_at, patient_at, split_at, finding_at, modalities)
        parsed: list[_Row] = []
        seen: dict[str, int] = {}
        for (number, row), label_text in zip(rows, label_texts, strict=True):
            parsed.append(self._row(layout, number, row, classes.index(label_text) if label_text else UNLABELED))
            if parsed[-1].id in seen:
                raise KdcliError(f"row {number}: id {parsed[-1].id!r} is also on row {seen[parsed[-1].id]}",
                                 path=path, hint="one row per sample: ids must be unique")
            seen[parsed[-1].id] = number
        if split_at is None:
            self._seeded_split(parsed, notes)
        channels = self._channels(parsed, list(modalities))
        records, pairing = self._records(parsed, list(modalities))
        records = [replace(r, channels=tuple((m, channels[m]) for m in r.files)) for r in records]
        scan = Scan(records=records, classes=classes, modalities=channels, pairing=pairing,
                    extra={"csv": str(path.resolve()), "files_root": str(base.resolve())}, notes=notes)
        if multilabel:
            scan.task = "multilabel"
            scan.arrays = {"labels": {"shape": [len(multilabel)], "dtype": "uint8", "role": "target"}}
            scan.extra.update({"ignore_value": IGNORE, "label_names": ["no finding", "finding"]})
        return scan

    def load(self, record: Record, size: int) -> dict[str, np.ndarray]:
        channels = dict(getattr(record, "channels", ()))
        arrays = {modality: preprocess_file(file, channels.get(modality, 3), size)
                  for modality, file in record.files.items()}
        labels = getattr(record, "labels", ())
        if labels and record.label != UNLABELED:
            arrays["labels"] = np.asarray(labels, np.uint8)
        return arrays

    # ------------------------------------------------------------ reading the CSV

    def _row(self, layout: _Layout, number: int, row: list[str], label: int) -> _Row:
        """One CSV row checked: its id, files (each present), split and labels."""
        path = layout.csv
        ident = row[layout.id_at].strip()
        if not ident:
            raise KdcliError(f"row {number}: empty {layout.header[layout.id_at]!r}", path=path,
                             hint="give every row an id")
        files = {}
        for modality, at in layout.modalities.items():
            cell = row[at].strip()
            if not cell:
                continue
            file = Path(cell) if Path(cell).is_absolute() else layout.base / cell
            if not file.is_file():
                raise KdcliError(f"row {number}: {modality} file {cell!r} not found (looked in {layout.base})",
                                 path=path, hint="restore it, fix the path, or set --root")
            files[modality] = file
        if not files:
            raise KdcliError(f"row {number}: no file in any modality column ({', '.join(layout.modalities)})",
                             path=path, hint="fill at least one path or delete the row")
        labels: tuple[int, ...] = ()
        if layout.finding_at:
            labels = tuple(self._finding(path, number, row[at], layout.header[at]) for at in layout.finding_at)
            label = UNLABELED if all(v == IGNORE for v in labels) else int(any(v == 1 for v in labels))
        split = self._split(path, number, row[layout.split_at]) if layout.split_at is not None else ""
        if label == UNLABELED and split in ("dev", "test"):
            raise KdcliError(f"row {number}: unlabeled sample {ident!r} in split {split!r}", path=path,
                             hint="unlabeled samples can only train: give it a label or the split train")
        if label == UNLABELED:
            split = "train"
        elif layout.split_at is not None and not split:
            raise KdcliError(f"row {number}: no split for {ident!r}", path=path,
                             hint="fill train, dev or test (or drop the split column for a seeded split)")
        patient = row[layout.patient_at].strip() if layout.patient_at is not None else ""
        return _Row(number, ident, patient or ident, split, label, labels, files)

    @staticmethod
    def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
        with open_text(path) as handle, decoding(path):
            lines = list(csv.reader(handle))
        if not lines or not any(cell.strip() for cell in lines[0]):
            raise KdcliError("is empty (no header, no rows)", path=path,
                             hint="the first line names the columns: id,patient,split,label,<modality>...")
        header = [cell.strip() for cell in lines[0]]
        rows = []
        for number, row in enumerate(lines[1:], start=2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise KdcliError(f"row {number} has {len(row)} cells, the header {len(header)}", path=path,
                                 hint="quote cells that hold commas, or fix the row")
            rows.append((number, row))
        if not rows:
            raise KdcliError("has a header but no rows", path=path)
        return header, rows

    @staticmethod
    def _column(path: Path, header: list[str], columns: dict[str, int], name: str, role: str) -> int:
        if _fold(name) not in columns:
            raise KdcliError(f"no column {name!r} for {role} (found: {', '.join(header)})", path=path,
                             hint="rename the column or name it with the matching --...-column option")
        return columns[_fold(name)]

    def _modalities(self, path: Path, header: list[str], columns: dict[str, int], rows: list, used: set,
                    notes: list[str]) -> dict[str, int]:
        """modality (the column's name) -> column index."""
        named = _comma_list(self.config.modalities)
        if named:
            found = {header[self._column(path, header, columns, n, "a modality of --modalities")]:
                     columns[_fold(n)] for n in named}
        else:
            found = {}
            for at, name in enumerate(header):
                cells = [row[at].strip() for _, row in rows if row[at].strip()]
                if at not in used and cells and all(c.lower().endswith(FILE_SUFFIXES) for c in cells):
                    found[name] = at
            ignored = [header[at] for at in range(len(header)) if at not in used and header[at] not in found]
            if not found:
                raise KdcliError(f"no column of file paths (found: {', '.join(header)})", path=path,
                                 hint="name the modality columns with --modalities; paths end in "
                                      + ", ".join(FILE_SUFFIXES))
            if ignored:
                notes.append(f"columns not read: {', '.join(ignored)}")
        for name in found:
            if not MODALITY_NAME.match(name) or name.lower() in RESERVED:
                raise KdcliError(f"column {name!r} cannot name a modality", path=path,
                                 hint="rename it to letters, digits and _ (not id, label, labels, split, ...)")
        return found

    def _classes(self, path: Path, rows: list, texts: list[str], column: str) -> list[str]:
        given = _comma_list(self.config.classes)
        found = {t for t in texts if t}
        if given:
            for (number, _), text in zip(rows, texts, strict=True):
                if text and text not in given:
                    raise KdcliError(f"row {number}: unknown label {text!r}", path=path,
                                     hint=f"--classes lists {', '.join(given)}")
            return given
        if not found:
            raise KdcliError(f"no row has a {column!r}", path=path, hint="label at least the dev and test rows")
        if all(t.isdigit() for t in found):  # grades: every whole number up to the largest is a class
            return [str(g) for g in range(max(int(t) for t in found) + 1)]
        return sorted(found)

    @staticmethod
    def _split(path: Path, number: int, cell: str) -> str:
        if not cell.strip():
            return ""
        split = SPLIT_ALIASES.get(cell.strip().lower())
        if split is None:
            raise KdcliError(f"row {number}: unknown split {cell.strip()!r}", path=path,
                             hint="splits are train, dev (or val/validation) and test")
        return split

    @staticmethod
    def _finding(path: Path, number: int, cell: str, column: str) -> int:
        text = cell.strip().lower()
        if not text:
            return IGNORE
        value = {"1": 1, "1.0": 1, "0": 0, "0.0": 0, "true": 1, "false": 0}.get(text)
        if value is None:
            raise KdcliError(f"row {number}: {column} is {cell.strip()!r}, not 1, 0 or empty", path=path,
                             hint="multi-label cells are 1 (present), 0 (absent) or empty (unknown)")
        return value

    def _seeded_split(self, rows: list[_Row], notes: list[str]) -> None:
        """Patients split by --ratios, stratified by each patient's first label (unlabeled rows train)."""
        first_labels: dict[str, int] = {}
        for row in rows:
            if row.label != UNLABELED:
                first_labels.setdefault(row.patient, row.label)
        assignment = stratified_split(first_labels, parse_ratios(self.config.ratios), int(self.config.split_seed),
                                      SPLIT_TAG)
        for row in rows:
            row.split = row.split or assignment.get(row.patient, "train")
        notes.append(f"no split column: {len(first_labels)} patients split {self.config.ratios} by label "
                     f"(seed {self.config.split_seed})")

    @staticmethod
    def _records(rows: list[_Row], modalities: list[str]) -> tuple[list[Record], str]:
        labelled = [row for row in rows if row.label != UNLABELED]
        paired = len(modalities) > 1 and all(len(row.files) == len(modalities) for row in labelled)
        if paired or len(modalities) == 1:
            return [TableRecord(id=row.id, group=row.patient, split=row.split, label=row.label,
                                files={m: str(f) for m, f in row.files.items()}, labels=row.labels)
                    for row in rows], "paired" if paired else "unpaired"
        return [TableRecord(id=f"{m}:{row.id}", group=row.patient, split=row.split, label=row.label,
                            files={m: str(f)}, labels=row.labels)
                for row in rows for m, f in row.files.items()], "unpaired"

    def _channels(self, rows: list[_Row], modalities: list[str]) -> dict[str, int]:
        given = {}
        for item in _comma_list(self.config.channels):
            name, _, value = item.partition("=")
            if name.strip() not in modalities or value.strip() not in ("1", "3"):
                raise KdcliError(f"--channels {item!r}: expected MODALITY=1 or =3 for one of {', '.join(modalities)}")
            given[name.strip()] = int(value)
        channels = {}
        for modality in modalities:
            first = next(row.files[modality] for row in rows if modality in row.files)
            channels[modality] = given.get(modality) or _first_channels(first)
        return channels
