"""Deterministic BraTS-like glioma MRI phantoms (T1, T1ce, T2, FLAIR + labels) in each release's real layout.

Layouts, exactly as the official downloads unpack:

- "2018" / "2019": ``HGG/Brats18_<INST>_<N>_1/Brats18_<INST>_<N>_1_{t1,t1ce,t2,flair,seg}.nii.gz`` and the same
  under ``LGG/`` (prefix ``BraTS19_`` for 2019). About 2/3 of the cases are HGG, 1/3 LGG. Ids look like
  ``Brats18_2013_2_1``, ``Brats18_CBICA_AAB_1``, ``Brats18_TCIA01_131_1``.
- "2020": ``MICCAI_BraTS2020_TrainingData/BraTS20_Training_001/BraTS20_Training_001_{flair,t1,t1ce,t2,seg}.nii``
  (uncompressed) plus ``name_mapping.csv`` (Grade and the 2017-2020 ids of each subject). The real release
  names one label file ``W39_1998.09.19_Segm.nii`` instead of ``BraTS20_Training_355_seg.nii``. The phantom
  reproduces that quirk on exactly one case: case 355 when the set has 355 cases or more, otherwise the LAST
  case (its folder and image names stay normal), so every 2020 phantom carries it.
- "2021": ``BraTS2021_00000/BraTS2021_00000_{flair,t1,t1ce,t2,seg}.nii.gz``, 5-digit ids with gaps.
- "2023": ``BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz`` (t1n=T1, t1c=T1ce, t2w=T2,
  t2f=FLAIR); a few subjects get a follow-up scan ``-001``. Enhancing tumour is label 3 there, 4 elsewhere.

Volumes are (size, size, depth) in the real 240 x 240 x 155 axis order (x, y, z; axial slices along the last
axis); depth defaults to round(size * 155 / 240) (at least 8), so size=240 gives the real grid. The field of view
is always the real 240 x 240 x 155 mm: voxels are 1 mm at size 240 and larger below. The affine is the BraTS
one, diag(-1, -1, 1) scaled by the voxel size with the y origin at the far edge, identical for the 5 files of a
case (sform and qform code 1). Images are int16 for 2018/2019/2023 and float32 (integer valued) for 2020/2021,
as the releases mix them; labels are uint8. Everything outside the brain is exactly 0 (skull-stripped) and
every brain voxel is > 0.

Generative story (the default, "shared" design). Every case has its own random streams, keyed by the seed and
the case alone (never by another case, the case count or the worker): anatomy, tumour biology, one nuisance
stream per sequence, and the rater. For each case, in this order:

1. Anatomy (anatomy stream): an ellipsoidal brain with a smoothly perturbed surface, white matter inside a ~7 mm
   grey-matter band, a thin CSF rim and two lateral ventricles, a faint smooth tissue texture (0.25 sigma).
2. The tumour-biology latent u (biology stream), drawn first and shown in the summary: enhancement e
   (HGG U(0.25, 1), LGG U(0, 0.6); the tumour enhances iff e >= 0.2, so ~1/3 of LGG do not and barely
   enhancing cases sit just above the threshold; the first LGG of a set always lies below it), liquefaction of
   the necrosis q ~ U(0, 1), oedema water content w ~ U(0, 1), infiltration i ~ U(0, 1), oedema radius
   14-24 mm, core fraction (rim / oedema radius) U(0.45, 0.65), necrosis fraction (necrosis / rim radius)
   U(0.5, 0.8).
3. The tumour geometry, from u and the same stream: one glioma in white matter at a random place, rotated and
   stretched, its radii perturbed by smooth noise (the oedema the more, 0.10 + 0.10 i): necrotic core
   (label 1) inside an enhancing rim (label 4, or 3 for 2023; label 1 throughout when e < 0.2) inside oedema
   (label 2), plus round(3 i) tapering oedema fingers in random directions, in white matter only and connected
   to the body, reaching (0.3 + 0.4 i) x U(0.7, 1) oedema radii beyond it. The clean label map is this
   geometry: labels never enter the pixels except as the geometry of u.
4. Each sequence renders u with its own gain (nuisance stream of that sequence: smooth bias field
   exp(0.06 x unit noise), Gaussian noise sigma = 0.04 relative to white matter, a gain U(0.8, 1.2)).
   Contrast relative to white matter = 1 (oedema: the underlying tissue plus a shift in noise sigmas; under the
   tumour CSF is displaced):

   ========  =====  =====  =====  =====================  ===================  =======================
   sequence  WM     GM     CSF    oedema shift (sigma)   necrosis             ET
   ========  =====  =====  =====  =====================  ===================  =======================
   T1        1.00   0.72   0.30   -(0.3 + 0.4 w)         0.72 - 0.1 q         0.86
   T1ce      1.00   0.76   0.30   +(0.25 + 1.25 w)       0.95 - 0.45 q        1.05 + 0.65 (e-0.2)/0.8
   T2        1.00   1.30   2.60   +(18 + 8 w)            2.2 + 0.2 q          1.50
   FLAIR     1.00   1.15   0.35   +(13 + 6 w)            1.3 - 0.1 q          1.40
   ========  =====  =====  =====  =====================  ===================  =======================

   The teacher's sequences keep the control's table (below) on average and vary around it without overlaps, so
   they show every region strongly whatever u is (oedema 13-26 sigma above white matter in T2 and FLAIR,
   necrosis >= 4 sigma above oedema and below CSF in T2 and >= 5 below oedema in FLAIR, ET >= 5 sigma below
   oedema in T2 and 3.5 above GM in T1). The student's T1ce renders the same latent weakly and per case: a
   barely enhancing rim is 1-3 sigma above white matter, a solid (low q) necrosis 1-3 sigma below it, oedema
   0.25-1.5 sigma above it, so the T1ce student alone misses or confuses regions on some cases.
5. Rater noise, TRAIN cases only (``label_noise`` = RHO in [0, 1], rater stream): the seg file is the clean
   geometry redrawn with each boundary (oedema, rim, necrosis) dilated or eroded by a per-case factor
   1 + 0.3 RHO U(-1, 1) times a smooth local wobble 1 + 0.15 RHO (unit noise, 12 mm), and each oedema finger
   dropped with probability RHO. The pixels keep the clean geometry, so training labels are noisy given T1ce
   and cleaner given FLAIR/T2 -- the condition under which a teacher's soft labels can beat the labels. Dev and
   test cases keep the clean labels. The clean map of every noisy case is written to
   ``clean_labels/<case>.nii[.gz]`` (a name prepare never reads as a case), and the summary gives each noisy
   case's rater Dice against it.

Negative control (``independent=True``): today's design, byte for byte when ``label_noise`` is 0 and no test
cases are added: one random stream per case drives anatomy, geometry and nuisance in sequence, no latent drives
any contrast, every case shows each region with the same fixed contrast (T1: oedema -0.5 sigma, necrosis 0.72,
ET 0.86; T1ce: +0.25 sigma, 0.50, 1.70; T2: +22 sigma, 2.20, 1.50; FLAIR: +16 sigma, 1.30, 1.40; WM/GM/CSF as
above), no fingers, enhancement from the grade alone (HGG always; LGG with probability 0.65, the first never).
Rater noise there is drawn into the geometry BEFORE rendering: the labels stay exactly the generating geometry
at every RHO (as today: "the labels are the pixels"). Why this control: distillation can only add what the
labels lack -- a per-case latent beyond the label that the student's sequence also renders (condition (a) of
the theory note) or training labels that are noisy given the student's input and cleaner given the teacher's
(condition (c)). Here both fail at every RHO: with fixed contrasts p(label | T1ce) is one fixed function that
the labels alone teach, and a teacher trained on the same exact labels can only reproduce them. The shared
design meets (a) always and (c) when RHO > 0; the control keeps everything else (layout, grades, splits, rater
draws) equal.

Splits: prepare splits by patient with seeded ratios unless given ``--splits``. The phantom records its own
split in the summary ("split" per case, "splits" overall): the main cases split as prepare's default would
split them (ratios 0.7/0.1/0.2, split seed 0), or 0.875/0.125/0 when extra test cases exist. With
``label_noise`` > 0 or ``test_cases`` > 0 the split matters to the files, so it is also written to
``splits.json`` ({"train": [...], "dev": [...], "test": [...]}): pass it to ``kdcli prepare brats --splits``.

Extra test cases (``test_cases`` = N > 0): N more cases from a disjoint case stream (seed, test index), all in
the test split, byte-identical whatever ``cases`` is, so a fixed large test set can sit beside training sets of
every size. They keep the release's layout with ids from a reserved range (2018/2019 TCIA ids 700-999, 2020
``BraTS20_Training_5001...``, 2021 ``BraTS2021_90000...``, 2023 ``BraTS-GLI-90000-000...``); every third is LGG.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
from scipy import ndimage

from kdcli.extras import require
from kdcli.shards.format import atomic_write_bytes
from kdcli.synth._options import seed_field, takes, workers_field

NAMINGS = ("2018", "2019", "2020", "2021", "2023")
SEQUENCES = ("t1", "t1ce", "t2", "flair")  # canonical names; file suffixes per naming in _suffixes()
MISNAMED_2020 = "W39_1998.09.19_Segm.nii"
NOISE = 0.04  # Gaussian noise sigma relative to white matter
FOR_NIFTI = "the BraTS NIfTI phantom"
# The control's fixed table: sequence -> (WM, GM, CSF, oedema shift in noise sigmas, necrosis/NET level, ET level)
CONTRAST: dict[str, tuple[float, float, float, float, float, float]] = {
    "t1": (1.00, 0.72, 0.30, -0.50, 0.72, 0.86),
    "t1ce": (1.00, 0.76, 0.30, 0.25, 0.50, 1.70),
    "t2": (1.00, 1.30, 2.60, 22.0, 2.20, 1.50),
    "flair": (1.00, 1.15, 0.35, 16.0, 1.30, 1.40),
}
CONTRAST_FIELDS = ("wm", "gm", "csf", "oedema_shift_sigma", "necrosis", "enhancing")
ENHANCING_THRESHOLD = 0.2  # shared design: a tumour enhances iff its enhancement latent reaches this
MAX_TEST_CASES = 1000  # the reserved id ranges hold this many (extra test cases and unlabeled ones together)
UNLABELED_DIR = "unlabeled"  # <out>/unlabeled/: cases without label files
CLEAN_LABELS = "clean_labels"  # prepare walks every folder, but these file names match no BraTS suffix
SPLITS_FILE = "splits.json"
SPLIT_SEED = 0  # prepare's default --split-seed: without test cases the phantom's split is prepare's default one
_TEST_NUMBER = {"2020": 5001, "2021": 90000, "2023": 90000}  # first id number of the extra test cases
_WM_LEVEL = {"t1": 500.0, "t1ce": 600.0, "t2": 900.0, "flair": 400.0}  # output units of white matter
_FOV = (240.0, 240.0, 155.0)  # mm, the real BraTS grid at 1 mm
_BRAIN_AXES = (68.0, 84.0, 60.0)  # brain semi-axes, mm (x left-right, y front-back, z up-down)
_BRAIN_CENTRE = (0.0, 4.0, -4.0)  # mm from the grid centre
_WM_EDGE = 0.86  # white matter inside this normalised brain radius, grey matter outside
_HGG_INST = ("2013", "CBICA", "TCIA01", "TCIA02", "TCIA03", "TCIA04", "TCIA05", "TCIA06", "TCIA08")
_LGG_INST = ("2013", "TCIA09", "TCIA10", "TCIA12", "TCIA13")
# Stream tags. A numpy SeedSequence ignores trailing zeros ([s, 1] == [s, 1, 0]): every key ends in a tag >= 1.
_MAIN, _TEST = 1, 2  # case keys: (seed, _MAIN, k) for the main cases, (seed, _TEST, j) for the extra test cases
_ANATOMY, _BIOLOGY, _RATER = 1, 2, 7
_NUISANCE = {name: 3 + i for i, name in enumerate(SEQUENCES)}  # 3..6
_CONTROL_TEST, _CONTROL_TEST_GRADE = 9, 8  # the control's single stream and enhancement draw of a test case


@dataclass(frozen=True)
class Job:
    """One case to render; everything it draws comes from its own keys, so workers cannot change a byte."""

    root: str
    folder: str  # relative to root
    files: dict[str, str]  # canonical name -> file name
    key: tuple[int, ...]  # the case's stream key
    control_key: tuple[int, ...]  # the control's single stream (today's (seed, k) for the main cases)
    size: int
    depth: int
    naming: str
    grade: str
    independent: bool
    control_enhancing: bool  # the control's enhancement (from the grade, as today)
    first_lgg: bool  # shared design: the set's first LGG never enhances
    rater: float  # rater-noise strength for this case: label_noise on train cases, 0 elsewhere
    clean_file: str | None  # where the clean label map goes (relative to root) when rater > 0


# ---------------------------------------------------------------- naming


def _suffixes(naming: str) -> dict[str, str]:
    if naming == "2023":
        return {"t1": "-t1n.nii.gz", "t1ce": "-t1c.nii.gz", "t2": "-t2w.nii.gz", "flair": "-t2f.nii.gz",
                "seg": "-seg.nii.gz"}
    ext = ".nii" if naming == "2020" else ".nii.gz"
    return {name: f"_{name}{ext}" for name in (*SEQUENCES, "seg")}


def _grades(cases: int, naming: str, seed: int) -> list[str]:
    n_lgg = round(cases / 3)
    grades = ["HGG"] * (cases - n_lgg) + ["LGG"] * n_lgg  # HGG block then LGG block, as the listings go
    if naming in ("2021", "2023"):  # no grade in these releases: the phantom's grades are spread out
        grades = [grades[i] for i in np.random.default_rng([seed, 11]).permutation(cases)]
    return grades


def _legacy_ids(grades: list[str], seed: int) -> list[str]:
    """<INST>_<N> cores of 2017-2019 ids: 2013_<small int>, CBICA_<3 letters>, TCIAxx_<3 digits>; unique."""
    rng = np.random.default_rng([seed, 12])
    seen: set[str] = set()
    ids = []
    for g in grades:
        while True:
            inst = str(rng.choice(_HGG_INST if g == "HGG" else _LGG_INST))
            if inst == "2013":
                num = str(int(rng.integers(0, 36)))
            elif inst == "CBICA":
                num = "A" + "".join(chr(65 + int(c)) for c in rng.integers(0, 26, 2))
            else:
                num = str(int(rng.integers(100, 660)))
            if f"{inst}_{num}" not in seen:
                break
        seen.add(f"{inst}_{num}")
        ids.append(f"{inst}_{num}")
    return ids


def _plan(cases: int, naming: str, seed: int) -> tuple[list[str], list[str], list[str]]:
    """(case ids, folders relative to out, grades)."""
    grades = _grades(cases, naming, seed)
    if naming in ("2018", "2019"):
        prefix = "Brats18" if naming == "2018" else "BraTS19"
        ids = [f"{prefix}_{core}_1" for core in _legacy_ids(grades, seed)]
        return ids, [f"{g}/{i}" for g, i in zip(grades, ids, strict=True)], grades
    if naming == "2020":
        ids = [f"BraTS20_Training_{k + 1:03d}" for k in range(cases)]
        return ids, [f"MICCAI_BraTS2020_TrainingData/{i}" for i in ids], grades
    rng = np.random.default_rng([seed, 13])
    nums = np.concatenate([[0], np.cumsum(rng.integers(1, 4, cases - 1))]).astype(int)  # gaps, like the real ids
    if naming == "2021":
        ids = [f"BraTS2021_{n:05d}" for n in nums]
    else:  # 2023: now and then a follow-up scan of the previous subject, "-001"
        ids, subj, tp = [], int(nums[0]), 0
        for k in range(cases):
            if k and rng.random() < 0.15:
                tp += 1
            else:
                subj, tp = int(nums[k]), 0
            ids.append(f"BraTS-GLI-{subj:05d}-{tp:03d}")
    return ids, list(ids), grades


def _test_plan(count: int, naming: str, seed: int) -> tuple[list[str], list[str], list[str]]:
    """(ids, folders, grades) of the extra test cases: a function of (count, naming, seed) only, and each case's
    id of (its index, naming, seed) only, so the test set is the same whatever the number of main cases."""
    grades = ["LGG" if j % 3 == 2 else "HGG" for j in range(count)]
    if naming in ("2018", "2019"):
        prefix = "Brats18" if naming == "2018" else "BraTS19"
        rng = np.random.default_rng([seed, 3, 1])  # TCIA numbers 700-999: the main ids use 100-659
        seen: set[str] = set()
        ids = []
        for g in grades:
            insts = [i for i in (_HGG_INST if g == "HGG" else _LGG_INST) if i.startswith("TCIA")]
            while True:
                core = f"{insts[int(rng.integers(len(insts)))]}_{int(rng.integers(700, 1000))}"
                if core not in seen:
                    break
            seen.add(core)
            ids.append(f"{prefix}_{core}_1")
        return ids, [f"{g}/{i}" for g, i in zip(grades, ids, strict=True)], grades
    first = _TEST_NUMBER[naming]
    if naming == "2020":
        ids = [f"BraTS20_Training_{first + j}" for j in range(count)]
        return ids, [f"MICCAI_BraTS2020_TrainingData/{i}" for i in ids], grades
    if naming == "2021":
        ids = [f"BraTS2021_{first + j:05d}" for j in range(count)]
    else:
        ids = [f"BraTS-GLI-{first + j:05d}-000" for j in range(count)]
    return ids, list(ids), grades


def _name_mapping(path: Path, ids: list[str], grades: list[str], seed: int, extra: list[tuple[str, str]]) -> None:
    cores = _legacy_ids(grades, seed)
    n_new = len(ids) // 8  # the newest subjects have no 2017-2019 id, as in the real table
    rows = [["Grade", "BraTS_2017_subject_ID", "BraTS_2018_subject_ID", "BraTS_2019_subject_ID",
             "BraTS_2020_subject_ID"]]
    for k, (i, g, c) in enumerate(zip(ids, grades, cores, strict=True)):
        old = ["NA"] * 3 if k >= len(ids) - n_new else [f"Brats17_{c}_1", f"Brats18_{c}_1", f"BraTS19_{c}_1"]
        rows.append([g, *old, i])
    rows += [[g, "NA", "NA", "NA", i] for i, g in extra]  # the extra test cases: subjects new in 2020
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


# ---------------------------------------------------------------- anatomy


def _spline_matrix(n: int, m: int) -> np.ndarray:
    """(n, m) weights of a cubic B-spline that spreads m coarse knots over n voxels (rows sum to 1)."""
    t = (np.arange(n) + 0.5) * m / n - 0.5
    i0 = np.floor(t).astype(int)
    mat = np.zeros((n, m))
    for off in (-1, 0, 1, 2):
        x = np.abs(t - (i0 + off))
        w = np.where(x < 1, 2 / 3 - x**2 + x**3 / 2, np.where(x < 2, (2 - x) ** 3 / 6, 0.0))
        np.add.at(mat, (np.arange(n), np.clip(i0 + off, 0, m - 1)), w)
    return mat


def _smooth(rng: np.random.Generator, shape: tuple[int, ...], vox: np.ndarray, cell_mm: float) -> np.ndarray:
    """Unit-variance smooth noise, correlation length ~`cell_mm`: a coarse random grid through a separable
    cubic B-spline (tensor products: cheap even at 240 x 240 x 155, unlike ndimage.zoom)."""
    coarse = tuple(max(3, int(np.ceil(n * v / cell_mm)) + 1) for n, v in zip(shape, vox, strict=True))
    field = rng.standard_normal(coarse)
    for axis, n in enumerate(shape):  # contract one axis at a time, smallest arrays first
        field = np.moveaxis(np.tensordot(_spline_matrix(n, coarse[axis]), field, axes=(1, axis)), 0, axis)
    field = field.astype(np.float32)
    field -= field.mean()
    return field / max(float(field.std()), 1e-6)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _place_tumour(rng: np.random.Generator, r_ed: float) -> np.ndarray:
    """A centre (mm) whose bounding sphere of the irregular oedema lies inside the white matter."""
    axes = np.asarray(_BRAIN_AXES) * (_WM_EDGE - 0.06)
    for _ in range(400):
        c = rng.uniform(-1, 1, 3) * axes
        reach = 1.45 * r_ed  # stretch 1.15 x irregularity 1/(1 - 0.3), rounded up
        if np.sum(((np.abs(c) + reach) / axes) ** 2) <= 1:
            return c
        r_ed *= 0.995  # rare: shrink the search slowly rather than fail
    return np.zeros(3)


@dataclass
class _Anatomy:
    vox: np.ndarray
    coords: tuple[np.ndarray, np.ndarray, np.ndarray]  # broadcastable x, y, z in mm from the brain centre
    brain: np.ndarray
    tissue: np.ndarray  # 1 WM, 2 GM, 3 CSF (0 outside)
    texture: np.ndarray


def _anatomy(rng: np.random.Generator, shape: tuple[int, int, int]) -> _Anatomy:
    vox = np.asarray(_FOV) / shape
    px, py, pz = (((np.arange(n, dtype=np.float32) - (n - 1) / 2) * v - c)
                  for n, v, c in zip(shape, vox, _BRAIN_CENTRE, strict=True))
    px, py, pz = px[:, None, None], py[None, :, None], pz[None, None, :]
    ax, ay, az = _BRAIN_AXES
    rb = np.sqrt((px / ax) ** 2 + (py / ay) ** 2 + (pz / az) ** 2) * (1 + 0.03 * _smooth(rng, shape, vox, 30.0))
    brain = rb < 1
    w = rb + 0.025 * _smooth(rng, shape, vox, 12.0)  # wavy grey/white boundary
    tissue = np.where(w < _WM_EDGE, 1, 2).astype(np.uint8)
    tissue[rb > 0.975] = 3
    for side in (-1, 1):  # lateral ventricles: long, narrow, either side of the midline
        vent = ((px - side * 8.0) / 5.0) ** 2 + ((py - 6.0) / 24.0) ** 2 + ((pz - 6.0) / 9.0) ** 2 < 1
        tissue[vent] = 3
    texture = 1 + (0.25 * NOISE) * _smooth(rng, shape, vox, 10.0)
    return _Anatomy(vox, (px, py, pz), brain, tissue, texture)


# ---------------------------------------------------------------- tumour: latent, geometry, labels


@dataclass
class _Tumour:
    d_out: np.ndarray  # implicit distance (mm) of the oedema body: inside where < radii[0]
    d_in: np.ndarray  # of the core: ET inside radii[1], necrosis inside radii[2]
    inner: np.ndarray  # the core's smooth field (also its texture)
    radii: tuple[float, float, float]  # oedema, enhancing rim, necrosis (mm)
    enhancing: bool
    fingers: list[np.ndarray] = field(default_factory=list)  # oedema fingers (boolean masks, white matter)


def _radii(rng: np.random.Generator, vox: np.ndarray, necrosis: tuple[float, float] = (0.4, 0.65)
           ) -> tuple[float, float, float]:
    """Oedema, rim and necrosis radii (mm), kept resolvable on coarse grids: a core and a rim >= ~1 voxel.
    `necrosis`: the range of the necrosis radius as a fraction of the rim's."""
    v = float(vox.max())
    r_ed = float(rng.uniform(14, 24))
    r_et = r_ed * float(rng.uniform(0.45, 0.65))
    r_nc = max(r_et * float(rng.uniform(*necrosis)), 0.9 * v)
    r_et = max(r_et, r_nc + 0.9 * v)
    r_ed = max(r_ed, r_et + 1.2 * v)
    return r_ed, r_et, r_nc


def _body(rng: np.random.Generator, anatomy: _Anatomy, r_ed: float, shape: tuple[int, int, int],
          irregularity: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Centre, oedema and core implicit distances, and the core's smooth field of a rotated, stretched ellipsoid."""
    px, py, pz = anatomy.coords
    centre = _place_tumour(rng, r_ed)
    rot = _rotation(rng) / rng.uniform(0.87, 1.15, 3)  # rotated, stretched ellipsoid
    dx, dy, dz = px - centre[0], py - centre[1], pz - centre[2]
    d = np.sqrt(sum((rot[0, i] * dx + rot[1, i] * dy + rot[2, i] * dz) ** 2 for i in range(3)))
    outer = np.clip(_smooth(rng, shape, anatomy.vox, 16.0), -2, 2)  # oedema is the most irregular
    inner = np.clip(_smooth(rng, shape, anatomy.vox, 10.0), -2, 2)
    return centre, d * (1 + irregularity * outer), d * (1 + 0.1 * inner), inner


def _control_tumour(rng: np.random.Generator, anatomy: _Anatomy, shape: tuple[int, int, int],
                    enhancing: bool) -> _Tumour:
    """Today's tumour, drawn from the case's one stream in today's order (so the control keeps its bytes)."""
    radii = _radii(rng, anatomy.vox)
    _, d_out, d_in, inner = _body(rng, anatomy, radii[0], shape, 0.15)
    return _Tumour(d_out, d_in, inner, radii, enhancing)


def _draw_latent(rng: np.random.Generator, grade: str, first_lgg: bool) -> dict:
    """The case's tumour biology u, drawn before anything else of the biology stream (the same draws whatever
    the grade, so the stream stays aligned)."""
    draw = rng.random(4)
    if grade == "HGG":
        enhancement = 0.25 + 0.75 * draw[0]
    else:  # LGG: a third below the threshold; the set's first LGG always (so every set has a non-enhancing case)
        enhancement = 0.6 * draw[0] / (3.0 if first_lgg else 1.0)
    infiltration = float(draw[3])
    return {"enhancement": float(enhancement), "enhancing": bool(enhancement >= ENHANCING_THRESHOLD),
            "liquefaction": float(draw[1]), "water": float(draw[2]), "infiltration": infiltration,
            "fingers": int(round(3 * infiltration))}


def shared_contrast(latent: dict) -> dict[str, tuple[float, float, float, float, float, float]]:
    """The shared design's contrast table of one case (fields as CONTRAST): strong in T1/T2/FLAIR whatever the
    latent, weak and varying with it in T1ce."""
    e, q, w = latent["enhancement"], latent["liquefaction"], latent["water"]
    et_t1ce = 1.05 + 0.65 * max(e - ENHANCING_THRESHOLD, 0.0) / (1 - ENHANCING_THRESHOLD)
    return {
        "t1": (1.00, 0.72, 0.30, -(0.3 + 0.4 * w), 0.72 - 0.1 * q, 0.86),
        "t1ce": (1.00, 0.76, 0.30, 0.25 + 1.25 * w, 0.95 - 0.45 * q, et_t1ce),
        "t2": (1.00, 1.30, 2.60, 18.0 + 8.0 * w, 2.2 + 0.2 * q, 1.50),
        "flair": (1.00, 1.15, 0.35, 13.0 + 6.0 * w, 1.3 - 0.1 * q, 1.40),
    }


def _shared_tumour(rng: np.random.Generator, anatomy: _Anatomy, shape: tuple[int, int, int],
                   latent: dict) -> tuple[_Tumour, dict]:
    """The geometry of the latent u (biology stream, after u): radii, body, then the oedema fingers."""
    # Necrosis 0.5-0.8 of the rim's radius (12-51% of the core's volume, as in glioblastoma; the control's
    # 0.4-0.65 leaves a few voxels of it at coarse grids, too few for any model to learn what necrosis looks like).
    r_ed, r_et, r_nc = _radii(rng, anatomy.vox, (0.5, 0.8))
    infiltration = latent["infiltration"]
    centre, d_out, d_in, inner = _body(rng, anatomy, r_ed, shape, 0.10 + 0.10 * infiltration)
    px, py, pz = anatomy.coords
    dx, dy, dz = px - centre[0], py - centre[1], pz - centre[2]
    r2 = dx**2 + dy**2 + dz**2
    radius = max(3.0, 0.7 * float(anatomy.vox.max()))
    fingers = []
    body = (d_out < r_ed) & anatomy.brain
    white = anatomy.brain & (anatomy.tissue == 1)  # infiltration follows white matter, stops at the cortex
    for _ in range(latent["fingers"]):
        direction = rng.standard_normal(3)
        direction /= max(float(np.linalg.norm(direction)), 1e-9)
        end = r_ed + r_ed * (0.3 + 0.4 * infiltration) * float(rng.uniform(0.7, 1.0))
        along = dx * direction[0] + dy * direction[1] + dz * direction[2]
        across = np.sqrt(np.maximum(r2 - along**2, 0))
        finger = (along > 0) & (along < end) & (across < radius * (1 - 0.5 * along / end)) & white
        # A finger crossing a ventricle would go on beyond it: keep only what stays connected to the body.
        pieces, _ = ndimage.label(finger | body, structure=np.ones((3, 3, 3)))
        fingers.append(finger & np.isin(pieces, np.unique(pieces[body])))
    geometry = {"oedema_radius_mm": r_ed, "rim_radius_mm": r_et, "necrosis_radius_mm": r_nc}
    return _Tumour(d_out, d_in, inner, (r_ed, r_et, r_nc), latent["enhancing"], fingers), geometry


@dataclass
class _Rater:
    """One rater's systematic and local boundary errors and the fingers they miss."""

    scales: tuple[float, float, float]  # oedema, rim, necrosis radius factors
    wobble: np.ndarray  # local multiplicative factor on every boundary
    kept: list[bool]  # per finger


def _draw_rater(rng: np.random.Generator, rho: float, shape: tuple[int, int, int], vox: np.ndarray,
                fingers: int) -> _Rater:
    scales = tuple(float(1 + 0.3 * rho * s) for s in rng.uniform(-1, 1, 3))
    wobble = 1 + 0.15 * rho * np.clip(_smooth(rng, shape, vox, 12.0), -2, 2)
    kept = [bool(u >= rho) for u in rng.random(fingers)]
    return _Rater(scales, wobble, kept)  # type: ignore[arg-type]


def _label_map(tumour: _Tumour, brain: np.ndarray, rater: _Rater | None = None) -> np.ndarray:
    """Labels (ET = 4) of the geometry, as drawn (rater None) or as a rater outlines it."""
    r_ed, r_et, r_nc = tumour.radii
    labels = np.zeros(brain.shape, np.uint8)
    if rater is None:
        oedema, rim, necrosis = tumour.d_out < r_ed, tumour.d_in < r_et, tumour.d_in < r_nc
        kept = [True] * len(tumour.fingers)
    else:
        s_ed, s_et, s_nc = rater.scales
        oedema = tumour.d_out < r_ed * s_ed * rater.wobble
        rim = tumour.d_in < r_et * s_et * rater.wobble
        necrosis = tumour.d_in < r_nc * s_nc * rater.wobble
        kept = rater.kept
    for finger, keep in zip(tumour.fingers, kept, strict=True):
        if keep:
            oedema = oedema | finger
    labels[oedema] = 2
    labels[rim] = 4 if tumour.enhancing else 1
    labels[necrosis] = 1
    labels[~brain] = 0
    return labels


def _render_sequence(levels: tuple[float, ...], anatomy: _Anatomy, tissue: np.ndarray, labels: np.ndarray,
                     inner: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One sequence of the case: tissue levels, tumour regions, then the nuisance (bias, noise, gain) from `rng`."""
    wm, gm, csf, shift, ncr, et = levels
    shape = labels.shape
    img = np.choose(tissue, np.array([0.0, wm, gm, csf], np.float32)) * anatomy.texture
    img[labels == 2] += shift * NOISE
    img[labels == 1] = ncr * (1 + 0.03 * inner[labels == 1])
    img[labels == 4] = et * (1 + 0.03 * inner[labels == 4])
    img *= np.exp(0.06 * _smooth(rng, shape, anatomy.vox, 80.0))
    img += NOISE * rng.standard_normal(shape, dtype=np.float32)
    img *= rng.uniform(0.8, 1.2)
    return np.where(anatomy.brain, img, 0).astype(np.float32)


def _displaced(tissue: np.ndarray, labels: np.ndarray) -> np.ndarray:
    tissue = tissue.copy()
    tissue[(labels > 0) & (tissue == 3)] = 1  # the mass displaces CSF
    return tissue


@dataclass
class _Case:
    images: dict[str, np.ndarray]
    labels: np.ndarray  # what the seg file holds (the rater's map on noisy train cases)
    clean: np.ndarray  # the geometry's own map
    brain: np.ndarray
    latent: dict | None
    contrast: dict[str, tuple[float, ...]]
    rater: _Rater | None
    fingers: int


def _shared_case(job: Job, shape: tuple[int, int, int]) -> _Case:
    rng = lambda tag: np.random.default_rng([*job.key, tag])  # noqa: E731
    biology = rng(_BIOLOGY)
    latent = _draw_latent(biology, job.grade, job.first_lgg)
    anatomy = _anatomy(rng(_ANATOMY), shape)
    tumour, geometry = _shared_tumour(biology, anatomy, shape, latent)
    clean = _label_map(tumour, anatomy.brain)
    tissue = _displaced(anatomy.tissue, clean)
    contrast = shared_contrast(latent)
    images = {name: _render_sequence(contrast[name], anatomy, tissue, clean, tumour.inner, rng(_NUISANCE[name]))
              for name in SEQUENCES}
    rater = None
    if job.rater > 0:  # drawn after the pixels, which never see it
        rater = _draw_rater(rng(_RATER), job.rater, shape, anatomy.vox, len(tumour.fingers))
    labels = clean if rater is None else _label_map(tumour, anatomy.brain, rater)
    return _Case(images, labels, clean, anatomy.brain, {**latent, **geometry}, contrast, rater, len(tumour.fingers))


def _control_case(job: Job, shape: tuple[int, int, int]) -> _Case:
    rng = np.random.default_rng(list(job.control_key))
    anatomy = _anatomy(rng, shape)
    tumour = _control_tumour(rng, anatomy, shape, job.control_enhancing)
    clean = _label_map(tumour, anatomy.brain)
    rater = None
    if job.rater > 0:  # the control renders the rater's map: its labels stay exactly the pixels' geometry
        rater = _draw_rater(np.random.default_rng([*job.key, _RATER]), job.rater, shape, anatomy.vox, 0)
    labels = clean if rater is None else _label_map(tumour, anatomy.brain, rater)
    tissue = _displaced(anatomy.tissue, labels)
    images = {name: _render_sequence(CONTRAST[name], anatomy, tissue, labels, tumour.inner, rng)
              for name in SEQUENCES}
    return _Case(images, labels, clean, anatomy.brain, None, dict(CONTRAST), rater, 0)


# ---------------------------------------------------------------- writing


def affine(shape: tuple[int, int, int]) -> np.ndarray:
    """BraTS-style affine: x and y flipped, y origin at the far edge, voxel size = 240x240x155 mm / shape."""
    vox = np.asarray(_FOV) / shape
    a = np.diag([-vox[0], -vox[1], vox[2], 1.0])
    a[1, 3] = (shape[1] - 1) * vox[1]
    return a


def _nifti_bytes(arr: np.ndarray, aff: np.ndarray, gz: bool) -> bytes:
    nib = require("nibabel", "mri", FOR_NIFTI)

    img = nib.Nifti1Image(arr, aff)
    img.header.set_xyzt_units("mm", "sec")
    img.set_sform(aff, code=1)
    img.set_qform(aff, code=1)
    raw = img.to_bytes()
    # nibabel's own .gz writer stamps the time: gzip here with mtime 0 (and no file name) for identical bytes.
    return gzip.compress(raw, compresslevel=6, mtime=0) if gz else raw


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def _render(job: Job) -> dict:
    shape = (job.size, job.size, job.depth)
    case = _control_case(job, shape) if job.independent else _shared_case(job, shape)
    int16 = job.naming in ("2018", "2019", "2023")
    aff = affine(shape)
    case_dir = Path(job.root) / job.folder
    case_dir.mkdir(parents=True, exist_ok=True)
    for name in SEQUENCES:
        scaled = np.rint(case.images[name] * _WM_LEVEL[name])
        scaled[case.brain] = np.maximum(scaled[case.brain], 1)  # skull-stripped: 0 means outside the brain only
        arr = scaled.astype(np.int16) if int16 else scaled.astype(np.float32)
        atomic_write_bytes(case_dir / job.files[name], _nifti_bytes(arr, aff, job.files[name].endswith(".gz")))
    labels, clean = case.labels.copy(), case.clean.copy()
    if job.naming == "2023":
        labels[labels == 4] = 3
        clean[clean == 4] = 3
    seg = job.files["seg"]
    atomic_write_bytes(case_dir / seg, _nifti_bytes(labels, aff, seg.endswith(".gz")))
    zs = np.flatnonzero(labels.any((0, 1)))
    result: dict = {"labels": np.unique(labels).tolist(), "tumour_slices": [int(zs[0]), int(zs[-1])] if zs.size else [],
                    "latent": case.latent,
                    "contrast": {name: dict(zip(CONTRAST_FIELDS, case.contrast[name], strict=True))
                                 for name in SEQUENCES}}
    if case.rater is not None and job.clean_file is not None:
        atomic_write_bytes(Path(job.root) / job.clean_file, _nifti_bytes(clean, aff, job.clean_file.endswith(".gz")))
        et = 3 if job.naming == "2023" else 4
        regions = {"wt": (1, 2, et), "tc": (1, et), "et": (et,)}
        result["rater"] = {
            **{f"dice_{r}": _dice(np.isin(labels, v), np.isin(clean, v)) for r, v in regions.items()},
            "scales": dict(zip(("oedema", "rim", "necrosis"), case.rater.scales, strict=True)),
            "fingers_dropped": case.fingers - sum(case.rater.kept),
        }
    return result


def _main_splits(ids: list[str], extra_tests: int) -> list[str]:
    """The main cases' splits: prepare's default split (0.7/0.1/0.2 by patient, split seed 0), or train/dev
    only (0.875/0.125) when the extra test cases are the test split."""
    from kdcli.sources.brats import SPLIT_TAG, patient_of
    from kdcli.sources.splits import split_groups

    ratios = (0.875, 0.125, 0.0) if extra_tests else (0.7, 0.1, 0.2)
    by_patient = split_groups([patient_of(i) for i in ids], ratios, SPLIT_SEED, tag=SPLIT_TAG)
    return [by_patient[patient_of(i)] for i in ids]


@dataclass
class BratsSynthOptions:
    """BraTS NIfTI phantoms: a per-case tumour latent rendered strongly in T1/T2/FLAIR, faintly in T1ce."""

    out_help: ClassVar[str] = "Folder to write, in the chosen release's layout."

    cases: int = field(default=12, metadata={"help": "Cases (patients)."})
    size: int = field(default=64, metadata={"help": "In-plane side (240 = real BraTS; depth follows 240:155)."})
    naming: str = field(default="2021", metadata={
        "help": "2018 (HGG/LGG), 2019, 2020 (with its misnamed label), 2021 or 2023 (t1n/t1c/t2w/t2f, ET=3)."})
    seed: int = seed_field()
    workers: int = workers_field()
    label_noise: float = field(default=0.0, metadata={
        "help": "Rater noise 0-1 on the TRAIN cases' label files (boundary dilation/erosion, dropped oedema "
                "fingers); clean maps go to clean_labels/."})
    test_cases: int = field(default=0, metadata={
        "help": "Extra test cases, identical whatever --cases is (a fixed test set across training sizes)."})
    independent: bool = field(default=False, metadata={
        "help": "Negative control: fixed contrasts, no shared latent, labels exactly the pixels' geometry."})
    unlabeled: int = field(default=0, metadata={
        "help": "Cases without label files in OUT/unlabeled/ (as validation data ship), for prepare --unlabeled."})

    def report(self, summary: dict, out: Path) -> list[str]:
        counts = {split: len(ids) for split, ids in summary["splits"].items()}
        lines = [f"wrote {len(summary['cases'])} cases ({self.naming} naming, {summary['design']} design; "
                 f"{counts['train']}/{counts['dev']}/{counts['test']} train/dev/test) to {out}"]
        if summary["splits_file"]:
            lines.append(f"prepare with --splits {out / summary['splits_file']} (the noisy labels and extra test "
                         "cases depend on this split)")
        if self.unlabeled:
            lines.append(f"{self.unlabeled} unlabeled cases in {out / 'unlabeled'}: prepare with --unlabeled "
                         f"{out / 'unlabeled'}")
        return lines


@takes(BratsSynthOptions)
def synth_brats(
    out: Path,
    cases: int = 12,
    size: int = 64,
    depth: int | None = None,
    naming: str = "2021",
    seed: int = 0,
    workers: int = 1,
    label_noise: float = 0.0,
    independent: bool = False,
    test_cases: int = 0,
    unlabeled: int = 0,
) -> dict:
    """Write `cases` BraTS-like cases (and `test_cases` extra test cases) under `out` in the layout of release
    `naming` (2018, 2019, 2020, 2021, 2023); see the module docstring for the generative story.

    `unlabeled`: that many more cases in `<out>/unlabeled/`, four sequences and no label file (as BraTS
    validation data ship): `prepare brats RAW --unlabeled RAW/unlabeled` reads them as unlabeled training cases.
    `label_noise` (0-1): rater noise on the train cases' label files. `independent`: the negative control
    (today's fixed-contrast design). Returns {"root", "naming", "design" ("shared" or "independent"),
    "label_noise", "cases": [{"id", "folder" (relative to root), "grade", "split", "test_case", "labels" (values
    present in the seg file), "tumour_slices" ([first, last] axial index), "files" ({t1, t1ce, t2, flair, seg:
    path relative to root}), "latent" (u; None for the control), "contrast" (per sequence), and on noisy cases
    "clean_seg" (path) and "rater" (Dice vs clean per region, boundary scales, fingers dropped)}],
    "splits" ({train, dev, test: ids}), "splits_file" (relative path or None), "label_values", "sequences"
    ({t1, t1ce, t2, flair, seg: file suffix})}. Files depend only on the arguments (not on `workers`); the same
    arguments give byte-identical files.
    """
    if naming not in NAMINGS:
        raise ValueError(f"naming must be one of {list(NAMINGS)}, got {naming!r}")
    if cases < 1:
        raise ValueError(f"cases must be >= 1, got {cases}")
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    depth = max(8, round(size * 155 / 240)) if depth is None else depth
    if depth < 8:
        raise ValueError(f"depth must be >= 8, got {depth}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")  # numpy SeedSequence rejects negative entropy
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    label_noise = float(label_noise)
    if not (math.isfinite(label_noise) and 0.0 <= label_noise <= 1.0):
        raise ValueError(f"label_noise must be between 0 and 1, got {label_noise}")
    if not 0 <= test_cases <= MAX_TEST_CASES:
        raise ValueError(f"test_cases must be between 0 and {MAX_TEST_CASES}, got {test_cases}")
    if not 0 <= unlabeled <= MAX_TEST_CASES - test_cases:
        raise ValueError(f"unlabeled must be between 0 and {MAX_TEST_CASES - test_cases} (with test_cases="
                         f"{test_cases}), got {unlabeled}")
    out = Path(out)
    suffixes = _suffixes(naming)
    ids, folders, grades = _plan(cases, naming, seed)
    # the unlabeled cases continue the reserved stream of the extra test cases (the first test_cases stay as they are)
    test_ids, test_folders, test_grades = _test_plan(test_cases + unlabeled, naming, seed)
    pool_folders = [Path(folder).name for folder in test_folders[test_cases:]]
    clash = sorted(set(ids) & set(test_ids))
    if clash:
        raise ValueError(f"cases={cases} reaches the ids reserved for the extra test cases ({clash[0]}); "
                         "use fewer cases or no test_cases")
    splits = _main_splits(ids, test_cases) + ["test"] * test_cases + ["unlabeled"] * unlabeled
    test_folders = test_folders[:test_cases] + pool_folders
    seg_ext = ".nii" if naming == "2020" else ".nii.gz"
    control_lgg = np.random.default_rng([seed, 14])  # the control's enhancement draws, as today
    lgg_seen, jobs = False, []
    every = list(zip(ids + test_ids, folders + test_folders, grades + test_grades, splits, strict=True))
    for k, (case_id, folder, grade, split) in enumerate(every):
        is_test = k >= cases
        j = k - cases
        first_lgg = grade == "LGG" and not lgg_seen and not is_test
        if is_test:
            enhancing = grade == "HGG" or bool(np.random.default_rng([seed, _TEST, j, _CONTROL_TEST_GRADE]).random()
                                                >= 0.35)
        else:
            enhancing = True
            if grade == "LGG":  # the first LGG never enhances, later ones sometimes
                enhancing = lgg_seen and bool(control_lgg.random() >= 0.35)
                lgg_seen = True
        files = {name: f"{case_id}{suf}" for name, suf in suffixes.items()}
        if naming == "2020" and not is_test and k + 1 == (355 if cases >= 355 else cases):
            files["seg"] = MISNAMED_2020
        rho = label_noise if split == "train" else 0.0
        jobs.append(Job(
            root=str(out / UNLABELED_DIR if split == "unlabeled" else out), folder=folder, files=files,
            key=(seed, _TEST, j) if is_test else (seed, _MAIN, k),
            control_key=(seed, _TEST, j, _CONTROL_TEST) if is_test else (seed, k),
            size=size, depth=depth, naming=naming, grade=grade, independent=bool(independent),
            control_enhancing=enhancing, first_lgg=first_lgg, rater=rho,
            clean_file=f"{CLEAN_LABELS}/{case_id}{seg_ext}" if rho > 0 else None,
        ))
    require("nibabel", "mri", FOR_NIFTI)  # before anything is written
    out.mkdir(parents=True, exist_ok=True)
    if naming == "2020":
        (out / "MICCAI_BraTS2020_TrainingData").mkdir(exist_ok=True)
        _name_mapping(out / "MICCAI_BraTS2020_TrainingData" / "name_mapping.csv", ids, grades, seed,
                      list(zip(test_ids[:test_cases], test_grades[:test_cases], strict=True)))
    if label_noise > 0:
        (out / CLEAN_LABELS).mkdir(exist_ok=True)
    if workers > 1:
        with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
            results = list(pool.map(_render, jobs))
    else:
        results = [_render(job) for job in jobs]
    summary = []
    for k, ((case_id, folder, grade, split), job, res) in enumerate(zip(every, jobs, results, strict=True)):
        files = {name: f"{folder}/{fn}" for name, fn in job.files.items()}
        if split == "unlabeled":  # rendered like every case; its label file is not shipped
            (Path(job.root) / job.folder / job.files["seg"]).unlink()
            folder = f"{UNLABELED_DIR}/{folder}"
            files = {name: f"{folder}/{fn}" for name, fn in job.files.items() if name != "seg"}
        row = {"id": case_id, "folder": folder, "grade": grade, "split": split,
               "test_case": k >= cases and split == "test", **res, "files": files}
        if job.clean_file is not None:
            row["clean_seg"] = job.clean_file
        summary.append(row)
    split_lists = {s: [c["id"] for c in summary if c["split"] == s] for s in ("train", "dev", "test")}
    splits_file = None
    if label_noise > 0 or test_cases > 0:  # the split now shapes the files: prepare must use this one
        splits_file = SPLITS_FILE
        atomic_write_bytes(out / SPLITS_FILE, (json.dumps(split_lists, indent=1) + "\n").encode())
    et = 3 if naming == "2023" else 4
    return {"root": str(out), "naming": naming, "design": "independent" if independent else "shared",
            "label_noise": label_noise, "cases": summary, "splits": split_lists, "splits_file": splits_file,
            "label_values": [0, 1, 2, et], "sequences": suffixes}
