"""BraTS brain-tumour segmentation (2018-2023 releases, whatever the naming): 4 MRI sequences + a label volume.

Layouts met in the wild (the case folder's name is the case id; files may be `.nii` or `.nii.gz`):
    2018/2019  <root>/{HGG,LGG}/Brats18_2013_2_1/Brats18_2013_2_1_{t1,t1ce,t2,flair,seg}.nii.gz
    2020       <root>/MICCAI_BraTS2020_TrainingData/BraTS20_Training_001/BraTS20_Training_001_{...}.nii
    2021       <root>/BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz
    2023+      <root>/BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz

Quirks handled: BraTS 2020 case 355 ships its label as `W39_1998.09.19_Segm.nii` (no `_seg` file); 2023 ids
carry a timepoint suffix (`-000`, `-001`) so the patient is the id without it; 2023 labels enhancing tumour 3
where earlier releases use 4. Labels are stored in kdcli's contiguous indices (0 background, 1 necrotic core,
2 oedema, 3 enhancing tumour) whatever the release.

Unlabeled cases (`prepare brats RAW --unlabeled DIR`, kdcli's extension for distillation on cases nobody
segmented): DIR holds case folders in any of the layouts above with the four sequences and no label file, as
BraTS validation data ship (e.g. MICCAI_BraTS2020_ValidationData/BraTS20_Validation_001/...). Every case of DIR is
an unlabeled training case: records of label -1, split train (a --splits file may list them, in train only),
never of a patient with labelled dev or test cases (2023 timepoints), never a case id also in RAW. A label file in
DIR is ignored (with a note): DIR's cases are unlabeled by choice, e.g. for label-budget experiments. DIR may lie
inside RAW (a release's Training and Validation folders side by side); RAW's scan then leaves it out. No tumour
mask is known, so an unlabeled case keeps every brain slice (no `--empty-slices` share: which slices are
tumour-free is unknown); `distill --unlabeled-ratio` sets how often they are drawn. Their slices carry the four
sequences and no "seg" array, in shards of their own (`train-<sequences>-unlabeled-NNNNN.h5`), and `info` has
no label_file. Without --unlabeled, a case in RAW without its label stays an error (--skip-bad skips it).

Geometry, array axes (X, Y, Z) as nibabel returns them (no reorientation): a sample is the axial slice
`vol[:, :, z]`, cropped in-plane to the brain's bounding box (union over slices), zero-padded to a centred square
of side `side` and resized to `size`. `info` per record holds what `label_volume` needs to undo that.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from kdcli.errors import KdcliError
from kdcli.extras import require
from kdcli.shards.format import SPLITS
from kdcli.shards.quality import warn
from kdcli.sources._skip import read_or_skip, skip_or_raise
from kdcli.sources.base import UNLABELED, Record, Sample, Scan, Source
from kdcli.sources.splits import parse_ratios, read_split_file, split_groups, stable_seed

if TYPE_CHECKING:
    import nibabel as nib

if TYPE_CHECKING:
    import nibabel as nib

cv2.setNumThreads(1)  # parallelism comes from prepare's worker processes, not from OpenCV threads

SEQUENCES = ("t1", "t1ce", "t2", "flair")  # kdcli's names and the order models see them in
CLASSES = ["background", "necrotic core", "oedema", "enhancing tumour"]
REGIONS = {"wt": [1, 2, 3], "tc": [1, 3], "et": [3]}
# naming -> (separator, file suffix per kdcli name). Longest suffixes first so `_t1ce` is never read as `_t1`.
NAMINGS = {
    "2018-2021": ("_", {"t1ce": "t1ce", "flair": "flair", "seg": "seg", "t1": "t1", "t2": "t2"}),
    "2023": ("-", {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair", "seg": "seg"}),
}
ET_VALUE = {"2018-2021": 4, "2023": 3}  # the original label of enhancing tumour
NIFTI = (".nii.gz", ".nii")
SUFFIX = re.compile(r"^(?P<prefix>.+?)(?P<sep>[_-])(?P<suffix>t1ce|t1n|t1c|t2w|t2f|flair|seg|t1|t2)$", re.IGNORECASE)
MISNAMED_LABEL = re.compile(r"segm\.nii(\.gz)?$", re.IGNORECASE)  # BraTS 2020 case 355: W39_1998.09.19_Segm.nii
TIMEPOINT = re.compile(r"^(?P<patient>BraTS-[A-Za-z]+-\d+)-\d+$")
ACCEPTED = ("case folders holding <case>_t1, _t1ce, _t2, _flair and _seg .nii[.gz] files (BraTS 2018-2021) or "
            "<case>-t1n, -t1c, -t2w, -t2f and -seg .nii.gz files (BraTS 2023+)")
SKIP_HINT = "fix or remove the case, or pass --skip-bad to leave it out"
AFFINE_TOLERANCE = 1e-3
# Labels resize with INTER_NEAREST_EXACT: plain INTER_NEAREST samples pixel corners, not centres, so its maps drift
# up to a pixel from the linearly resized images and a size -> side -> size round trip scrambles them.
NEAREST = cv2.INTER_NEAREST_EXACT
Case = tuple[str, dict[str, Path], Path]  # naming, kdcli name -> file, case folder


def _nifti_stem(name: str) -> str | None:
    lower = name.lower()
    for extension in NIFTI:
        if lower.endswith(extension):
            return name[: -len(extension)]
    return None


def naming_of(files: dict[str, str]) -> str:
    """A record's naming, from its t1ce file name (the label file may be the misnamed 2020 one)."""
    stem = _nifti_stem(Path(files["t1ce"]).name) or ""
    return "2023" if stem.lower().endswith("-t1c") else "2018-2021"


def patient_of(case: str) -> str:
    """2023 ids end in a timepoint (`BraTS-GLI-00012-001`): its cases share a patient. Older ids are patients."""
    match = TIMEPOINT.match(case)
    return match.group("patient") if match else case


def _reason(exc: Exception, path: str | Path) -> str:
    """An exception as one short line; the path is named once by the caller already."""
    text = " ".join(str(exc).replace(str(path), Path(path).name).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _case_error(case: str, message: str, hint: str = SKIP_HINT) -> KdcliError:
    return KdcliError(message, hint=hint, subject=f"case {case}")


# ---------------------------------------------------------------- scanning: folders -> cases


def _case_files(folder: Path, names: list[str]) -> tuple[dict[str, dict[str, Path]], list[Path], str]:
    """Files of one folder by naming -> kdcli name, the misnamed label candidates, and the files' prefix."""
    found: dict[str, dict[str, Path]] = {}
    prefix = folder.name
    misnamed = []
    for name in names:
        stem = _nifti_stem(name)
        if stem is None or name.startswith("."):  # macOS `._X_t1.nii.gz` resource forks ride along in zips
            continue
        match = SUFFIX.match(stem)
        if match:
            sep, suffix = match.group("sep"), match.group("suffix").lower()
            naming = next((n for n, (s, table) in NAMINGS.items() if s == sep and suffix in table), None)
            if naming is None:
                continue  # e.g. `_t2w`: neither release's naming, not ours to guess
            kdcli_name = NAMINGS[naming][1][suffix]
            by_name = found.setdefault(naming, {})
            if kdcli_name in by_name:
                raise _case_error(folder.name, f"two files for {kdcli_name}: {by_name[kdcli_name].name} and {name}",
                                  hint="keep one of them (a .nii next to its .nii.gz?), or pass --skip-bad")
            by_name[kdcli_name] = folder / name
            prefix = match.group("prefix")
        elif MISNAMED_LABEL.search(name):
            misnamed.append(folder / name)
    return found, misnamed, prefix


def nibabel_module() -> ModuleType:
    """nibabel, the [mri] extra (BraTS volumes; `prepare table` asks for it too, for NIfTI columns)."""
    return require("nibabel", "mri", "reading BraTS NIfTI volumes")


def _header(case: str, path: Path) -> nib.Nifti1Image:
    """The image with its header read and its data left on disk; names the file when that fails."""
    try:
        image = nibabel_module().load(str(path))
        shape = image.shape
    except Exception as exc:  # nibabel, gzip and zlib raise many types for a damaged or foreign file
        raise _case_error(case, f"{path}: not a readable NIfTI file ({_reason(exc, path)})",
                          hint="re-download or re-extract the case, or pass --skip-bad") from None
    if len(shape) != 3:
        raise _case_error(case, f"{path}: {len(shape)}-D image of shape {tuple(shape)}; BraTS volumes are 3-D")
    if _nifti_stem(path.name) and not path.name.lower().endswith(".gz"):
        # An uncompressed file's size is known from its header: a cut download is caught here, before any shard.
        needed = int(image.dataobj.offset) + int(np.prod(shape)) * image.get_data_dtype().itemsize
        if path.stat().st_size < needed:
            raise _case_error(case, f"{path}: truncated ({path.stat().st_size} of {needed} bytes)",
                              hint="re-download or re-extract the case, or pass --skip-bad")
    return image


def _check_case(case: str, files: dict[str, Path]) -> None:
    """All five files (four for an unlabeled case) are 3-D NIfTI volumes on one grid (headers only; no voxel is
    decoded)."""
    reference_name, reference = "t1", _header(case, files["t1"])
    for name in (*SEQUENCES[1:], *(["seg"] if "seg" in files else [])):
        image = _header(case, files[name])
        if image.shape != reference.shape:
            raise _case_error(case, f"{files[name].name} has shape {tuple(image.shape)}, "
                                    f"{files[reference_name].name} {tuple(reference.shape)}")
        if not np.allclose(image.affine, reference.affine, atol=AFFINE_TOLERANCE):
            raise _case_error(case, f"{files[name].name} has another affine (voxel-to-world) than "
                                    f"{files[reference_name].name}; the sequences must be co-registered")


def _folder_case(folder: Path, names: list[str], notes: list[str],
                 labelled: bool = True) -> tuple[str, str, dict[str, Path]] | None:
    """(case id, naming, kdcli name -> file) when the folder holds BraTS-named files; raises when incomplete.
    `labelled=False` (a case of --unlabeled): the four sequences are required, a label file is kept aside as
    "seg" for the caller to report and drop."""
    found, misnamed, prefix = _case_files(folder, names)
    if not found:
        return None
    case = folder.name
    if len(found) > 1:
        raise _case_error(case, f"mixes the {' and '.join(sorted(found))} namings in {folder}",
                          hint="keep one release's files per case folder, or pass --skip-bad")
    naming, files = next(iter(found.items()))
    separator, table = NAMINGS[naming]
    extension = next(e for e in NIFTI if next(iter(files.values())).name.lower().endswith(e))
    if labelled and "seg" not in files and len(misnamed) == 1 and all(n in files for n in SEQUENCES):
        files["seg"] = misnamed[0]
        notes.append(f"case {case}: label file is {misnamed[0].name} (the BraTS 2020 misnamed label), used as seg")
    for name in (*SEQUENCES, *(["seg"] if labelled else [])):
        if name not in files:
            suffix = next(s for s, n in table.items() if n == name)
            what = "label" if name == "seg" else f"sequence {name}"
            hint = SKIP_HINT if name != "seg" else (
                "validation/test cases ship without labels: pass their folder as --unlabeled DIR to distil on "
                "them, point RAW at the training data, or pass --skip-bad")
            raise _case_error(case, f"missing {what} (expected {prefix}{separator}{suffix}{extension} "
                                    f"in {folder})", hint=hint)
    return case, naming, files


def _find_cases(raw: Path, notes: list[str], skip_bad: bool, labelled: bool = True,
                exclude: Path | None = None) -> tuple[dict[str, Case], set[str]]:
    """Every case under RAW (any depth: HGG/LGG and MICCAI_BraTS2020_TrainingData folders included), checked
    from headers, and the ids of the cases left out as bad (only with skip_bad). `labelled=False`: the cases of
    --unlabeled (label files dropped, with one note); `exclude`: a folder not to walk into (--unlabeled's)."""
    cases: dict[str, Case] = {}
    skipped: set[str] = set()
    labels_ignored: list[str] = []
    for folder, dirs, names in os.walk(raw):
        dirs[:] = sorted(d for d in dirs if d != "__MACOSX" and not d.startswith(".")  # deterministic order
                         and (exclude is None or (Path(folder) / d).resolve() != exclude))
        folder_path = Path(folder)
        try:
            found = _folder_case(folder_path, sorted(names), notes, labelled)
            if found is None:
                continue
            case, naming, files = found
            if not labelled and "seg" in files:
                labels_ignored.append(case)
                files = {name: path for name, path in files.items() if name != "seg"}
            if case in cases:
                raise KdcliError(f"case {case} found twice: {cases[case][2]} and {folder_path}", path=raw,
                                 hint="point RAW at one copy of the data")
            _check_case(case, files)
        except KdcliError as exc:
            skip_or_raise(exc, skip_bad, notes)
            skipped.add(folder_path.name)
            continue
        cases[case] = (naming, files, folder_path)
    if labels_ignored:
        notes.append(f"--unlabeled: label files of {len(labels_ignored)} case(s) ignored (first: {labels_ignored[0]}); "
                     "their cases are used unlabeled")
    return cases, skipped


# ---------------------------------------------------------------- splits

SPLIT_TAG = "brats-split"  # the seed stream of the default patient split (synth brats mirrors it)


def read_splits(path: Path) -> dict[str, str]:
    """case -> split from a CSV (`case,split`) or a JSON ({"train": [...], "dev": [...], "test": [...]})."""
    return read_split_file(path, "case", ("case",))


# ---------------------------------------------------------------- reading: volumes -> slices


def _voxels(case: str, path: str, dtype: type) -> np.ndarray:
    try:
        image = nibabel_module().load(path)
        if dtype is np.float32:
            return np.asarray(image.get_fdata(dtype=np.float32))
        return np.asanyarray(image.dataobj)
    except Exception as exc:  # truncated gzip: EOFError; bad deflate data: zlib.error; short .nii: ValueError
        raise _case_error(case, f"{path}: voxel data unreadable, truncated or corrupt ({_reason(exc, path)})",
                          hint="re-download or re-extract the case, or pass --skip-bad") from None


def _zero_nonfinite(case: str, name: str, path: str, volume: np.ndarray) -> None:
    """NaN or infinite voxels (a skull-stripping tool's background, a failed conversion) become 0, i.e. outside
    the brain, in place, and are counted as a data warning instead of reaching the shards as NaN."""
    bad = ~np.isfinite(volume)
    count = int(bad.sum())
    if count:
        volume[bad] = 0.0
        warn("nonfinite_voxels", "sequences with NaN or infinite voxels, set to 0 (outside the brain)",
             f"case {case} {name}: {count} voxel(s) in {Path(path).name}")


def _bounds(mask: np.ndarray) -> tuple[int, int]:
    where = np.flatnonzero(mask)
    return int(where[0]), int(where[-1]) + 1


def _to_square(plane: np.ndarray, crop: list[int], pad: list[int], side: int) -> np.ndarray:
    x0, x1, y0, y1 = crop
    square = np.zeros((side, side), dtype=plane.dtype)
    square[pad[0] : pad[0] + x1 - x0, pad[1] : pad[1] + y1 - y0] = plane[x0:x1, y0:y1]
    return square


def _resize(square: np.ndarray, size: int, interpolation: int) -> np.ndarray:
    # cv2 takes (width, height); both are `size`, so the array axes keep their meaning.
    return square if square.shape[0] == size else cv2.resize(square, (size, size), interpolation=interpolation)


def brain_mask(volumes: dict[str, np.ndarray]) -> np.ndarray:
    """The brain: voxels non-zero in any of the (skull-stripped) sequences."""
    brain = np.zeros(next(iter(volumes.values())).shape, dtype=bool)
    for volume in volumes.values():
        brain |= volume != 0
    return brain


def zscore_in_brain(volumes: dict[str, np.ndarray], brain: np.ndarray) -> None:
    """Each sequence z-scored over the brain, zero outside; in place: a 240x240x155 case is ~36 MB per float32
    copy. `prepare` and `kdcli predict` both call this."""
    for volume in volumes.values():
        inside = volume[brain]
        mean = float(inside.mean(dtype=np.float64)) if inside.size else 0.0
        std = float(inside.std(dtype=np.float64)) if inside.size else 0.0
        volume[brain] = (inside - mean) / (std if std > 1e-8 else 1.0)  # a flat sequence becomes 0s, not NaN
        volume[~brain] = 0.0


def crop_square(region: np.ndarray) -> tuple[list[int], list[int], int]:
    """The in-plane crop (x0, x1, y0, y1) of `region`'s bounding box over all slices, the centring pad and the
    square's side: what `stored_slice` applies and `label_volume` undoes."""
    x0, x1 = _bounds(region.any(axis=(1, 2)))
    y0, y1 = _bounds(region.any(axis=(0, 2)))
    side = max(x1 - x0, y1 - y0)
    return [x0, x1, y0, y1], [(side - (x1 - x0)) // 2, (side - (y1 - y0)) // 2], side


def stored_slice(volume: np.ndarray, z: int, crop: list[int], pad: list[int], side: int, size: int) -> np.ndarray:
    """Axial slice z of a z-scored sequence as stored: cropped, padded to the square, resized; float16
    (size, size, 1)."""
    return _resize(_to_square(volume[:, :, z], crop, pad, side), size, cv2.INTER_LINEAR).astype(np.float16)[:, :, None]


def label_volume(info: dict[str, Any], slices: dict[int, np.ndarray]) -> np.ndarray:
    """The label volume on the record's original grid (shape info["shape"], original values: kdcli 3 -> the
    release's ET value) from per-slice maps of kdcli indices (size x size, or size x size x 1) at their z;
    slices not given are background."""
    shape = tuple(info["shape"])
    x0, x1, y0, y1 = info["crop"]
    before_x, before_y = info["pad"]
    side = int(info["side"])
    lookup = np.array([0, 1, 2, int(info["et_value"])], dtype=np.uint8)
    volume = np.zeros(shape, dtype=np.uint8)
    for z, plane in slices.items():
        plane = np.asarray(plane)
        if plane.ndim == 3 and plane.shape[2] == 1:
            plane = plane[:, :, 0]
        if plane.ndim != 2 or plane.shape[0] != plane.shape[1]:
            raise ValueError(f"slice {z}: expected a square 2-D map, got shape {plane.shape}")
        if not 0 <= int(z) < shape[2]:
            raise ValueError(f"slice {z} outside the volume's 0..{shape[2] - 1}")
        if plane.size and (plane.min() < 0 or plane.max() >= len(lookup)):
            raise ValueError(f"slice {z}: labels must be kdcli indices 0..{len(lookup) - 1}")
        square = _resize(plane.astype(np.uint8), side, NEAREST)
        inside = square[before_x : before_x + x1 - x0, before_y : before_y + y1 - y0]
        volume[x0:x1, y0:y1, int(z)] = lookup[inside]
    return volume


def write_label_nifti(path: Path, volume: np.ndarray, info: dict[str, Any]) -> None:
    """Write a label volume (original values) as uint8 NIfTI on the record's grid; atomic, so an interrupted
    evaluation never leaves a half-written prediction that looks complete."""
    path = Path(path)
    if tuple(volume.shape) != tuple(info["shape"]):
        raise ValueError(f"volume shape {volume.shape} is not the record's {tuple(info['shape'])}")
    affine = np.asarray(info["affine"], dtype=np.float64)
    nib = nibabel_module()
    image = nib.Nifti1Image(np.asarray(volume, dtype=np.uint8), affine)
    image.set_data_dtype(np.uint8)
    image.set_qform(affine, code=1)  # scanner coordinates, like the BraTS files: viewers overlay it on the MRI
    image.set_sform(affine, code=1)
    extension = ".nii.gz" if path.name.lower().endswith(".gz") else ".nii"  # nibabel compresses by extension
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{extension}")
    try:
        nib.save(image, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class BratsOptions:
    """BraTS volumes -> axial slices of the 4 sequences (z-scored in the brain, cropped) and label maps."""

    empty_slices: float = field(default=0.2, metadata={
        "help": "Fraction of tumour-free brain slices kept in train (dev/test keep every brain slice)."})
    splits: Path | None = field(default=None, metadata={
        "help": "Case splits: CSV case,split or JSON {train: [...], ...} (default: seeded ratios by patient)."})
    ratios: str = field(default="0.7,0.1,0.2", metadata={
        "help": "train,dev,test fractions when --splits is not given."})
    seed: int = field(default=0, metadata={
        "flag": "--split-seed", "help": "Seed of the patient split and of the empty-slice choice."})
    skip_bad: bool = field(default=False, metadata={
        "help": "Skip broken cases with a report instead of stopping."})
    unlabeled: Path | None = field(default=None, metadata={
        "help": "Folder of cases with the four sequences and no label (BraTS validation data as shipped): "
                "unlabeled training cases, every brain slice kept, for distillation only."})


class BratsSource(Source):
    """Options: empty_slices (fraction of tumour-free brain slices kept in train, default 0.2), splits (CSV
    `case,split` or JSON file), ratios ("0.7,0.1,0.2"), seed, skip_bad, unlabeled (a folder of cases without
    labels: unlabeled training cases, see the module doc)."""

    name = "brats"
    Options = BratsOptions
    raw_help = "Folder of BraTS cases (any release's naming, nested or not)."
    default_size = 128
    records_per_shard = 4  # a case is ~100 slices of 5 arrays

    @classmethod
    def record_extras(cls, dataset: Any) -> dict[str, Any]:
        return {"label_values": dataset.extra.get("label_values")}  # ET 4, or 3 for BraTS 2023 naming: written back

    @classmethod
    def preprocessing_steps(cls, record: dict, meta: dict) -> list[str]:
        size = int(record["size"])
        return ["read each NIfTI sequence as float32 (nibabel, no reorientation)",
                "brain = voxels non-zero in any sequence; z-score each sequence inside it, 0 outside",
                "crop every axial slice vol[:, :, z] to the brain's in-plane bounding box (all slices), zero-pad to a "
                f"centred square, resize to {size}x{size} (cv2 INTER_LINEAR); slices without brain are background",
                f"stack the sequences as channels in the order {', '.join(meta['model']['modalities'])}"]

    def __init__(self, **options: Any):
        super().__init__(**options)
        empty = options.get("empty_slices")
        self.empty_slices = 0.2 if empty is None else float(empty)
        if not 0.0 <= self.empty_slices <= 1.0:
            raise KdcliError(f"--empty-slices {self.empty_slices}: expected a fraction between 0 and 1")
        self.seed = int(options.get("seed") or 0)
        self.skip_bad = bool(options.get("skip_bad", False))
        self.ratios = parse_ratios(options.get("ratios") or "0.7,0.1,0.2")  # refused before any case is read

    def scan(self, raw: Path) -> Scan:
        raw = Path(raw)
        if not raw.is_dir():
            raise KdcliError("raw folder not found", path=raw, hint="point RAW at the extracted BraTS data")
        nibabel_module()  # before any case: --skip-bad must not leave every case out for a missing package
        notes: list[str] = []
        pool = Path(self.options["unlabeled"]) if self.options.get("unlabeled") else None
        if pool is not None and not pool.is_dir():
            raise KdcliError("--unlabeled folder not found", path=pool,
                             hint="point --unlabeled at a folder of cases without labels (BraTS validation data)")
        if pool is not None and pool.resolve() == raw.resolve():
            raise KdcliError("--unlabeled is RAW itself", path=pool,
                             hint="RAW holds the labelled cases, --unlabeled another folder of unlabeled ones")
        cases, skipped = _find_cases(raw, notes, self.skip_bad, exclude=pool.resolve() if pool else None)
        if not cases and not skipped:
            raise KdcliError("no BraTS cases found", path=raw, hint=f"expected {ACCEPTED}")
        if not cases:
            raise KdcliError(f"all {len(skipped)} cases were skipped as bad; nothing to prepare", path=raw,
                             hint="see the notes for why")
        unlabeled, unlabeled_skipped = self._unlabeled_cases(pool, cases, notes) if pool is not None else ({}, set())
        split_of = self._splits(cases, skipped | unlabeled_skipped, notes, unlabeled)
        namings = sorted({naming for naming, _, _ in (*cases.values(), *unlabeled.values())})
        records = [
            Record(id=case, group=patient_of(case), split=split_of[case], label=0,
                   files={name: str(files[name]) for name in (*SEQUENCES, "seg")})
            for case, (_, files, _) in sorted(cases.items())
        ]
        # split: train, unless a splits file lists the case elsewhere (then prepare's check_unlabeled refuses it)
        records += [Record(id=case, group=patient_of(case), split=split_of.get(case, "train"), label=UNLABELED,
                           files={name: str(files[name]) for name in SEQUENCES})
                    for case, (_, files, _) in sorted(unlabeled.items())]
        arrays: dict[str, dict[str, Any]] = {name: {"channels": 1, "dtype": "float16", "role": "input"}
                                             for name in SEQUENCES}
        arrays["seg"] = {"channels": 1, "dtype": "uint8", "role": "target", "kind": "mask"}
        return Scan(
            records=records,
            classes=list(CLASSES),
            modalities={name: 1 for name in SEQUENCES},
            pairing="paired",
            task="segmentation",
            arrays=arrays,
            extra={
                "regions": {k: list(v) for k, v in REGIONS.items()},
                "label_names": ["no tumour", "tumour"],  # the manifest label: does the slice hold tumour
                "naming": namings,
                "label_values": {n: {"0": 0, "1": 1, "2": 2, str(ET_VALUE[n]): 3} for n in namings},
                "modality_order": list(SEQUENCES),
            },
            notes=notes,
        )

    def _unlabeled_cases(self, pool: Path, cases: dict[str, Case],
                         notes: list[str]) -> tuple[dict[str, Case], set[str]]:
        """The cases of --unlabeled (four sequences each, none also a labelled case of RAW) and those skipped."""
        found, skipped = _find_cases(pool, notes, self.skip_bad, labelled=False)
        if not found and not skipped:
            raise KdcliError("no BraTS cases found in the --unlabeled folder", path=pool,
                             hint="expected case folders holding the four sequences (t1, t1ce, t2, flair)")
        both = sorted(set(found) & set(cases))
        if both:
            raise KdcliError(f"case {both[0]} is both labelled (in {cases[both[0]][2]}) and unlabeled (in "
                             f"{found[both[0]][2]})" + (f", and {len(both) - 1} more" if len(both) > 1 else ""),
                             path=pool, hint="a case is labelled or unlabeled, not both: remove one of the copies")
        notes.append(f"unlabeled: {len(found)} case(s) from {pool} (train only, every brain slice kept, no label "
                     "maps)" + (f"; {len(skipped)} skipped as bad" if skipped else ""))
        return found, skipped

    def _splits(self, cases: dict[str, Case], skipped: set[str], notes: list[str],
                unlabeled: dict[str, Case] | None = None) -> dict[str, str]:
        """case -> split of the labelled cases (the unlabeled ones take no part in the seeded split, so adding
        them changes no labelled case's split), and of unlabeled cases a splits file lists."""
        unlabeled = unlabeled or {}
        groups = {case: patient_of(case) for case in cases}
        if not self.options.get("splits"):
            by_group = split_groups(list(groups.values()), self.ratios, self.seed, tag=SPLIT_TAG)
            return {case: by_group[group] for case, group in groups.items()}
        path = Path(self.options["splits"])
        listed = read_splits(path)
        # a case left out as bad is on disk, just not used; unlabeled cases may be listed (in train) or not
        absent = sorted(set(listed) - set(cases) - skipped - set(unlabeled))
        if absent:
            raise KdcliError(f"{len(absent)} listed case(s) not found in RAW: {', '.join(absent[:5])}"
                             f"{' ...' if len(absent) > 5 else ''}", path=path,
                             hint="fix the case ids (case folder names) or restore the cases")
        unlisted = sorted(set(cases) - set(listed))
        if unlisted:
            raise KdcliError(f"{len(unlisted)} case(s) in RAW are not listed: {', '.join(unlisted[:5])}"
                             f"{' ...' if len(unlisted) > 5 else ''}", path=path,
                             hint="give every case a split (train, dev or test)")
        by_group: dict[str, set[str]] = {}
        for case, group in groups.items():
            by_group.setdefault(group, set()).add(listed[case])
        cut = sorted(group for group, splits in by_group.items() if len(splits) > 1)
        if cut:
            raise KdcliError(f"patient {cut[0]} has cases in several splits ({', '.join(sorted(by_group[cut[0]]))})",
                             path=path, hint="keep every timepoint of a patient in one split")
        empty = [split for split in SPLITS if split not in set(listed.values())]
        if empty:
            notes.append(f"splits file {path.name} puts no case in {', '.join(empty)}")
        return {case: listed[case] for case in (*cases, *unlabeled) if case in listed}

    def read(self, record: Record, size: int) -> tuple[dict[str, Any], Iterator[Sample]]:
        return read_or_skip(lambda: self._read(record, size), self.skip_bad)

    def _mapped_label(self, record: Record, naming: str) -> tuple[np.ndarray, nib.Nifti1Image]:
        """The label volume in kdcli indices, and the label file's image (for its header)."""
        case, et_value = record.id, ET_VALUE[naming]
        raw_label = _voxels(case, record.files["seg"], np.int32)
        label_image = nibabel_module().load(record.files["seg"])  # header only: the data above already read cleanly
        label = np.rint(raw_label).astype(np.int32) if raw_label.dtype.kind == "f" else raw_label.astype(np.int32)
        if raw_label.dtype.kind == "f" and not np.array_equal(label, raw_label):
            raise _case_error(case, f"{Path(record.files['seg']).name} holds non-integer labels")
        allowed = (0, 1, 2, et_value)
        values = np.unique(label)
        bad = [int(v) for v in values if int(v) not in allowed]
        if bad:
            raise _case_error(case, f"{Path(record.files['seg']).name} holds label value(s) "
                                    f"{', '.join(map(str, bad))}; BraTS {naming} labels are {set(allowed)}",
                              hint="fix the label file, or pass --skip-bad to leave the case out")
        mapped = np.zeros(label.shape, dtype=np.uint8)
        for kdcli_index, original in enumerate(allowed):
            mapped[label == original] = kdcli_index
        return mapped, label_image

    def _read(self, record: Record, size: int) -> tuple[dict[str, Any], Iterator[Sample]]:
        case = record.id
        naming = naming_of(record.files)
        et_value = ET_VALUE[naming]
        volumes = {name: _voxels(case, record.files[name], np.float32) for name in SEQUENCES}
        for name, volume in volumes.items():
            _zero_nonfinite(case, name, record.files[name], volume)
        labelled = record.label != UNLABELED
        # an unlabeled case's grid comes from its T1 header (the sequences share it: checked by the scan)
        if labelled:
            mapped, grid_image = self._mapped_label(record, naming)
        else:
            mapped, grid_image = None, nibabel_module().load(record.files["t1"])
        shape = volumes["t1"].shape

        brain = brain_mask(volumes)
        # Tumour voxels count as brain for the crop and the kept slices, so no labelled voxel is ever cropped away.
        region = brain | (mapped > 0) if labelled else brain
        if not region.any():
            raise _case_error(case, "every sequence is zero everywhere (no brain)")
        zscore_in_brain(volumes, brain)
        crop, pad, side = crop_square(region)
        slices = self._kept_slices(record, region, mapped)
        tumour = mapped.any(axis=(0, 1)) if labelled else None
        info = {
            "shape": [int(s) for s in shape],
            "affine": np.asarray(grid_image.affine, dtype=float).tolist(),
            "spacing": [float(z) for z in grid_image.header.get_zooms()[:3]],
            "crop": crop, "pad": pad, "side": int(side), "size": int(size),
            "naming": naming, "et_value": et_value,
            **({"label_file": Path(record.files["seg"]).name, "label_dtype": str(grid_image.get_data_dtype())}
               if labelled else {"unlabeled": True}),
            "slices": slices,
        }

        def samples() -> Iterator[Sample]:
            for z in slices:
                arrays = {name: stored_slice(volumes[name], z, crop, pad, side, size) for name in SEQUENCES}
                if not labelled:  # no label map: the slice's shard holds the sequences alone
                    yield Sample(f"{case}:{z:03d}", UNLABELED, arrays, position=z)
                    continue
                arrays["seg"] = _resize(_to_square(mapped[:, :, z], crop, pad, side), size,
                                        NEAREST)[:, :, None]
                yield Sample(f"{case}:{z:03d}", int(tumour[z]), arrays, position=z)

        return info, samples()

    def _kept_slices(self, record: Record, region: np.ndarray, mapped: np.ndarray | None) -> list[int]:
        """dev/test: every slice with brain (whole volumes are evaluated); train: tumour slices plus a seeded
        `empty_slices` share of the tumour-free ones, which would otherwise swamp the loss; unlabeled (no mask:
        which slices are tumour-free is unknown): every slice with brain, as the teacher will label them."""
        with_brain = np.flatnonzero(region.any(axis=(0, 1)))
        if record.split != "train" or mapped is None:
            return [int(z) for z in with_brain]
        tumour = mapped.any(axis=(0, 1))
        full = [int(z) for z in with_brain if tumour[z]]
        empty = np.array([int(z) for z in with_brain if not tumour[z]], dtype=np.int64)
        count = int(round(self.empty_slices * len(empty)))
        rng = np.random.default_rng(stable_seed("brats-slices", self.seed, record.id))
        chosen = rng.choice(empty, size=count, replace=False) if count else np.array([], dtype=np.int64)
        return sorted(full + [int(z) for z in chosen])
