"""Breast biopsy whole-slide images + a clinical sheet (BCNB layout, Camelyon-style pyramids), for axillary lymph
node (ALN) status: each slide becomes a bag of tissue patches (task "mil", one label per slide).

Layouts (found at any depth under RAW, hidden files and `__MACOSX` skipped; the slide id is the file stem):
    pyramids  <raw>/.../<id>.{svs,tif,tiff,ndpi,mrxs}, read with OpenSlide; tumour outlines, optional, in
              <id>.json next to the slide or anywhere under RAW (e.g. annotations/<id>.json)
    BCNB      <raw>/WSIs/<n>.jpg (the full level 0, read with OpenCV) with the outline <n>.json next to it
    sheet     `clinical` option, else <raw>/clinical.xlsx, <raw>/clinical.csv or the one .xlsx at RAW's top
              (BCNB ships `patient-clinical-data.xlsx`); one row per slide, joined on `id_column` (ids are
              compared as text with integers normalised: 1, 1.0, "1" and "001" all match slide 1.jpg).
Outlines are ASAP-style JSON in level-0 pixels: {"positive": [{"vertices": [[x, y], ...]}, ...]}.

Labels: `label_column` (ALN status) N0 / N+(1-2) / N+(>2); binary (default) folds N+(1-2) and N+(>2) into N+.
Unlabeled slides (kdcli's extension for distillation on slides nobody staged): a row whose label cell is empty
makes its slide an unlabeled training slide (records of label -1, split train, patches in shards of their own,
counted in dataset.json's "unlabeled"); any other value outside the vocabulary stays an error. Its clinical
vector is encoded as every other (the train statistics come from the labelled train slides alone, so adding
unlabeled slides changes no labelled record). Refused, in one line each: a patient with one row staged and one
not, an unlabeled slide a splits file lists in dev or test, a row without its slide (and a slide without its row).
Splits: seeded, stratified by label, at patient level (BCNB has one slide per patient, so a slide is a group),
or `splits`: a JSON {"train": [ids], "dev": [...], "test": [...]} or a CSV (`slide,split`) listing every labelled
slide (unlabeled ones may be listed, in train only). `synth camelyon` writes its split to splits.json when its
noisy labels or extra test slides depend on it; a splits.json in RAW that was not passed is named in a note.

Clinical vector (arrays "clinical" float16 [D] and "clinical_mask" uint8 [D], 1 = observed, identical for every
patch of a slide): Age, Tumour Size and Ki67 z-scored with mean/std of the TRAIN split's observed values; Tumour
Type, ER, PR, HER2, HER2 Expression, Histological grading and Molecular subtype one-hot over fixed BCNB
vocabularies (an unknown value is an error naming the row: it is a typo or another coding, never a new class).
A missing cell stays missing: its entries are 0 with mask 0. Left out as leakage: `Number of lymph node
metastases` and `ALN status` (the target itself) and `Surgical` (mastectomy vs breast-conserving surgery is
decided knowing the nodal status, so it is not available when the biopsy is read). The encoding (feature names,
vocabularies, train statistics) is in dataset.json under extra.clinical and in every checkpoint's preprocessing
record; `ClinicalSheet` encodes a sheet's rows with it for `kdcli predict --clinical`, by the same functions.
How the vector reaches the workers: scan reads the sheet once and puts each slide's encoded vector in its
record, a `SlideRecord` (a `Record` with `clinical`, `clinical_mask` and `outline` fields); records are pickled
to prepare's worker processes with their shard job, so workers never re-read the sheet and cannot disagree with
the train statistics.

Patches (after CLAM / TRIDENT): the tissue mask is built on a thumbnail (downsample <= 64 and fine enough for
~8 mask pixels per patch side) area-reduced from the pyramid level closest below half that downsample (the
coarsest JPEG levels smear colour around the tissue), read in blocks, never level 0 in one piece:
HSV saturation, median blur (7), > `tissue_threshold` (CLAM's sthresh 8), morphological close (4x4), pieces
smaller than a quarter patch dropped and holes smaller than a patch filled (CLAM's a_t / a_h, scaled to the
patch because slides come at any size). Native magnification: `openslide.objective-power`, else 10 / mpp-x,
else the `native_mag` option (BCNB jpgs carry neither: their native magnification is taken as `native_mag`,
default `mag`, i.e. the jpg is read as-is at 20x as BCNB's authors do). A grid of `patch_size` patches at `mag`
(stride = patch side, whole patches only) is laid on level 0; patches with tissue fraction >= `min_tissue`
are kept (and, with `annotated_only`, only those whose centre lies inside a tumour outline, for slides that
have outlines), then at most `max_patches` (<= 0: all) are drawn as a seeded spread sample (one per equal run
of the row-major candidates). Each patch is read at the pyramid level whose downsample is closest below the
needed one, resized to exactly `patch_size`, then to prepare's `size`. `coords` holds its level-0 top-left.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import cv2
import numpy as np

from kdcli.errors import KdcliError
from kdcli.extras import require
from kdcli.sources._skip import read_or_skip, skip_or_raise
from kdcli.sources.base import UNLABELED, Record, Sample, Scan, Source
from kdcli.sources.imaging import quiet_opencv
from kdcli.sources.splits import parse_ratios, read_split_file, stable_seed

quiet_opencv()  # BCNB's JPEGs are read with cv2.imread: one kdcli line per broken file, no OpenCV warning
cv2.setNumThreads(1)  # parallelism comes from prepare's worker processes

OPENSLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs")
JPEG_SUFFIXES = (".jpg", ".jpeg")
ALN = ("N0", "N+(1-2)", "N+(>2)")
CLASSES = {True: ["N0", "N+"], False: list(ALN)}
NUMERIC = ("Age(years)", "Tumour Size(cm)", "Ki67")
CATEGORICAL = {  # BCNB's vocabularies, in this order in the vector
    "Tumour Type": ["Invasive ductal carcinoma", "Invasive lobular carcinoma", "Other type"],
    "ER": ["Positive", "Negative"],
    "PR": ["Positive", "Negative"],
    "HER2": ["Positive", "Negative"],
    "HER2 Expression": ["0", "1+", "2+", "3+"],
    "Histological grading": ["1", "2", "3"],
    "Molecular subtype": ["Luminal A", "Luminal B", "HER2(+)", "Triple negative"],
}
LEAKAGE = ("Number of lymph node metastases", "ALN status", "Surgical")
SKIP_HINT = "fix or remove the slide, or pass --skip-bad to leave it out"
SHEET_HINT = "fix the sheet, or pass --skip-bad to leave the slide out"
THUMB_MAX_DOWNSAMPLE = 64.0  # CLAM segments on the level closest to 64x
MASK_PX_PER_PATCH = 8.0  # at least this many mask pixels along a patch side
BLOCK = 2048  # thumbnail level read in blocks of at most BLOCK x BLOCK pixels
THUMB_MAX_READ = 64_000_000  # pixels of the level read for the thumbnail, when a coarser level can do
MEDIAN = 7  # CLAM's mthresh
CLOSE = 4  # CLAM's close




@dataclass(frozen=True)
class SlideRecord(Record):
    """A slide: its encoded clinical vector travels with it to prepare's workers (pickled with the shard job)."""

    clinical: tuple[float, ...] = ()
    clinical_mask: tuple[int, ...] = ()
    outline: str = ""  # tumour outline JSON, "" when the slide has none


# ---------------------------------------------------------------- small helpers


def _key(value: Any) -> str | None:
    """An id or category as comparable text: None for empty, integers normalised (1, 1.0, "001" -> "1")."""
    if value is None:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            return str(int(value))
    text = " ".join(str(value).split())
    if not text or text.lower() in ("nan", "none", "null", "na", "n/a"):
        return None
    number = re.fullmatch(r"(\d+)(?:\.0+)?", text)
    return str(int(number.group(1))) if number else text


def _fold(text: str) -> str:
    return "".join(text.split()).lower()


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    text = value.strip().rstrip("%").strip()
    try:
        number = float(text)
    except ValueError:
        return math.nan  # caller names the row
    return None if math.isnan(number) else number


def _slide_error(slide: str, message: str, hint: str = SKIP_HINT) -> KdcliError:
    return KdcliError(message, hint=hint, subject=f"slide {slide}")


def _reason(exc: Exception, path: str | Path) -> str:
    text = " ".join(str(exc).replace(str(path), Path(path).name).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _atomic_png(path: Path, image_rgb: np.ndarray) -> None:
    from kdcli.shards.format import atomic_write_bytes

    ok, buffer = cv2.imencode(".png", np.ascontiguousarray(image_rgb[..., ::-1]))
    if not ok:
        raise KdcliError("could not encode the thumbnail PNG", path=path)
    atomic_write_bytes(path, buffer.tobytes())


# ---------------------------------------------------------------- scanning: files


def _find_files(raw: Path) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    """Slides by id and outline JSON files by stem, in a deterministic order."""
    slides: dict[str, Path] = {}
    outlines: dict[str, list[Path]] = {}
    for folder, dirs, names in os.walk(raw):
        dirs[:] = sorted(d for d in dirs if d != "__MACOSX" and not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = Path(folder) / name
            suffix = path.suffix.lower()
            if suffix in OPENSLIDE_SUFFIXES or suffix in JPEG_SUFFIXES:
                if path.stem in slides:
                    raise KdcliError(f"slide id {path.stem} found twice: {slides[path.stem]} and {path}", path=raw,
                                     hint="slide ids are file stems: keep one copy of each slide")
                slides[path.stem] = path
            elif suffix == ".json":
                outlines.setdefault(path.stem, []).append(path)
    return slides, outlines


def _outline_for(slide: Path, candidates: list[Path]) -> str:
    if not candidates:
        return ""
    beside = slide.with_suffix(".json")
    return str(beside if beside in candidates else candidates[0])


def openslide_module() -> ModuleType:
    """openslide (openslide-python with the openslide-bin library), the [wsi] extra; BCNB's jpgs need neither."""
    return require("openslide", "wsi", "reading whole-slide images (SVS, tiled TIFF...)")


def _check_header(slide_id: str, path: Path) -> None:
    """Headers only: OpenSlide's format detection, or the JPEG magic number."""
    if path.suffix.lower() in JPEG_SUFFIXES:
        with open(path, "rb") as handle:
            if handle.read(3) != b"\xff\xd8\xff":
                raise _slide_error(slide_id, f"{path}: not a JPEG file")
        return
    openslide = openslide_module()
    try:
        vendor = openslide.OpenSlide.detect_format(str(path))
    except Exception as exc:  # noqa: BLE001  (OpenSlide raises several types for foreign files)
        raise _slide_error(slide_id, f"{path}: not readable by OpenSlide ({_reason(exc, path)})") from None
    if vendor is None:
        raise _slide_error(slide_id, f"{path}: not a slide format OpenSlide can read (damaged or foreign file)")


# ---------------------------------------------------------------- scanning: clinical sheet


def _find_sheet(raw: Path, option: Any) -> Path:
    if option:
        path = Path(option)
        if not path.is_file():
            raise KdcliError("clinical sheet not found", path=path, hint="pass --clinical with an .xlsx or .csv file")
        return path
    for name in ("clinical.xlsx", "clinical.csv"):
        if (raw / name).is_file():
            return raw / name
    found = sorted(p for p in raw.glob("*.xlsx") if not p.name.startswith((".", "~$")))
    if len(found) == 1:
        return found[0]
    raise KdcliError("no clinical sheet (clinical.xlsx, clinical.csv or one .xlsx at the top)", path=raw,
                     hint="pass --clinical with BCNB's patient-clinical-data.xlsx (labels come from it)")


def _read_sheet(path: Path) -> tuple[list[str], list[list[str | None]]]:
    """Header and rows as text (None for an empty cell); the first worksheet of an .xlsx."""
    import polars as pl

    excel = path.suffix.lower() in (".xlsx", ".xlsm", ".xls")
    if excel:
        require("fastexcel", "wsi", "reading the clinical sheet (.xlsx)")
    try:
        if excel:
            frame = pl.read_excel(path, infer_schema_length=0)  # polars reads Excel through fastexcel
        else:
            frame = pl.read_csv(path, infer_schema_length=0, encoding="utf8-lossy")
    except Exception as exc:  # noqa: BLE001  (calamine / csv errors come in many types)
        raise KdcliError(f"not a readable clinical sheet ({_reason(exc, path)})", path=path,
                         hint="save it as .xlsx or .csv") from None
    header = [str(c).strip() for c in frame.columns]
    rows = [[None if v is None else str(v) for v in row] for row in frame.rows()]
    return header, rows


def _column(header: list[str], name: str, path: Path, what: str) -> int:
    folded = [_fold(h) for h in header]
    if _fold(name) not in folded:
        raise KdcliError(f"no {what} column {name!r}; columns are: {', '.join(header)}", path=path,
                         hint=f"pass --{what.replace(' ', '-')}-column with one of them")
    return folded.index(_fold(name))


def _header_at(header: list[str], name: str) -> int | None:
    """The column of `name` (compared without case and spaces), None when the sheet has none."""
    return next((i for i, h in enumerate(header) if _fold(h) == _fold(name)), None)


def sheet_key(slide_id: str) -> str:
    """The key a slide (its file stem) is matched on to its sheet row, as scan matches them."""
    return _key(slide_id) or slide_id


def _label(value: str | None, binary: bool) -> int | None:
    text = _key(value)
    if text is None:
        return None
    folded = [_fold(a) for a in ALN]
    if _fold(text) not in folded:
        return None
    index = folded.index(_fold(text))
    return min(index, 1) if binary else index


@dataclass
class _Row:
    number: int  # spreadsheet row number (header is row 1)
    label: int
    numeric: dict[str, float | None]
    categorical: dict[str, int | None]  # column -> index in its vocabulary


def _parse_row(number: int, cells: list[str | None], columns: dict[str, int], label_at: int, label_name: str,
               binary: bool, where: str) -> _Row:
    """The row's label (UNLABELED when its label cell is empty: nobody staged that axilla) and clinical values."""
    value = cells[label_at]
    label = UNLABELED if _key(value) is None else _label(value, binary)
    if label is None:
        raise KdcliError(f"{where}: {label_name} {value!r} is not one of {', '.join(ALN)}", hint=SHEET_HINT)
    return _Row(number, label, *_parse_clinical(cells, columns, where, CATEGORICAL))


def _parse_clinical(cells: list[str | None], columns: dict[str, int], where: str,
                    vocabularies: dict[str, list[str]]) -> tuple[dict[str, float | None], dict[str, int | None]]:
    """A row's clinical values: numbers (None when empty) and each category's index in its vocabulary."""
    numeric: dict[str, float | None] = {}
    categorical: dict[str, int | None] = {}
    for name, at in columns.items():
        if name in NUMERIC:
            number_value = _number(_key(cells[at]) if cells[at] is not None else None)
            if number_value is not None and math.isnan(number_value):
                raise KdcliError(f"{where}: {name} {cells[at]!r} is not a number", hint=SHEET_HINT)
            numeric[name] = number_value
        else:
            text = _key(cells[at])
            if text is None:
                categorical[name] = None
                continue
            vocabulary = [_fold(v) for v in vocabularies[name]]
            if _fold(text) not in vocabulary:
                raise KdcliError(f"{where}: {name} {cells[at]!r} is not one of {', '.join(vocabularies[name])}",
                                 hint=SHEET_HINT)
            categorical[name] = vocabulary.index(_fold(text))
    return numeric, categorical


def _rows_by_key(cells: list[list[str | None]], id_at: int, label_at: int | None, id_column: str,
                 label_column: str, sheet: Path) -> dict[str, tuple[int, list[str | None]]]:
    """Id key -> (spreadsheet row number, cells); an empty id on a non-empty row or an id twice is an error."""
    by_key: dict[str, tuple[int, list[str | None]]] = {}
    for offset, row in enumerate(cells):
        number = offset + 2
        key = _key(row[id_at])
        if key is None:
            if any(_key(v) is not None for v in row):
                raise KdcliError(f"row {number}: empty {id_column}", path=sheet,
                                 hint="give every row its slide id, or delete the row")
            continue
        if key in by_key:
            first, other = by_key[key]
            staged = [label_at is not None and _key(r[label_at]) is not None for r in (other, row)]
            if staged[0] != staged[1]:  # the same patient staged and not: labelled and unlabeled at once
                at = (first, number) if staged[0] else (number, first)
                raise KdcliError(f"patient {key} is both labelled (row {at[0]}) and unlabeled (row {at[1]}, no "
                                 f"{label_column})", path=sheet,
                                 hint="a patient is labelled or unlabeled, not both: delete one of the rows")
            raise KdcliError(f"rows {first} and {number} share {id_column} {key}", path=sheet,
                             hint="keep one row per patient")
        by_key[key] = (number, row)
    return by_key


def stratified_splits(labels: dict[str, int], ratios: tuple[float, float, float], seed: int) -> dict[str, str]:
    """Seeded patient-level split per class: largest-remainder shares; a class with 3+ patients puts at least one
    in every split with a non-zero ratio, so dev and test see every class on small sets."""
    by_label: dict[int, list[str]] = {}
    for group, label in labels.items():
        by_label.setdefault(label, []).append(group)
    assignment: dict[str, str] = {}
    for label, members in sorted(by_label.items()):
        members = sorted(members)
        count = len(members)
        exact = [r * count for r in ratios]
        counts = [int(math.floor(e)) for e in exact]
        for i in sorted(range(3), key=lambda i: (-(exact[i] - counts[i]), i))[: count - sum(counts)]:
            counts[i] += 1
        if count >= 3:
            for i in (1, 2):
                if ratios[i] > 0 and counts[i] == 0:
                    donor = max((0, 1, 2), key=lambda j: (counts[j], j == 0))
                    if counts[donor] > 1:
                        counts[donor] -= 1
                        counts[i] += 1
        if ratios[0] > 0 and counts[0] == 0 and count:
            donor = max((1, 2), key=lambda j: counts[j])
            counts[donor] -= 1
            counts[0] += 1
        order = np.random.default_rng(stable_seed("camelyon-split", seed, label)).permutation(count)
        names = ["train"] * counts[0] + ["dev"] * counts[1] + ["test"] * counts[2]
        for rank, index in enumerate(order):
            assignment[members[index]] = names[rank]
    return assignment


SPLITS_FILE = "splits.json"  # what `synth camelyon` writes when its split shapes the files
SPLIT_ID_COLUMNS = ("slide", "id", "case", "patient", "patient id")


def read_splits(path: Path) -> dict[str, str]:
    """Slide id (as _key compares ids) -> split, from JSON {"train": [ids], "dev": [...], "test": [...]} (val /
    validation = dev) or a CSV with a `split` column and a slide / id / case / patient column."""
    return read_split_file(path, "slide", SPLIT_ID_COLUMNS, key=lambda name: _key(name) or name)


def _encoding(rows: dict[str, _Row], splits: dict[str, str], columns: list[str],
              notes: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Feature names and the encoding: numeric stats from the train split only, categorical vocabularies."""
    features: list[str] = []
    numeric: dict[str, dict[str, float]] = {}
    categorical: dict[str, list[str]] = {}
    for name in columns:
        if name in NUMERIC:
            values = np.array([r.numeric[name] for g, r in rows.items()
                               if splits[g] == "train" and r.numeric[name] is not None], dtype=np.float64)
            mean = float(values.mean()) if values.size else 0.0
            std = float(values.std()) if values.size else 0.0
            if std < 1e-8:
                notes.append(f"clinical {name}: {'constant' if values.size else 'never observed'} in train; "
                             "stored centred, not scaled")
                std = 1.0
            numeric[name] = {"mean": mean, "std": std, "train_observed": int(values.size)}
            features.append(name)
        else:
            categorical[name] = list(CATEGORICAL[name])
            features.extend(f"{name}={value}" for value in CATEGORICAL[name])
    return features, {"numeric": numeric, "categorical": categorical, "order": list(columns),
                      "missing": "entries 0 and clinical_mask 0 (1 = observed)",
                      "stats_split": "train", "excluded": list(LEAKAGE)}


def _encode(row: _Row, encoding: dict[str, Any]) -> tuple[tuple[float, ...], tuple[int, ...]]:
    values: list[float] = []
    mask: list[int] = []
    for name in encoding["order"]:
        if name in encoding["numeric"]:
            value = row.numeric[name]
            stats = encoding["numeric"][name]
            values.append(0.0 if value is None else (value - stats["mean"]) / stats["std"])
            mask.append(0 if value is None else 1)
        else:
            width = len(encoding["categorical"][name])
            index = row.categorical[name]
            values.extend(0.0 if index is None else float(i == index) for i in range(width))
            mask.extend([0 if index is None else 1] * width)
    return tuple(values), tuple(mask)


class ClinicalSheet:
    """A clinical sheet read outside prepare (`kdcli predict --clinical`): a slide's row encoded with a prepared
    dataset's encoding (its extra.clinical, as a checkpoint's preprocessing record carries it: vocabularies and
    train statistics) by the functions scan uses, so the vector is the one prepare would store. The label column
    is not needed; every column the encoding reads is (an empty cell is a missing value, as in prepare)."""

    def __init__(self, path: Path, clinical: dict[str, Any]):
        self.path, self.encoding = Path(path), clinical["encoding"]
        self.id_column = str(clinical.get("id_column") or "Patient ID")
        if not self.path.is_file():
            raise KdcliError("clinical sheet not found", path=self.path, hint="pass --clinical with an .xlsx or .csv")
        header, cells = _read_sheet(self.path)
        id_at = _column(header, self.id_column, self.path, "id")
        self.columns: dict[str, int] = {}
        for name in self.encoding["order"]:
            at = _header_at(header, name)
            if at is None:
                raise KdcliError(f"no {name!r} column, which the model's clinical record reads; columns are: "
                                 f"{', '.join(header)}", path=self.path,
                                 hint="add the column (leave a cell empty where the value is unknown)")
            self.columns[name] = at
        label_column = str(clinical.get("label_column") or "ALN status")
        self.rows = _rows_by_key(cells, id_at, _header_at(header, label_column), self.id_column, label_column,
                                 self.path)

    def encode(self, slide_id: str) -> tuple[tuple[float, ...], tuple[int, ...]] | None:
        """(vector, mask) of the slide's row, None when the sheet has no row for it; KdcliError for a bad row."""
        key = sheet_key(slide_id)
        if key not in self.rows:
            return None
        number, cells = self.rows[key]
        where = f"{self.path} row {number} ({self.id_column} {key})"
        numeric, categorical = _parse_clinical(cells, self.columns, where, self.encoding["categorical"])
        return _encode(_Row(number, UNLABELED, numeric, categorical), self.encoding)


# ---------------------------------------------------------------- reading: tissue and patches


def tissue_mask(rgb: np.ndarray, threshold: int, patch_px: float) -> np.ndarray:
    """Tissue (bool) on a thumbnail: saturation > threshold after a median blur, closed, pieces smaller than a
    quarter patch (patch_px: a patch side in thumbnail pixels) dropped, holes smaller than a patch filled."""
    saturation = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)[..., 1]
    saturation = cv2.medianBlur(saturation, MEDIAN)
    binary = ((saturation > threshold) * 255).astype(np.uint8)
    binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, np.ones((CLOSE, CLOSE), np.uint8))
    contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    mask = np.zeros_like(binary)
    if hierarchy is None:
        return mask > 0
    min_piece, min_hole = 0.25 * patch_px * patch_px, patch_px * patch_px
    hierarchy = hierarchy[0]
    for index, contour in enumerate(contours):
        if hierarchy[index][3] == -1 and cv2.contourArea(contour) >= min_piece:
            cv2.drawContours(mask, contours, index, 255, cv2.FILLED)
    for index, contour in enumerate(contours):
        if hierarchy[index][3] != -1 and cv2.contourArea(contour) >= min_hole:
            parent = hierarchy[index][3]
            if cv2.contourArea(contours[parent]) >= min_piece:
                cv2.drawContours(mask, contours, index, 0, cv2.FILLED)
    return mask > 0


def read_outlines(path: str, slide: str = "") -> list[np.ndarray]:
    """Tumour polygons (float level-0 x, y) from an ASAP-style JSON file; KdcliError naming the file when bad."""
    where = f"slide {slide}: {path}" if slide else path
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise KdcliError(f"not a valid outline JSON ({_reason(exc, path)})", path=where,
                         hint='expected {"positive": [{"vertices": [[x, y], ...]}]}; fix or delete the file, '
                              "or pass --skip-bad") from None
    polygons = []
    entries = payload.get("positive", []) if isinstance(payload, dict) else None
    if not isinstance(entries, list):
        raise KdcliError('expected {"positive": [{"vertices": [[x, y], ...]}, ...]}', path=where,
                         hint="fix or delete the file, or pass --skip-bad")
    for number, entry in enumerate(entries):
        vertices = entry.get("vertices") if isinstance(entry, dict) else None
        try:
            array = np.asarray(vertices, dtype=np.float64)
        except (TypeError, ValueError):
            array = np.zeros((0,))
        if array.ndim != 2 or array.shape[1] != 2 or len(array) < 3 or not np.isfinite(array).all():
            raise KdcliError(f"outline {number}: vertices must be 3+ [x, y] number pairs", path=where,
                             hint="fix or delete the file, or pass --skip-bad")
        polygons.append(array)
    return polygons


class _Slide:
    """One slide behind a small interface: OpenSlide pyramid or a level-0 jpg held in memory."""

    def __init__(self, slide_id: str, path: str, native_option: float | None):
        self.id, self.path = slide_id, path
        self.jpeg = Path(path).suffix.lower() in JPEG_SUFFIXES
        if self.jpeg:
            image = cv2.imread(path, cv2.IMREAD_COLOR)
            if image is None:
                raise _slide_error(slide_id, f"{path}: OpenCV cannot decode the JPEG (damaged or truncated?)")
            self.image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB, dst=image)  # in place: a BCNB jpg can be large
            self.dimensions = (int(image.shape[1]), int(image.shape[0]))
            self.downsamples = [1.0]
            self.native = native_option
            return
        openslide = openslide_module()
        try:
            self.slide = openslide.OpenSlide(path)
        except Exception as exc:  # noqa: BLE001  (OpenSlideUnsupportedFormatError, OpenSlideError, OSError)
            raise _slide_error(slide_id, f"{path}: not readable by OpenSlide ({_reason(exc, path)})") from None
        self.dimensions = tuple(int(v) for v in self.slide.dimensions)
        self.downsamples = [float(d) for d in self.slide.level_downsamples]
        properties = self.slide.properties
        native = None
        try:
            native = float(properties.get("openslide.objective-power") or "nan")
        except ValueError:
            pass
        if native is None or not math.isfinite(native) or native <= 0:
            try:
                mpp = float(properties.get("openslide.mpp-x") or "nan")
                native = 10.0 / mpp if math.isfinite(mpp) and mpp > 0 else None
            except ValueError:
                native = None
        self.native = native if native else native_option

    def close(self) -> None:
        if not self.jpeg:
            self.slide.close()

    def level_below(self, downsample: float) -> int:
        """The level whose downsample is the largest not above `downsample` (level 0 when all are)."""
        fits = [i for i, d in enumerate(self.downsamples) if d <= downsample * (1 + 1e-3)]
        return max(fits, key=lambda i: self.downsamples[i]) if fits else 0

    def region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3) at `level`, top-left (x, y) in level-0 pixels; transparent -> white."""
        if self.jpeg:
            out = np.full((height, width, 3), 255, np.uint8)
            crop = self.image[y : y + height, x : x + width]
            out[: crop.shape[0], : crop.shape[1]] = crop
            return out
        try:
            rgba = np.asarray(self.slide.read_region((x, y), level, (width, height)))
        except Exception as exc:  # noqa: BLE001
            raise _slide_error(self.id, f"{self.path}: pixel data unreadable at level {level} "
                                        f"({_reason(exc, self.path)})",
                               hint="re-download the slide, or pass --skip-bad") from None
        rgb = rgba[..., :3].copy()
        rgb[rgba[..., 3] == 0] = 255
        return rgb

    def thumbnail(self, downsample: float) -> tuple[np.ndarray, int]:
        """The slide at about `downsample` (its size is round(dimension / downsample)), and the level read."""
        width, height = self.dimensions
        size = (max(1, round(width / downsample)), max(1, round(height / downsample)))
        if self.jpeg:
            return cv2.resize(self.image, size, interpolation=cv2.INTER_AREA), 0
        # At least twice finer than the mask: a pyramid's coarsest JPEG levels smear chroma (4:2:0) a pixel or
        # two around the tissue, which saturation reads as tissue. A coarser level when that one is too big.
        level = self.level_below(downsample / 2)
        while level + 1 < len(self.downsamples) and self.downsamples[level + 1] <= downsample * (1 + 1e-3) and \
                math.prod(self.slide.level_dimensions[level]) > THUMB_MAX_READ:
            level += 1
        scale = self.downsamples[level]
        level_w, level_h = self.slide.level_dimensions[level]
        sx, sy = size[0] / level_w, size[1] / level_h
        thumb = np.full((size[1], size[0], 3), 255, np.uint8)
        for by in range(0, level_h, BLOCK):
            for bx in range(0, level_w, BLOCK):
                bw, bh = min(BLOCK, level_w - bx), min(BLOCK, level_h - by)
                x0, x1 = round(bx * sx), round((bx + bw) * sx)
                y0, y1 = round(by * sy), round((by + bh) * sy)
                if x1 <= x0 or y1 <= y0:
                    continue
                block = self.region(round(bx * scale), round(by * scale), level, bw, bh)
                thumb[y0:y1, x0:x1] = cv2.resize(block, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
        return thumb, level


def _resize(image: np.ndarray, side: int) -> np.ndarray:
    if image.shape[0] == side and image.shape[1] == side:
        return image
    shrink = image.shape[0] > side
    return cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def spread_sample(count: int, limit: int, seed: int) -> list[int]:
    """Indices 0..count-1, all when count <= limit (or limit <= 0), else one seeded pick per equal run."""
    if limit <= 0 or count <= limit:
        return list(range(count))
    rng = np.random.default_rng(seed)
    edges = [int(e) for e in np.linspace(0, count, limit + 1)]  # count > limit: every run holds 1+ candidates
    return [edges[i] + int(rng.integers(0, edges[i + 1] - edges[i])) for i in range(limit)]


# ---------------------------------------------------------------- the source


@dataclass
class CamelyonOptions:
    """Slides + clinical sheet -> tissue patches at a magnification (with level-0 coordinates) and the encoded
    clinical record per slide (missing values kept as missing); rows without an ALN status are unlabeled
    training slides (for distillation terms)."""

    clinical: Path | None = field(default=None, metadata={
        "help": "Clinical sheet (.xlsx/.csv; default raw/clinical.xlsx)."})
    mag: float = field(default=20.0, metadata={"help": "Magnification of the patches (objective power)."})
    patch_size: int = field(default=256, metadata={"help": "Patch side in pixels at --mag (then resized to --size)."})
    max_patches: int = field(default=64, metadata={
        "help": "Patches kept per slide, spread over the tissue (0: all)."})
    id_column: str = field(default="Patient ID", metadata={"help": "Sheet column holding the slide/patient id."})
    label_column: str = field(default="ALN status", metadata={"help": "Sheet column holding the ALN status."})
    binary: bool = field(default=True, metadata={"help": "N0 vs N+ (else N0 / N+(1-2) / N+(>2))."})
    native_mag: float | None = field(default=None, metadata={
        "help": "Magnification of JPEG slides, or of slides that record neither objective power nor mpp."})
    tissue_threshold: int = field(default=8, metadata={
        "help": "Saturation threshold of the tissue mask (CLAM's)."})
    min_tissue: float = field(default=0.5, metadata={"help": "Tissue fraction a patch needs."})
    annotated_only: bool = field(default=False, metadata={"help": "Only patches inside the tumour outlines."})
    ratios: str = field(default="0.6,0.2,0.2", metadata={"help": "train,dev,test fractions (stratified by label)."})
    seed: int = field(default=0, metadata={
        "flag": "--split-seed", "help": "Seed of the split and the patch choice."})
    splits: Path | None = field(default=None, metadata={
        "help": "Splits file: JSON {train: [ids], dev: [...], test: [...]} or CSV slide,split (e.g. synth "
                "camelyon's splits.json)."})
    thumbnails: bool = field(default=True, metadata={
        "help": "A tissue-mask/patch thumbnail PNG per slide in <out>/thumbnails/."})
    skip_bad: bool = field(default=False, metadata={
        "help": "Skip bad slides/rows with a report instead of stopping."})


class CamelyonSource(Source):
    """Options: clinical (sheet path), id_column, label_column, binary, mag, native_mag, patch_size, max_patches,
    tissue_threshold, min_tissue, annotated_only, ratios, seed, splits (JSON or CSV file), skip_bad, thumbnails
    (folder for check PNGs)."""

    name = "camelyon"
    records_per_shard = 2  # a slide is up to max_patches samples
    Options = CamelyonOptions
    raw_help = "Folder of slides (OpenSlide formats, or BCNB WSIs/*.jpg + .json)."

    # the seed picks a slide's patches, so it belongs with the pixel options
    pixel_options = ("mag", "native_mag", "patch_size", "max_patches", "tissue_threshold", "min_tissue", "seed",
                     "annotated_only")

    @classmethod
    def record_extras(cls, dataset: Any) -> dict[str, Any]:
        clinical = dataset.extra.get("clinical") or {}
        extras: dict[str, Any] = {"clinical_features": list(clinical.get("features") or [])}
        if clinical.get("encoding"):  # how a sheet row becomes the vector: `predict --clinical` encodes as prepare
            extras["clinical"] = {key: clinical.get(key) for key in ("features", "encoding", "id_column",
                                                                     "label_column")}
        return extras

    @classmethod
    def preprocessing_steps(cls, record: dict, meta: dict) -> list[str]:
        options, size = record.get("options") or {}, int(record["size"])
        return [f"tissue mask on a thumbnail (HSV saturation > {options.get('tissue_threshold', 8)}, CLAM's "
                "median/close/area filters)",
                f"grid of {options.get('patch_size', 256)} px patches at {options.get('mag', 20.0)}x on level 0, kept "
                f"with tissue fraction >= {options.get('min_tissue', 0.5)}",
                f"at most {options.get('max_patches', 64)} patches as kdcli's seeded spread sample (seed "
                f"{options.get('seed', 0)}, the slide id)",
                f"each patch resized to {options.get('patch_size', 256)} px, then to {size}x{size} (RGB uint8)"]

    @classmethod
    def command_options(cls, options: dict[str, Any], out: Path) -> dict[str, Any]:
        """--thumbnails is a flag; the source takes the folder, written in the staging folder and moved with it."""
        options = dict(options)
        if options.pop("thumbnails"):
            options["thumbnails"] = str(Path(str(out) + ".partial") / "thumbnails")
        return options

    def __init__(self, **options: Any):
        super().__init__(**options)

        def get(key: str, default: Any) -> Any:
            value = options.get(key)
            return default if value is None else value

        try:
            self.binary = bool(get("binary", True))
            self.mag = float(get("mag", 20.0))
            self.native_mag = float(options["native_mag"]) if options.get("native_mag") is not None else None
            self.patch_size = int(get("patch_size", 256))
            self.max_patches = int(get("max_patches", 64))
            self.tissue_threshold = int(get("tissue_threshold", 8))
            self.min_tissue = float(get("min_tissue", 0.5))
            self.seed = int(get("seed", 0))
        except (TypeError, ValueError) as exc:
            raise KdcliError(f"camelyon options: {exc}", hint="mag, native_mag, min_tissue are numbers; "
                                                               "patch_size, max_patches, tissue_threshold, seed "
                                                               "integers") from None
        if self.mag <= 0 or (self.native_mag is not None and self.native_mag <= 0):
            raise KdcliError(f"--mag {self.mag}: magnifications must be positive")
        if self.patch_size < 8:
            raise KdcliError(f"--patch-size {self.patch_size}: expected at least 8 pixels")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise KdcliError(f"--min-tissue {self.min_tissue}: expected a fraction between 0 and 1")
        if not 0 <= self.tissue_threshold <= 255:
            raise KdcliError(f"--tissue-threshold {self.tissue_threshold}: expected 0..255 (a saturation)")
        self.annotated_only = bool(get("annotated_only", False))
        self.skip_bad = bool(get("skip_bad", False))
        self.id_column = str(get("id_column", "Patient ID"))
        self.label_column = str(get("label_column", "ALN status"))
        self.ratios = parse_ratios(get("ratios", "0.6,0.2,0.2"), "0.6,0.2,0.2")
        self.thumbnails = options.get("thumbnails") or None

    # ------------------------------------------------------------ scan

    def scan(self, raw: Path) -> Scan:
        raw = Path(raw)
        if not raw.is_dir():
            raise KdcliError("raw folder not found", path=raw, hint="point RAW at the BCNB / slide download")
        notes: list[str] = []
        found, jsons = _find_files(raw)
        if not found:
            raise KdcliError("no slides found", path=raw,
                             hint=f"expected {', '.join(OPENSLIDE_SUFFIXES + JPEG_SUFFIXES)} files (any depth)")
        if any(path.suffix.lower() not in JPEG_SUFFIXES for path in found.values()):
            openslide_module()  # before any slide: --skip-bad must not leave every slide out for a missing package
        slides: dict[str, Path] = {}
        bad: set[str] = set()
        for slide_id, path in found.items():
            try:
                _check_header(slide_id, path)
            except KdcliError as exc:
                skip_or_raise(exc, self.skip_bad, notes)
                bad.add(slide_id)
                continue
            slides[slide_id] = path

        sheet = _find_sheet(raw, self.options.get("clinical"))
        header, cells = _read_sheet(sheet)
        id_at = _column(header, self.id_column, sheet, "id")
        label_at = _column(header, self.label_column, sheet, "label")
        excluded = {_fold(n) for n in (*LEAKAGE, self.id_column, self.label_column)}
        columns: dict[str, int] = {}
        for name in (*NUMERIC, *CATEGORICAL):
            at = _header_at(header, name)
            if at is not None and _fold(name) not in excluded:
                columns[name] = at
        absent = [n for n in (*NUMERIC, *CATEGORICAL) if n not in columns and _fold(n) not in excluded]
        if absent:
            notes.append(f"clinical sheet {sheet.name} has no {', '.join(absent)} column(s); left out of the vector")
        if not columns:
            raise KdcliError(f"no clinical feature column among {', '.join(header)}", path=sheet,
                             hint=f"expected BCNB's columns ({', '.join((*NUMERIC, *CATEGORICAL))})")

        by_key = _rows_by_key(cells, id_at, label_at, self.id_column, self.label_column, sheet)

        slide_keys: dict[str, str] = {}
        for slide_id in slides:  # "7.jpg" and "007.jpg" are one patient: one would be dropped silently
            key = sheet_key(slide_id)
            if key in slide_keys:
                raise KdcliError(f"slides {slides[slide_keys[key]]} and {slides[slide_id]} are one patient "
                                 f"({self.id_column} {key})", path=raw,
                                 hint="keep one slide per patient (BCNB has one biopsy slide each)")
            slide_keys[key] = slide_id
        bad_keys = {(_key(s) or s) for s in bad}
        no_row = sorted(s for k, s in slide_keys.items() if k not in by_key)
        no_slide = sorted((k for k in by_key if k not in slide_keys and k not in bad_keys), key=_natural)
        for missing, what, hint in ((no_row, f"slide(s) without a row in {sheet.name}",
                                     f"add their rows (matched on {self.id_column!r}), or pass --skip-bad"),
                                    (no_slide, f"{sheet.name} row(s) without a slide in RAW",
                                     "restore the slides or delete the rows, or pass --skip-bad")):
            if missing:
                listed = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
                if not self.skip_bad:
                    raise KdcliError(f"{len(missing)} {what}: {listed}", path=raw if what.startswith("slide") else
                                     sheet, hint=hint)
                notes.append(f"skipped {len(missing)} {what}: {listed}")

        parsed: dict[str, _Row] = {}
        for key, slide_id in sorted(slide_keys.items()):
            if key not in by_key:
                continue
            number, row = by_key[key]
            where = f"{sheet.name} row {number} ({self.id_column} {key})"
            try:
                parsed[slide_id] = _parse_row(number, row, columns, label_at, self.label_column, self.binary, where)
            except KdcliError as exc:
                if not self.skip_bad:
                    raise
                notes.append(f"skipped slide {slide_id}: {exc.problem}")
        if not parsed:
            raise KdcliError("no slide is left with a usable clinical row; nothing to prepare", path=raw,
                             hint="see the notes for why")

        labelled = {s: r for s, r in parsed.items() if r.label != UNLABELED}
        unlabeled = sorted(s for s, r in parsed.items() if r.label == UNLABELED)
        if not labelled:
            raise KdcliError(f"no slide has a {self.label_column}: nothing to learn from", path=sheet,
                             hint=f"fill the {self.label_column} column (rows without it are unlabeled slides)")
        if unlabeled:
            notes.append(f"unlabeled: {len(unlabeled)} slide(s) whose {self.label_column} is empty (train only, "
                         "for distillation terms; first: " + ", ".join(unlabeled[:3]) + ")")
        splits = self._splits(raw, labelled, unlabeled, set(slide_keys) | bad_keys, notes)
        # statistics from the labelled train slides alone: adding unlabeled ones changes no labelled record
        features, encoding = _encoding(labelled, splits, list(columns), notes)
        records = []
        for slide_id, row in sorted(parsed.items()):
            vector, mask = _encode(row, encoding)
            path = slides[slide_id]
            records.append(SlideRecord(
                id=slide_id, group=slide_id, split=splits.get(slide_id, "train"), label=row.label,
                files={"wsi": str(path)},
                clinical=vector, clinical_mask=mask, outline=_outline_for(path, jsons.get(path.stem, []))))
        dim = len(features)
        classes = list(CLASSES[self.binary])
        return Scan(
            records=records,
            classes=classes,
            modalities={"wsi": 3},
            pairing="paired",
            task="mil",
            arrays={
                "wsi": {"channels": 3, "dtype": "uint8", "role": "input"},
                "clinical": {"shape": [dim], "dtype": "float16", "role": "input"},
                "clinical_mask": {"shape": [dim], "dtype": "uint8", "role": "input"},
                "coords": {"shape": [2], "dtype": "int32", "role": "target"},
            },
            extra={
                "clinical": {"features": features, "encoding": encoding, "sheet": str(sheet),
                             "id_column": self.id_column, "label_column": self.label_column},
                "mag": self.mag,
                "patch_size": self.patch_size,
                "labels": {"column": self.label_column, "binary": self.binary,
                           "mapping": {a: classes[min(i, 1) if self.binary else i] for i, a in enumerate(ALN)}},
            },
            notes=notes,
        )

    def _splits(self, raw: Path, labelled: dict[str, _Row], unlabeled: list[str], on_disk: set[str],
                notes: list[str]) -> dict[str, str]:
        """Slide -> split of the labelled slides (seeded and stratified, or from --splits) and of the unlabeled
        ones (train; a splits file may list them, in train only). Unlabeled slides take no part in the seeded
        split, so adding them changes no labelled slide's split."""
        if not self.options.get("splits"):
            if (raw / SPLITS_FILE).is_file():
                notes.append(f"RAW holds {SPLITS_FILE} (a `synth camelyon` split: its noisy labels and extra test "
                             f"slides depend on it) but --splits was not given: slides split by --ratios; pass "
                             f"--splits {raw / SPLITS_FILE} to use it")
            splits = stratified_splits({s: r.label for s, r in labelled.items()}, self.ratios, self.seed)
            return {**splits, **dict.fromkeys(unlabeled, "train")}
        path = Path(self.options["splits"])
        listed = read_splits(path)
        key_of = {(_key(s) or s): s for s in (*labelled, *unlabeled)}
        absent = sorted((k for k in listed if k not in key_of and k not in on_disk), key=_natural)  # skipped: kept
        if absent:
            raise KdcliError(f"{len(absent)} listed slide(s) not found in RAW and the sheet: {', '.join(absent[:5])}"
                             f"{' ...' if len(absent) > 5 else ''}", path=path,
                             hint="fix the slide ids (file stems) or restore the slides and their rows")
        unlisted = sorted((s for k, s in key_of.items() if s in labelled and k not in listed), key=_natural)
        if unlisted:
            raise KdcliError(f"{len(unlisted)} labelled slide(s) are not listed: {', '.join(unlisted[:5])}"
                             f"{' ...' if len(unlisted) > 5 else ''}", path=path,
                             hint="give every labelled slide a split (train, dev or test)")
        held = sorted((s for k, s in key_of.items() if s in unlabeled and listed.get(k, "train") != "train"),
                      key=_natural)
        if held:
            slide = held[0]
            raise KdcliError(f"slide {slide} has no {self.label_column} (unlabeled) but is listed in "
                             f"{listed[_key(slide) or slide]}" + (f", and {len(held) - 1} more" if len(held) > 1
                                                                    else ""), path=path,
                             hint="unlabeled slides can only train: list them under train, or not at all")
        empty = [split for split in ("train", "dev", "test") if split not in set(listed.values())]
        if empty:
            notes.append(f"splits file {path.name} puts no slide in {', '.join(empty)}")
        return {s: listed.get(k, "train") for k, s in key_of.items()}

    # ------------------------------------------------------------ read

    def read(self, record: Record, size: int) -> tuple[dict[str, Any], Iterator[Sample]]:
        return read_or_skip(lambda: self._read(record, size), self.skip_bad)

    def _read(self, record: Record, size: int) -> tuple[dict[str, Any], Iterator[Sample]]:
        if not isinstance(record, SlideRecord):
            raise KdcliError(f"record {record.id} carries no clinical vector",
                             hint="camelyon records come from CamelyonSource.scan (a SlideRecord)")
        slide_id = record.id
        outlines = read_outlines(record.outline, slide_id) if record.outline else []
        slide = _Slide(slide_id, record.files["wsi"], self.native_mag if self.native_mag else
                       (self.mag if Path(record.files["wsi"]).suffix.lower() in JPEG_SUFFIXES else None))
        try:
            return self._patches(record, slide, outlines, size)
        except BaseException:
            slide.close()
            raise

    def _patches(self, record: SlideRecord, slide: _Slide, outlines: list[np.ndarray],
                 size: int) -> tuple[dict[str, Any], Iterator[Sample]]:
        slide_id = record.id
        if not slide.native:
            raise _slide_error(slide_id, "no objective power or mpp in the slide's metadata",
                               hint="pass --native-mag with the scan magnification, or --skip-bad")
        factor = slide.native / self.mag  # level-0 pixels per target pixel
        if factor < 1 - 1e-6:
            raise _slide_error(slide_id, f"target magnification {self.mag:g}x is above the slide's native "
                                         f"{slide.native:g}x", hint="lower --mag")
        patch0 = max(1, round(self.patch_size * factor))
        level = slide.level_below(factor)
        downsample = slide.downsamples[level]
        read_side = max(1, round(patch0 / downsample))
        width, height = slide.dimensions
        thumb_ds = max(1.0, min(THUMB_MAX_DOWNSAMPLE, patch0 / MASK_PX_PER_PATCH))
        thumb, thumb_level = slide.thumbnail(thumb_ds)
        th, tw = thumb.shape[:2]
        sx, sy = tw / width, th / height  # level-0 -> thumbnail
        mask = tissue_mask(thumb, self.tissue_threshold, patch0 * min(sx, sy))
        if not mask.any():
            raise _slide_error(slide_id, f"no tissue found (saturation <= {self.tissue_threshold} everywhere on the "
                                         "thumbnail: blank or white slide?)",
                               hint="lower --tissue-threshold, or remove the slide or pass --skip-bad")
        integral = cv2.integral(mask.astype(np.uint8), sdepth=cv2.CV_64F)
        tumour = None
        if outlines:
            tumour = [polygon.astype(np.float32).reshape(-1, 1, 2) for polygon in outlines]
        candidates: list[tuple[int, int]] = []
        tissue_count = 0
        for y in range(0, height - patch0 + 1, patch0):
            y0, y1 = int(math.floor(y * sy)), max(int(math.floor(y * sy)) + 1, int(math.ceil((y + patch0) * sy)))
            for x in range(0, width - patch0 + 1, patch0):
                x0, x1 = int(math.floor(x * sx)), max(int(math.floor(x * sx)) + 1,
                                                       int(math.ceil((x + patch0) * sx)))
                y1c, x1c = min(y1, th), min(x1, tw)
                area = (y1c - y0) * (x1c - x0)
                if area <= 0:
                    continue
                inside = integral[y1c, x1c] - integral[y0, x1c] - integral[y1c, x0] + integral[y0, x0]
                if inside / area < self.min_tissue or inside == 0:
                    continue
                tissue_count += 1
                if self.annotated_only and tumour is not None:
                    centre = (x + patch0 / 2, y + patch0 / 2)
                    if not any(cv2.pointPolygonTest(p, centre, False) >= 0 for p in tumour):
                        continue
                candidates.append((x, y))
        if not candidates:
            what = ("inside the tumour outlines" if self.annotated_only and tumour is not None and tissue_count
                    else f"with >= {self.min_tissue:g} tissue")
            raise _slide_error(slide_id, f"no tissue found: no {self.patch_size}px patch at {self.mag:g}x {what}",
                               hint="lower --min-tissue or --mag, or remove the slide or pass --skip-bad")
        chosen = [candidates[i] for i in spread_sample(len(candidates), self.max_patches,
                                                       stable_seed("camelyon-patches", self.seed, slide_id))]
        info = {
            "dimensions": [int(width), int(height)],
            "level": int(level),
            "downsample": float(downsample),
            "mag": float(self.mag),
            "native_mag": float(slide.native),
            "patch_level0": int(patch0),
            "patches": len(chosen),
            "tissue_patches": int(tissue_count),
            "candidates": len(candidates),
            "thumbnail_downsample": float(width / tw),
            "thumbnail_level": int(thumb_level),
            "tissue_fraction": float(mask.mean()),
            "outlines": len(outlines),
            "annotated_only": bool(self.annotated_only and tumour is not None),
        }
        if self.thumbnails:
            self._write_thumbnail(slide_id, thumb, mask, outlines, chosen, patch0, sx, sy)
        clinical = np.asarray(record.clinical, dtype=np.float16)
        clinical_mask = np.asarray(record.clinical_mask, dtype=np.uint8)

        def samples() -> Iterator[Sample]:
            try:
                for k, (x, y) in enumerate(chosen):
                    patch = slide.region(x, y, level, read_side, read_side)
                    patch = _resize(_resize(patch, self.patch_size), size)
                    yield Sample(f"{slide_id}:{k:04d}", record.label,
                                 {"wsi": np.ascontiguousarray(patch, dtype=np.uint8), "clinical": clinical.copy(),
                                  "clinical_mask": clinical_mask.copy(),
                                  "coords": np.array([x, y], dtype=np.int32)}, position=k)
            finally:
                slide.close()

        return info, samples()

    def _write_thumbnail(self, slide_id: str, thumb: np.ndarray, mask: np.ndarray, outlines: list[np.ndarray],
                         chosen: list[tuple[int, int]], patch0: int, sx: float, sy: float) -> None:
        """The thumbnail with non-tissue dimmed, tumour outlines in blue and the kept patches in green."""
        scale = max(1, math.ceil(256 / max(thumb.shape[:2])))  # tiny thumbnails upscaled so boxes stay visible
        view = thumb.astype(np.float32)
        view[~mask] = view[~mask] * 0.45
        view = np.clip(view, 0, 255).astype(np.uint8)
        if scale > 1:
            view = cv2.resize(view, (view.shape[1] * scale, view.shape[0] * scale), interpolation=cv2.INTER_NEAREST)
        view = np.ascontiguousarray(view)
        for polygon in outlines:
            points = np.round(polygon * [sx * scale, sy * scale]).astype(np.int32).reshape(-1, 1, 2)
            cv2.polylines(view, [points], True, (40, 80, 255), 1)
        for x, y in chosen:
            cv2.rectangle(view, (round(x * sx * scale), round(y * sy * scale)),
                          (round((x + patch0) * sx * scale) - 1, round((y + patch0) * sy * scale) - 1),
                          (0, 200, 0), 1)
        _atomic_png(Path(self.thumbnails) / f"{slide_id}.png", view)


def _natural(text: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))
