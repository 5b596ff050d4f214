"""Chest X-rays with global multi-labels, plus eye gaze and disease boxes on a subset (van Sonsbeek et al. 2023).

Raw layouts (detected from the files at RAW's root):
    ChestX-ray14  Data_Entry_2017*.csv, train_val_list.txt, test_list.txt, images_*/images/<Image Index>
    MIMIC-CXR     mimic-cxr-2.0.0-{split,chexpert,metadata}.csv[.gz], files/pXX/pSUBJECT/sSTUDY/<dicom_id>.jpg
Any image may also be a DICOM with the same stem (`.dcm`) while the CSVs keep the `.png`/`.jpg` name.

Options: gaze (folder of EGD-CXR or REFLACX, auto-detected), boxes (ChestX-ray14's BBox_List_2017.csv),
uncertain ("ones" | "zeros" | "ignore": MIMIC's -1; blank is always negative, the usual CheXpert practice),
egd_sigma (EGD's Gaussian sigma in original-image pixels, official 150), dev_fraction (ChestX-ray14: patients
carved from train_val_list into dev; MIMIC uses its official `validate`), seed, skip_bad, labels (comma list that
restricts the label set; default the dataset's official 14).

Quirks handled: Data_Entry's bracketed header (`OriginalImage[Width,Height]` spans two fields, a trailing comma;
`Patient Sex` in some copies), BBox_List's malformed header (read by position as x, y, w, h) and its "Infiltrate"
spelling (-> "Infiltration"), 8/16-bit PNGs (16-bit scaled by the image's own range), DICOM (pydicom's modality
LUT: rescale slope and intercept or a Modality LUT Sequence; then its VOI transform: the VOI LUT Sequence or the
window, else min-max; MONOCHROME1 inverted so bone is bright), gzipped MIMIC CSVs,
REFLACX readings whose eye tracking was discarded (dropped), gaze points off the image (dropped, counted).

Stored arrays per image: xray (size, size, 1) uint8; labels (L,) uint8 0/1, 255 = ignore (uncertain, policy
"ignore"); gaze (size, size, 1) heatmap scaled to max 255 (zeros without gaze); boxes (size, size, 1) 255 inside
any box; annotated [has_gaze, has_boxes]. Heatmaps and box masks share the image's geometry (pad to square,
resize), so they stay aligned with it.

Unlabeled images (kdcli's extension, for distillation on images nobody graded): ChestX-ray14 rows of Data_Entry
whose Finding Labels field is blank (Data_Entry is the metadata and the label file at once; the real release
writes "No Finding" for normals, never a blank), MIMIC-CXR images of the split CSV whose study has no chexpert
row or one with every finding blank. They become records of label -1 without a `labels` array (in shards of
their own; views read their label vector as all 255), in the train split only: an unlabeled image in
test_list.txt or in MIMIC's validate/test split, one of a patient with dev or test images, a name listed both
labelled and unlabeled, a study with a blank and a labelled row, or a box on an unlabeled image is refused in
one line (skip_bad leaves such images out, where that is meaningful). ChestX-ray14's dev carve keeps patients
with unlabeled images in train. Their gaze is read as any other's; the annotated fraction counts labelled images.

Gaze heatmaps follow the official recipes at the original image's resolution:
    EGD-CXR   counts at (X_ORIGINAL, Y_ORIGINAL), which are already original-image pixels (the master sheet's pads
              are screen letterboxing, not applied again), then scipy gaussian_filter(sigma=egd_sigma px).
    REFLACX   per fixation a 2-D Gaussian at (x_position, y_position), sigma = angular_resolution_{x,y} px (one
              degree of visual angle), weighted by its duration, clipped to the region shown on screen, summed and
              normalised to sum 1; an image read several times averages its readings.
For images larger than 4x the stored size the recipe runs on a grid 4x the stored size (points binned to it,
sigma scaled with it): the same map up to a quarter of a stored pixel, without blurring 3000^2 images at
sigma 150.

How annotations reach the workers: records are `CxrRecord`s, a Record with one more field, `targets`, a compact
JSON string made at scan time holding the label vector, the image's gaze fixations and boxes. It travels with
the record to the worker processes, so `load` never re-reads the gaze CSVs, nothing is written next to RAW, and
`files` holds only {"xray": path} (the manifest's modality stays "xray").
"""

from __future__ import annotations

import csv
import functools
import json
import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import ModuleType
from typing import Any

import cv2
import numpy as np

from kdcli.errors import KdcliError
from kdcli.extras import require
from kdcli.shards.quality import warn
from kdcli.sources._skip import read_or_skip
from kdcli.sources.base import UNLABELED, Record, Sample, Scan, Source
from kdcli.sources.imaging import resize_square, resize_square_step
from kdcli.sources.text import decoding, open_text, read_text

cv2.setNumThreads(1)  # parallelism comes from prepare's worker processes, not from OpenCV threads

NIH_LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis", "Hernia",
              "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax"]
CHEXPERT_LABELS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                   "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                   "Fracture", "Support Devices"]
ALIASES = {"Infiltrate": "Infiltration"}  # BBox_List_2017.csv's spelling
NIH_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID"]
MIMIC_FILES = ("split", "chexpert", "metadata")
POLICIES = ("ones", "zeros", "ignore")
IGNORE = 255
GRID = 4  # heatmaps are computed on at most GRID x the stored size
SKIP_HINT = "fix the file, or pass skip_bad to leave such rows out"


@dataclass(frozen=True)
class CxrRecord(Record):
    """A Record plus `targets`: JSON {"labels": [...], "gaze": {...} | absent, "boxes": [[x, y, w, h]] | absent,
    "dims": [h, w] | absent} made at scan time; it is pickled to the workers with the record."""

    targets: str = ""


# ---------------------------------------------------------------- small readers


def _open_text(path: Path):
    return open_text(path)


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) for every non-empty row, header included."""
    with _open_text(path) as handle, decoding(path):
        reader = csv.reader(handle)
        for row in reader:
            if any(cell.strip() for cell in row):
                yield reader.line_num, row


def _csv_dicts(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    with _open_text(path) as handle, decoding(path):
        reader = csv.DictReader(handle)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise KdcliError(f"missing column(s) {', '.join(missing)} (header: {','.join(reader.fieldnames or [])})",
                             path=path, hint="point the option at the original, unedited file")
        for row in reader:
            yield reader.line_num, row


def _find(root: Path, stem: str) -> Path | None:
    for suffix in ("", ".gz"):
        if (root / f"{stem}{suffix}").is_file():
            return root / f"{stem}{suffix}"
    return None


def _float(text: str, path: Path, line: int, column: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        raise KdcliError(f"line {line}: {column} {text!r} is not a number", path=path, hint=SKIP_HINT) from None


def _truthy(text: str) -> bool:
    return str(text).strip().lower() in ("true", "1", "1.0", "yes")


# ---------------------------------------------------------------- images


def pydicom_module() -> ModuleType:
    """pydicom, the [cxr] extra (3.0 or later: pydicom.pixels); PNG and JPEG X-rays need nothing more."""
    require("pydicom.pixels", "cxr", "reading DICOM X-rays")
    import pydicom

    return pydicom


def image_dims(path: str | Path) -> tuple[int, int]:
    """(height, width) from the file's header: pydicom for DICOM, PIL's lazy open (it reads the header only) for
    PNG, JPEG and the rest; a file PIL cannot identify is decoded, which names it in one line when it is broken."""
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        pydicom = pydicom_module()
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            return int(ds.Rows), int(ds.Columns)
        except Exception as exc:
            raise KdcliError(f"unreadable DICOM ({type(exc).__name__})", path=path,
                             hint="re-download it, or pass skip_bad to leave it out") from None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError):  # cv2 has no pixel cap
        return read_xray(path).shape[:2]
    return int(height), int(width)


def _voi(values: np.ndarray, ds: Any) -> tuple[np.ndarray, float, float] | None:
    """The file's VOI transform by pydicom and the range it maps into, or None when the file has none.

    A VOI LUT Sequence wins over a window (the standard's order, pydicom's `apply_voi_lut` default); its output
    spans the LUT descriptor's bits. A window (LINEAR, LINEAR_EXACT or SIGMOID) maps everything below it to its
    floor and above it to its ceiling, so pydicom's own window at -inf and +inf gives the range it maps into."""
    from pydicom.pixels import apply_voi, apply_windowing  # pydicom_module() has imported pydicom

    lut = ds.get("VOILUTSequence")
    if lut and lut[0].get("LUTDescriptor") is not None and lut[0].get("LUTData") is not None:
        bits = int(lut[0].LUTDescriptor[2])
        return apply_voi(np.round(values).astype(np.int64), ds), 0.0, float(2**bits - 1)  # a LUT indexes integers
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        floor, ceiling = apply_windowing(np.array([-np.inf, np.inf]), ds)
        return apply_windowing(values, ds), float(floor), float(ceiling)
    return None


def _dicom(path: Path) -> np.ndarray:
    """One grey uint8 image: pydicom's modality LUT (rescale or Modality LUT Sequence), then its VOI transform
    (VOI LUT Sequence or window) scaled to 0..255, else the image's own min..max; MONOCHROME1 inverted."""
    pydicom = pydicom_module()
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except Exception as exc:
        raise KdcliError(f"unreadable DICOM ({type(exc).__name__})", path=path,
                         hint="re-download it, or pass skip_bad to leave it out") from None
    if pixels.ndim != 2:
        raise KdcliError(f"DICOM holds pixel data of shape {pixels.shape}, expected one grey image", path=path,
                         hint="pass skip_bad to leave it out")
    try:
        values = np.asarray(apply_modality_lut(pixels, ds), np.float64)
        voi = _voi(values, ds)
    except (ValueError, NotImplementedError, IndexError, AttributeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise KdcliError(f"DICOM's modality or VOI transform is invalid ({reason})", path=path,
                         hint="fix its header, or pass skip_bad to leave it out") from None
    low, high = float(values.min()), float(values.max())  # no VOI transform: the image's own range
    if voi is not None:
        values, low, high = np.asarray(voi[0], np.float64), voi[1], voi[2]
    span = high - low if abs(high - low) > 1e-6 else 1e-6
    scaled = np.clip((values - low) / span, 0.0, 1.0) * 255.0
    if str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        scaled = 255.0 - scaled  # MONOCHROME1 stores bone dark: invert so bone is bright, as in every PNG/JPEG
    return np.round(scaled).astype(np.uint8)


def read_xray(path: str | Path) -> np.ndarray:
    """One grey uint8 image (H, W): PNG (8/16-bit; 16-bit scaled by its own range), JPEG or DICOM."""
    path = Path(path)
    if not path.is_file():
        raise KdcliError("image does not exist", path=path, hint="restore it, or pass skip_bad to leave it out")
    if path.suffix.lower() == ".dcm":
        return _dicom(path)
    raw = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED) if raw.size else None
    if image is None:
        raise KdcliError("image will not decode (truncated or not an image)", path=path,
                         hint="re-download it, or pass skip_bad to leave it out")
    if image.ndim == 3:
        image = cv2.cvtColor(image[:, :, :3], cv2.COLOR_BGR2GRAY)
    if image.dtype != np.uint8:
        value = image.astype(np.float64)
        low, high = float(value.min()), float(value.max())
        image = np.round((value - low) / max(high - low, 1e-6) * 255.0).astype(np.uint8)
    return image


def stored_xray(image: np.ndarray, size: int) -> np.ndarray:
    """A decoded grey X-ray (H, W) as stored: zero-padded to square, resized, (size, size, 1)."""
    return resize_square(image[:, :, None], size)


def preprocess_xray(path: str | Path, size: int) -> np.ndarray:
    """One raw X-ray file (PNG, JPEG or DICOM) as `prepare` stores it; `kdcli predict` calls this too."""
    return stored_xray(read_xray(path), size)


# ---------------------------------------------------------------- heatmaps and masks (original-image geometry)


def _grid(height: int, width: int, size: int) -> tuple[float, int, int]:
    scale = min(1.0, GRID * size / max(height, width))
    return scale, max(1, round(height * scale)), max(1, round(width * scale))


def egd_heatmap(points: np.ndarray, height: int, width: int, sigma: float, size: int) -> np.ndarray:
    """EGD-CXR's recipe: fixation counts at original pixels, gaussian_filter(sigma px). On the working grid."""
    from scipy.ndimage import gaussian_filter

    scale, grid_h, grid_w = _grid(height, width, size)
    counts = np.zeros((grid_h, grid_w), np.float64)
    if len(points):
        xs = np.clip(np.floor(points[:, 0] * scale).astype(int), 0, grid_w - 1)
        ys = np.clip(np.floor(points[:, 1] * scale).astype(int), 0, grid_h - 1)
        np.add.at(counts, (ys, xs), 1.0)
    return gaussian_filter(counts, sigma * scale)


def reflacx_heatmap(readings: list[np.ndarray], height: int, width: int, size: int) -> np.ndarray:
    """REFLACX's recipe per reading: sum of duration-weighted 2-D Gaussians (sigma = 1 degree of visual angle in
    image pixels) clipped to the shown region, normalised to sum 1; readings of one image are averaged.
    Rows of a reading: x, y, duration, sigma_x, sigma_y, xmin, ymin, xmax, ymax (shown region), original pixels."""
    scale, grid_h, grid_w = _grid(height, width, size)
    ys = (np.arange(grid_h) + 0.5) / scale - 0.5  # grid cell centres in original pixels
    xs = (np.arange(grid_w) + 0.5) / scale - 0.5
    total = np.zeros((grid_h, grid_w), np.float64)
    for fixations in readings:
        if not len(fixations):
            continue
        x, y, weight, sx, sy, x0, y0, x1, y1 = (fixations[:, i][:, None] for i in range(9))
        sx, sy = np.maximum(sx, 1e-3), np.maximum(sy, 1e-3)
        gx = np.exp(-0.5 * ((xs[None] - x) / sx) ** 2) / (np.sqrt(2 * np.pi) * sx)
        gy = np.exp(-0.5 * ((ys[None] - y) / sy) ** 2) / (np.sqrt(2 * np.pi) * sy)
        gx *= (xs[None] >= x0) & (xs[None] < x1)  # the shown region: a Gaussian ends at the screen's edge
        gy *= (ys[None] >= y0) & (ys[None] < y1)
        heat = (gy * weight).T @ gx  # sum_i w_i * gy_i(y) gx_i(x): separable, exact
        if heat.sum() > 0:
            total += heat / heat.sum()
    return total


def to_stored_heatmap(heat: np.ndarray, size: int) -> np.ndarray:
    """A working-grid heatmap in the image's geometry -> (size, size, 1) uint8 with max 255 (zeros if empty)."""
    stored = resize_square(heat.astype(np.float32)[:, :, None], size)[:, :, 0]
    stored = np.clip(stored, 0.0, None)
    peak = float(stored.max())
    if peak <= 0:
        return np.zeros((size, size, 1), np.uint8)
    return np.round(stored / peak * 255.0).astype(np.uint8)[:, :, None]


def box_mask(boxes: list[list[float]], height: int, width: int, size: int) -> np.ndarray:
    """255 on stored pixels whose centre lies in any box (x, y, w, h in original pixels), in resize_square's
    geometry (centred zero padding to the longer side, then resize); a box smaller than a pixel keeps its centre's."""
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    step = side / size
    centres = (np.arange(size) + 0.5) * step  # stored pixel centres in padded-square original pixels
    mask = np.zeros((size, size), np.uint8)
    for x, y, w, h in boxes:
        x0, y0 = x + left, y + top
        cols = (centres >= x0) & (centres < x0 + w)
        rows = (centres >= y0) & (centres < y0 + h)
        if not cols.any():
            cols[min(size - 1, max(0, int((x0 + w / 2) / step)))] = True
        if not rows.any():
            rows[min(size - 1, max(0, int((y0 + h / 2) / step)))] = True
        mask[np.ix_(rows, cols)] = 255
    return mask[:, :, None]


def _repeated(seen: dict[str, tuple[int, Any]], key: str, line: int, content: Any, path: Path, what: str) -> bool:
    """True for a second row of `key` with the same content (a data warning; the row is dropped); a second row
    that says something else is an error (which one is right cannot be guessed)."""
    if key not in seen:
        seen[key] = (line, content)
        return False
    first_line, first = seen[key]
    if first != content:
        raise KdcliError(f"line {line}: {key} is listed again (first on line {first_line}) with other labels, "
                         "patient or split", path=path, hint="delete the wrong row")
    warn(f"duplicate_{what}", f"{path.name} {what}s repeated with the same content, kept once",
         f"{key} (line {line})")
    return True


def _check_boxes(image: str, targets: dict) -> None:
    """Boxes (x, y, w, h, original pixels) must lie on the image: an empty box or one entirely off the image is
    dropped (it would otherwise become a made-up 1-pixel mask), one partly off it is clipped; both counted."""
    if "boxes" not in targets:
        return
    height, width = targets["dims"]
    kept = []
    for x, y, w, h in targets["boxes"]:
        x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
        if w <= 0 or h <= 0 or x1 <= x0 or y1 <= y0:
            warn("box_off_image", "boxes empty or entirely outside their image, dropped",
                 f"{image} [{x:g}, {y:g}, {w:g}, {h:g}] on {width}x{height}")
            continue
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            warn("box_clipped", "boxes partly outside their image, clipped to it",
                 f"{image} [{x:g}, {y:g}, {w:g}, {h:g}] on {width}x{height}")
        kept.append([x0, y0, x1 - x0, y1 - y0])
    if kept:
        targets["boxes"] = kept
    else:
        del targets["boxes"]  # not annotated with boxes after all


# ---------------------------------------------------------------- the source


def nih_dev_patients(patients: set[str], fraction: float, seed: int) -> set[str]:
    """The train_val patients ChestX-ray14's dev split takes: each with probability `fraction`, seeded. Shared
    with the phantom (`synth cxr`), which must know which training labels `prepare` keeps in train."""
    ordered = sorted(patients, key=lambda p: (len(p), p))
    count = round(fraction * len(ordered))
    return {ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))[:count]}



@dataclass
class _Entry:
    id: str
    key: str  # what gaze files call the image: the Image Index's stem (NIH) or the dicom_id (MIMIC)
    group: str
    split: str
    path: Path
    labels: list[int] | None  # None: unlabeled (nobody graded it)
    line: int = 0  # its row in the label (NIH) or split (MIMIC) file, for messages


class Uncertain(StrEnum):
    """MIMIC/CheXpert -1 labels: U-Ones, U-Zeros, or left out of loss and metrics."""

    ones = "ones"
    zeros = "zeros"
    ignore = "ignore"


@dataclass
class CxrOptions:
    """Chest X-rays -> multi-label targets, gaze heat maps (official recipes) and box masks, patient-wise splits.
    Images without labels (NIH: blank Finding Labels; MIMIC: study without a CheXpert row, or every finding blank)
    become unlabeled training samples (label -1) for distillation."""

    gaze: Path | None = field(default=None, metadata={
        "help": "EGD-CXR folder (master_sheet.csv, fixations.csv) or REFLACX folder (main_data/)."})
    boxes: Path | None = field(default=None, metadata={"help": "NIH BBox_List_2017.csv."})
    uncertain: Uncertain = field(default=Uncertain.ones, metadata={
        "help": "MIMIC/CheXpert -1 labels: ones (U-Ones), zeros or ignore (left out of loss and metrics)."})
    egd_sigma: float = field(default=150.0, metadata={
        "help": "EGD-CXR heat map Gaussian sigma in original-image pixels (official: 150)."})
    dev_fraction: float = field(default=0.1, metadata={"help": "NIH: patients of train_val_list moved to dev."})
    seed: int = field(default=0, metadata={"flag": "--split-seed", "help": "Seed of the dev split."})
    labels: str | None = field(default=None, metadata={"help": "Comma list restricting the label set."})
    skip_bad: bool = field(default=False, metadata={
        "help": "Skip bad rows/images with a report instead of stopping."})


class CxrSource(Source):
    """ChestX-ray14 / MIMIC-CXR multi-label X-rays with EGD-CXR or REFLACX gaze and BBox boxes on a subset."""

    name = "cxr"
    Options = CxrOptions
    raw_help = ("ChestX-ray14 folder (Data_Entry_2017.csv, images_*/) or MIMIC-CXR-JPG folder (files/, the "
                "split/metadata/chexpert CSVs).")
    records_per_shard = 512

    raw_suffixes = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm")
    raw_kind = "X-rays (PNG, JPEG or DICOM)"

    @classmethod
    def raw_image_reader(cls, record: dict, modality: str) -> Callable[[str], np.ndarray]:
        return functools.partial(preprocess_xray, size=int(record["size"]))

    @classmethod
    def preprocessing_steps(cls, record: dict, meta: dict) -> list[str]:
        return ["decode to grey uint8: PNG/JPEG (16-bit min-max scaled); DICOM: the modality LUT (rescale "
                "slope/intercept), then the VOI LUT sequence or else the stored window (else min-max), MONOCHROME1 "
                "inverted", resize_square_step(int(record["size"]))]

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.skip_bad = bool(options.get("skip_bad", False))
        self.uncertain = str(options.get("uncertain", "ones") or "ones").lower()
        if self.uncertain not in POLICIES:
            raise KdcliError(f"uncertain={self.uncertain!r} is not a policy",
                             hint=f"choose one of {', '.join(POLICIES)}")
        self.egd_sigma = float(options.get("egd_sigma", 150.0))
        self.dev_fraction = float(options.get("dev_fraction", 0.1))
        if self.egd_sigma <= 0 or not 0.0 <= self.dev_fraction < 1.0:
            raise KdcliError(f"egd_sigma must be > 0 and dev_fraction in [0, 1) "
                             f"(got {self.egd_sigma}, {self.dev_fraction})")
        self.seed = int(options.get("seed", 0))

    # ------------------------------------------------------------ scan

    def scan(self, raw: Path) -> Scan:
        raw = Path(raw)
        notes: list[str] = []
        if any(raw.glob("Data_Entry_2017*.csv")):
            layout, official = "nih", NIH_LABELS
        elif all(_find(raw, f"mimic-cxr-2.0.0-{name}.csv") for name in MIMIC_FILES):
            layout, official = "mimic", CHEXPERT_LABELS
        else:
            raise KdcliError("no ChestX-ray14 or MIMIC-CXR layout found", path=raw,
                             hint="RAW must hold Data_Entry_2017.csv (ChestX-ray14) or mimic-cxr-2.0.0-split, "
                                  "-chexpert and -metadata .csv[.gz] (MIMIC-CXR)")
        classes = self._classes(official)
        if layout == "nih":
            entries = self._scan_nih(raw, classes, notes)
        else:
            entries = self._scan_mimic(raw, classes, notes)
        if not entries:
            raise KdcliError("no images left to prepare", path=raw, hint="see the notes for why")
        if any(Path(e.path).suffix.lower() == ".dcm" for e in entries):
            pydicom_module()  # before any image: skip_bad must not leave every DICOM out for a missing package
        by_key = {e.key: e for e in entries}
        gaze, gaze_source = self._gaze(by_key, notes)
        boxes = self._boxes(layout, classes, {e.id: e for e in entries}, notes)
        records, annotated_train, train, pool, pool_gaze = [], 0, 0, 0, 0
        for entry in sorted(entries, key=lambda e: e.id):
            # an unlabeled image carries no label vector at all (its shard has no "labels" array)
            targets: dict[str, Any] = {} if entry.labels is None else {"labels": entry.labels}
            if entry.key in gaze:
                targets["gaze"] = gaze[entry.key]
            if entry.id in boxes:
                targets["boxes"] = boxes[entry.id]
            if "gaze" in targets or "boxes" in targets:
                targets["dims"] = list(image_dims(entry.path))
                self._drop_outside(entry, targets, notes)
                _check_boxes(entry.id, targets)
            if entry.labels is None:
                pool += 1
                pool_gaze += "gaze" in targets
                label = UNLABELED
            else:
                if entry.split == "train":
                    train += 1
                    annotated_train += bool("gaze" in targets or "boxes" in targets)
                label = int(any(v == 1 for v, name in zip(entry.labels, classes, strict=True) if name != "No Finding"))
            records.append(CxrRecord(id=entry.id, group=entry.group, split=entry.split, label=label,
                                     files={"xray": str(entry.path)},
                                     targets=json.dumps(targets, separators=(",", ":"))))
        if pool:
            notes.append(f"unlabeled pool: {pool} training image(s), {pool_gaze} with gaze (label -1: distillation "
                         "terms only)")
        dropped = sum(self._outside.values())
        if dropped:
            notes.append(f"{dropped} gaze point(s) outside their image dropped "
                         f"({len(self._outside)} image(s), e.g. {next(iter(self._outside))})")
        n_labels = len(classes)
        return Scan(
            records=records,
            classes=classes,
            modalities={"xray": 1},
            pairing="paired",
            task="multilabel",
            arrays={
                "xray": {"channels": 1, "dtype": "uint8", "role": "input"},
                "labels": {"shape": [n_labels], "dtype": "uint8", "role": "target"},
                "gaze": {"channels": 1, "dtype": "uint8", "role": "target", "kind": "heatmap"},
                "boxes": {"channels": 1, "dtype": "uint8", "role": "target", "kind": "mask"},
                "annotated": {"shape": [2], "dtype": "uint8", "role": "target"},
            },
            extra={
                "layout": layout,
                "uncertain": self.uncertain,
                "ignore_value": IGNORE,
                "gaze_source": gaze_source,
                "egd_sigma": self.egd_sigma if gaze_source == "egd" else None,
                "annotated_fraction": annotated_train / train if train else 0.0,  # of the labelled train images
                "label_names": ["no finding", "finding"],  # the manifest label; the findings are in `labels`
                "label_names_raw": list(official),
                "annotated_names": ["gaze", "boxes"],
            },
            notes=notes,
        )

    def _classes(self, official: list[str]) -> list[str]:
        wanted = self.options.get("labels")
        if not wanted:
            return list(official)
        names = [ALIASES.get(n.strip(), n.strip()) for n in str(wanted).split(",") if n.strip()]
        unknown = [n for n in names if n not in official]
        if unknown or len(set(names)) != len(names):
            raise KdcliError(f"labels={wanted!r}: {', '.join(unknown) or 'repeated names'} not usable",
                             hint=f"choose among {', '.join(official)}")
        return names

    def _bad(self, message: str, path: Path, notes: list[str], hint: str = SKIP_HINT) -> None:
        """Raise, or with skip_bad note it (the caller then skips the row)."""
        if not self.skip_bad:
            raise KdcliError(message, path=path, hint=hint)
        notes.append(f"skipped {path.name}: {message}")

    # ------------------------------------------------------------ ChestX-ray14

    def _scan_nih(self, raw: Path, classes: list[str], notes: list[str]) -> list[_Entry]:
        tables = sorted(raw.glob("Data_Entry_2017*.csv"))
        table = tables[-1]  # Data_Entry_2017_v2020.csv sorts after Data_Entry_2017.csv
        if len(tables) > 1:
            notes.append(f"several Data_Entry files; using {table.name}")
        images = self._nih_images(raw)
        split_of = self._nih_splits(raw)
        rows = _csv_rows(table)
        first = next(rows, None)
        header = [c.strip() for c in first[1]] if first else []
        if header[:4] != NIH_HEADER or (len(header) > 5 and header[5] not in ("Patient Gender", "Patient Sex")):
            raise KdcliError(f"unexpected header {','.join(header)[:120]!r}", path=table,
                             hint=f"expected ChestX-ray14's `{','.join(NIH_HEADER)},Patient Age,Patient Gender,...`")
        wanted = set(classes)
        entries, unlisted, aliased = [], 0, 0
        seen: dict[str, tuple[int, Any]] = {}
        graded: dict[str, tuple[int, bool]] = {}  # image -> (first line, labelled)
        for line, row in rows:
            if len(row) < 4:
                self._bad(f"line {line}: {len(row)} fields, expected at least 4", table, notes)
                continue
            name, findings, patient = row[0].strip(), row[1].strip(), row[3].strip()
            # Data_Entry is the metadata as well as the label file: a row whose Finding Labels field is blank
            # (never so in the real release, where normals say "No Finding") is an image nobody graded
            labelled = bool(findings)
            if name in graded and graded[name][1] != labelled:
                first, _ = graded[name]
                self._bad(f"line {line}: image {name} is listed {'labelled' if labelled else 'unlabeled'} here and "
                          f"{'unlabeled' if labelled else 'labelled'} at line {first}", table, notes,
                          hint="an image is labelled or unlabeled (blank Finding Labels), not both: delete one row")
                continue
            graded.setdefault(name, (line, labelled))
            labels, bad = [0] * len(classes), None
            for finding in (f.strip() for f in findings.split("|")):
                if finding in ("No Finding", ""):
                    continue
                if finding in ALIASES:
                    finding, aliased = ALIASES[finding], aliased + 1
                if finding not in NIH_LABELS:
                    bad = finding
                    break
                if finding in wanted:
                    labels[classes.index(finding)] = 1
            if bad is not None:
                self._bad(f"line {line} ({name}): unknown finding {bad!r}", table, notes,
                          hint=f"ChestX-ray14's labels are {', '.join(NIH_LABELS)} or No Finding; " + SKIP_HINT)
                continue
            path = images.get(name) or images.get(Path(name).stem + ".dcm")
            if path is None:
                self._bad(f"line {line}: image {name} not found in any images_*/images/ folder (nor as .dcm)",
                          table, notes, hint="restore the image, or pass skip_bad to leave such rows out")
                continue
            split = split_of.get(name)
            if split is None:
                unlisted += 1
                continue
            if not labelled and split == "test":
                self._bad(f"line {line}: unlabeled image {name} (blank Finding Labels) is in test_list.txt",
                          raw / "test_list.txt", notes,
                          hint="unlabeled images can only train: move it to train_val_list.txt, or give it its "
                               "Finding Labels; or pass skip_bad to leave such images out")
                continue
            if _repeated(seen, name, line, (labels if labelled else None, patient), table, "row"):
                continue
            entries.append(_Entry(name, Path(name).stem, patient.lstrip("0") or "0", split, path,
                                  labels if labelled else None, line))
        if aliased:
            notes.append(f"{table.name}: 'Infiltrate' read as 'Infiltration' in {aliased} row(s)")
        if unlisted:
            notes.append(f"{unlisted} image(s) in neither train_val_list.txt nor test_list.txt left out")
        entries = self._held_out_patients(entries, table, "patient", "images in test_list.txt", notes)
        self._carve_dev(entries, notes)
        return entries

    def _held_out_patients(self, entries: list[_Entry], path: Path, who: str, where: str,
                           notes: list[str]) -> list[_Entry]:
        """Unlabeled images of a patient with dev or test images are refused: that patient's other images would
        leak into what the student is judged on (prepare's check_unlabeled is the backstop for every source)."""
        held = {e.group for e in entries if e.split != "train" and e.labels is not None}
        kept = []
        for e in entries:
            if e.labels is None and e.group in held:
                self._bad(f"line {e.line}: unlabeled image {e.id} belongs to {who} {e.group}, who has {where}", path,
                          notes, hint="unlabeled images train only: drop it, or move that patient's labelled images "
                                      "to training; or pass skip_bad to leave such images out")
                continue
            kept.append(e)
        return kept

    @staticmethod
    def _nih_images(raw: Path) -> dict[str, Path]:
        folders = sorted(p for p in raw.glob("images*/images") if p.is_dir())
        folders += [p for p in (raw / "images",) if p.is_dir()]
        found: dict[str, Path] = {}
        for folder in folders:
            with os.scandir(folder) as listing:
                for item in listing:
                    if item.is_file():
                        found.setdefault(item.name, Path(item.path))
        return found

    @staticmethod
    def _nih_splits(raw: Path) -> dict[str, str]:
        split_of = {}
        for list_name, split in (("train_val_list.txt", "train"), ("test_list.txt", "test")):
            path = raw / list_name
            if not path.is_file():
                raise KdcliError(f"missing {list_name}", path=raw,
                                 hint="ChestX-ray14's official split lists train_val_list.txt and test_list.txt "
                                      "must sit next to Data_Entry_2017.csv")
            for number, line in enumerate(read_text(path).splitlines(), start=1):
                name = line.strip()
                if name and split_of.get(name, split) != split:
                    raise KdcliError(f"line {number}: image {name} is also in train_val_list.txt", path=path,
                                     hint="an image belongs to one split: delete it from one of the two lists")
                if name in split_of:
                    warn("duplicate_list_line", "images listed twice in one split list, kept once",
                         f"{name} ({list_name} line {number})")
                elif name:
                    split_of[name] = split
        return split_of

    def _carve_dev(self, entries: list[_Entry], notes: list[str]) -> None:
        """Patients of the official train_val list go to dev with probability dev_fraction (seeded); those with
        unlabeled images stay in train (unlabeled images only train)."""
        by_split = defaultdict(set)
        for e in entries:
            by_split[e.split].add(e.group)
        unlabeled = {e.group for e in entries if e.labels is None}
        both = by_split["train"] & by_split["test"]  # patient leakage: prepare refuses it (or --allow-leakage)
        dev = nih_dev_patients(by_split["train"] - both - unlabeled, self.dev_fraction, self.seed)
        for e in entries:
            if e.split == "train" and e.group in dev:
                e.split = "dev"

    # ------------------------------------------------------------ MIMIC-CXR

    def _scan_mimic(self, raw: Path, classes: list[str], notes: list[str]) -> list[_Entry]:
        split_path, chexpert_path, metadata_path = (_find(raw, f"mimic-cxr-2.0.0-{n}.csv") for n in MIMIC_FILES)
        labels_of: dict[tuple[str, str], list[int] | None] = {}  # None: a row with every finding blank
        line_of: dict[tuple[str, str], int] = {}
        for line, row in _csv_dicts(chexpert_path, ("subject_id", "study_id", *classes)):
            key = (row["subject_id"].strip(), row["study_id"].strip())
            blank = not any((row.get(name) or "").strip() for name in CHEXPERT_LABELS)
            if key in labels_of and (labels_of[key] is None) != blank:
                raise KdcliError(f"line {line}: study {key[1]} has a row with every finding blank (unlabeled) and "
                                 f"a labelled one (lines {min(line, line_of[key])} and {max(line, line_of[key])})",
                                 path=chexpert_path, hint="a study is labelled or unlabeled, not both: delete one row")
            line_of[key] = line
            if blank:  # the labeler said nothing about this study: nobody graded it
                labels_of[key] = None
                continue
            labels = []
            for name in classes:
                value = (row.get(name) or "").strip()
                try:
                    number = float(value) if value else 0.0  # blank: not mentioned -> negative
                except ValueError:
                    raise KdcliError(f"line {line}: {name} is {value!r}, expected 1, 0, -1 or blank",
                                     path=chexpert_path, hint="use the original CheXpert label file") from None
                if number not in (1.0, 0.0, -1.0):
                    raise KdcliError(f"line {line}: {name} is {value!r}, expected 1, 0, -1 or blank",
                                     path=chexpert_path, hint="use the original CheXpert label file")
                if number == -1:
                    labels.append({"ones": 1, "zeros": 0, "ignore": IGNORE}[self.uncertain])
                else:
                    labels.append(int(number == 1))
            labels_of[key] = labels
        with _open_text(metadata_path) as handle, decoding(metadata_path):
            header = next(csv.reader(handle), [])
        if "dicom_id" not in header:
            raise KdcliError("missing column dicom_id", path=metadata_path, hint="use the original metadata file")
        entries, unlabelled = [], 0
        seen: dict[str, tuple[int, Any]] = {}
        splits = {"train": "train", "validate": "dev", "valid": "dev", "val": "dev", "test": "test"}
        for line, row in _csv_dicts(split_path, ("dicom_id", "study_id", "subject_id", "split")):
            dicom_id, study, subject = row["dicom_id"].strip(), row["study_id"].strip(), row["subject_id"].strip()
            split = splits.get(row["split"].strip().lower())
            if split is None:
                self._bad(f"line {line}: split {row['split']!r} is not train, validate or test", split_path, notes)
                continue
            folder = raw / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
            path = next((folder / f"{dicom_id}{s}" for s in (".jpg", ".dcm", ".png") if
                         (folder / f"{dicom_id}{s}").is_file()), None)
            if path is None:
                self._bad(f"line {line}: image {folder.relative_to(raw)}/{dicom_id}.jpg (or .dcm) not found",
                          split_path, notes, hint="restore the image, or pass skip_bad to leave such rows out")
                continue
            if _repeated(seen, dicom_id, line, (study, subject, split), split_path, "row"):
                continue
            labels = labels_of.get((subject, study))
            if labels is None:  # no chexpert row, or one with every finding blank: an unlabeled image
                if split != "train":
                    self._bad(f"line {line}: unlabeled image {dicom_id} (study {study} has no label in "
                              f"{chexpert_path.name}) is in split {row['split'].strip()!r}", split_path, notes,
                              hint="unlabeled images can only train: set its split to train, or label its study; "
                                   "or pass skip_bad to leave such images out")
                    continue
                unlabelled += 1
            entries.append(_Entry(dicom_id, dicom_id, subject, split, path, labels, line))
        if unlabelled:
            notes.append(f"{unlabelled} image(s) whose study has no row in {chexpert_path.name}, or one with every "
                         "finding blank: unlabeled (train only, label -1)")
        notes.append("MIMIC: official split used (validate -> dev); dev_fraction does not apply")
        return self._held_out_patients(entries, split_path, "subject", "validate or test images", notes)

    # ------------------------------------------------------------ gaze

    def _gaze(self, by_key: dict[str, _Entry], notes: list[str]) -> tuple[dict[str, dict], str | None]:
        self._outside: dict[str, int] = {}
        folder = self.options.get("gaze")
        if not folder:
            return {}, None
        folder = Path(folder)
        if (folder / "master_sheet.csv").is_file() and (folder / "fixations.csv").is_file():
            return self._egd(folder, by_key, notes), "egd"
        for main in (folder / "main_data", folder):
            if any(main.glob("metadata_phase_*.csv")):
                return self._reflacx(main, by_key, notes), "reflacx"
        raise KdcliError("neither EGD-CXR (master_sheet.csv + fixations.csv) nor REFLACX "
                         "(main_data/metadata_phase_*.csv) found", path=folder,
                         hint="point gaze at the egd-cxr or reflacx download folder")

    def _unknown_image(self, path: Path, line: int, image: str, notes: list[str]) -> None:
        self._bad(f"line {line}: gaze for image {image}, which is not in the dataset", path, notes,
                  hint="prepare the images it was recorded on, or pass skip_bad to ignore such gaze")

    def _egd(self, folder: Path, by_key: dict[str, _Entry], notes: list[str]) -> dict[str, dict]:
        path = folder / "fixations.csv"
        points: dict[str, list[list[float]]] = defaultdict(list)
        unknown: set[str] = set()
        for line, row in _csv_dicts(path, ("DICOM_ID", "X_ORIGINAL", "Y_ORIGINAL")):
            key = row["DICOM_ID"].strip()
            if key not in by_key:
                if key not in unknown:
                    self._unknown_image(path, line, key, notes)
                    unknown.add(key)
                continue
            points[key].append([_float(row["X_ORIGINAL"], path, line, "X_ORIGINAL"),
                                _float(row["Y_ORIGINAL"], path, line, "Y_ORIGINAL")])
        notes.append("EGD-CXR: X_ORIGINAL/Y_ORIGINAL are original-image pixels already (master sheet pads not "
                     f"re-applied); heatmap = gaussian_filter(counts, sigma={self.egd_sigma:g} px)")
        return {key: {"kind": "egd", "points": pts} for key, pts in points.items()}

    def _reflacx(self, main: Path, by_key: dict[str, _Entry], notes: list[str]) -> dict[str, dict]:
        columns = ("timestamp_start_fixation", "timestamp_end_fixation", "x_position", "y_position",
                   "angular_resolution_x_pixels_per_degree", "angular_resolution_y_pixels_per_degree",
                   "xmin_shown_from_image", "ymin_shown_from_image", "xmax_shown_from_image", "ymax_shown_from_image")
        readings: dict[str, list] = defaultdict(list)
        discarded = 0
        for meta in sorted(main.glob("metadata_phase_*.csv")):
            for line, row in _csv_dicts(meta, ("id", "eye_tracking_data_discarded", "dicom_id")):
                if _truthy(row["eye_tracking_data_discarded"]):
                    discarded += 1
                    continue
                key = row["dicom_id"].strip()
                if key not in by_key:
                    self._unknown_image(meta, line, key, notes)
                    continue
                fixation_path = main / row["id"].strip() / "fixations.csv"
                if not fixation_path.is_file():
                    self._bad(f"line {line}: case {row['id']} has no fixations.csv", meta, notes)
                    continue
                rows = []
                for fline, fix in _csv_dicts(fixation_path, columns):
                    v = [_float(fix[c], fixation_path, fline, c) for c in columns]
                    rows.append([v[2], v[3], max(v[1] - v[0], 0.0), v[4], v[5], v[6], v[7], v[8], v[9]])
                readings[key].append(rows)
        if discarded:
            notes.append(f"REFLACX: {discarded} reading(s) with eye_tracking_data_discarded=True dropped")
        return {key: {"kind": "reflacx", "readings": r} for key, r in readings.items()}

    def _drop_outside(self, entry: _Entry, targets: dict, notes: list[str]) -> None:
        """EGD points off the image are dropped (REFLACX Gaussians are clipped to the shown region instead)."""
        gaze = targets.get("gaze")
        if not gaze or gaze["kind"] != "egd":
            return
        height, width = targets["dims"]
        kept = [p for p in gaze["points"] if 0 <= p[0] < width and 0 <= p[1] < height]
        if len(kept) != len(gaze["points"]):
            self._outside[entry.id] = len(gaze["points"]) - len(kept)
        gaze["points"] = kept

    # ------------------------------------------------------------ boxes

    def _boxes(self, layout: str, classes: list[str], by_id: dict[str, _Entry], notes: list[str]) -> dict[str, list]:
        path = self.options.get("boxes")
        if not path:
            return {}
        path = Path(path)
        if not path.is_file():
            raise KdcliError("boxes file does not exist", path=path, hint="point boxes at BBox_List_2017.csv")
        if layout != "nih":
            raise KdcliError("boxes are ChestX-ray14's BBox_List_2017.csv, but RAW is a MIMIC-CXR folder", path=path,
                             hint="drop the boxes option for MIMIC-CXR")
        found: dict[str, list] = defaultdict(list)
        aliased = 0
        for line, row in _csv_rows(path):
            if row[0].strip() == "Image Index":
                continue  # the malformed header `Image Index,Finding Label,Bbox [x,y,w,h],,,`: read by position
            if len(row) < 6:
                self._bad(f"line {line}: {len(row)} fields, expected Image Index, Finding Label, x, y, w, h",
                          path, notes)
                continue
            name, label = row[0].strip(), row[1].strip()
            if label in ALIASES:
                label, aliased = ALIASES[label], aliased + 1
            if label not in NIH_LABELS:
                self._bad(f"line {line} ({name}): unknown finding {row[1].strip()!r}", path, notes,
                          hint=f"ChestX-ray14's labels are {', '.join(NIH_LABELS)}; " + SKIP_HINT)
                continue
            if name not in by_id:
                self._bad(f"line {line}: box for image {name}, which is not in the dataset", path, notes)
                continue
            if by_id[name].labels is None:
                self._bad(f"line {line}: box for image {name}, which is unlabeled (a box names its finding)", path,
                          notes, hint="give the image its Finding Labels in Data_Entry, or delete the box row")
                continue
            if label in classes:
                found[name].append([_float(row[i], path, line, c) for i, c in zip(range(2, 6), "xywh", strict=True)])
        if aliased:
            notes.append(f"{path.name}: 'Infiltrate' read as 'Infiltration' in {aliased} row(s)")
        return dict(found)

    # ------------------------------------------------------------ load

    def read(self, record: Record, size: int) -> tuple[dict[str, Any], Iterator[Sample]]:
        return read_or_skip(lambda: ({}, iter([Sample(record.id, record.label, self.load(record, size))])),
                            self.skip_bad)

    def load(self, record: Record, size: int) -> dict[str, np.ndarray]:
        image = read_xray(record.files["xray"])
        height, width = image.shape
        targets = json.loads(getattr(record, "targets", "") or "{}")
        if targets.get("dims") and list(targets["dims"]) != [height, width]:
            raise KdcliError(f"image is {height}x{width} but was {targets['dims'][0]}x{targets['dims'][1]} when "
                             "scanned", path=record.files["xray"], hint="prepare again from the start")
        gaze = targets.get("gaze")
        heat = np.zeros((size, size, 1), np.uint8)
        if gaze and gaze["kind"] == "egd":
            heat = to_stored_heatmap(egd_heatmap(np.asarray(gaze["points"], np.float64).reshape(-1, 2),
                                                 height, width, self.egd_sigma, size), size)
        elif gaze and gaze["kind"] == "reflacx":
            readings = [np.asarray(r, np.float64).reshape(-1, 9) for r in gaze["readings"]]
            heat = to_stored_heatmap(reflacx_heatmap(readings, height, width, size), size)
        boxes = targets.get("boxes") or []
        arrays = {
            "xray": stored_xray(image, size),
            "gaze": heat,
            "boxes": box_mask(boxes, height, width, size) if boxes else np.zeros((size, size, 1), np.uint8),
            "annotated": np.array([bool(heat.any()), bool(boxes)], np.uint8),
        }
        if "labels" in targets:  # unlabeled images have none (their records have label -1)
            arrays["labels"] = np.asarray(targets["labels"], np.uint8)
        return arrays


__all__ = ["CxrRecord", "CxrSource", "read_xray", "preprocess_xray", "stored_xray", "image_dims",
           "egd_heatmap", "reflacx_heatmap", "box_mask",
           "NIH_LABELS", "CHEXPERT_LABELS"]
