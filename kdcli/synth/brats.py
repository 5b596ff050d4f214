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

Anatomy (seeded by (seed, case index) only): an ellipsoidal brain with a smoothly perturbed surface, white
matter inside a ~7 mm grey-matter band, a thin CSF rim and two lateral ventricles, a faint smooth tissue
texture (0.25 noise sigma). One glioma per case, sitting in white matter as most do, at a random place and size
(oedema radius 14-24 mm, rotated and stretched, radii perturbed by smooth noise): necrotic / non-enhancing core
(label 1) inside an enhancing rim (label 4, or 3 for 2023) inside oedema (label 2). The brain never fills the
top and bottom slices and the tumour fills only part of the brain, so tumour-free slices always exist.
LGG-like cases without enhancement exist: the first LGG case of a set always lacks ET, later ones with
probability 0.35 (~15-20% of all cases); HGG always enhance.

Contrast, per sequence, relative to white matter = 1, with Gaussian noise sigma = 0.04 (so 1 sigma = 0.04) on
top of a smooth multiplicative bias field (exp(0.06 * unit smooth noise), ~+-6%) and a gain (0.8-1.2) per case
and sequence:

=========  =====  =====  =====  ================  ==============  =====
sequence   WM     GM     CSF    oedema (shift)    necrosis (1)    ET
=========  =====  =====  =====  ================  ==============  =====
T1         1.00   0.72   0.30   -0.50 sigma       0.72            0.86
T1ce       1.00   0.76   0.30   +0.25 sigma       0.50            1.70
T2         1.00   1.30   2.60   +22 sigma (1.88)  2.20            1.50
FLAIR      1.00   1.15   0.35   +16 sigma (1.64)  1.30            1.40
=========  =====  =====  =====  ================  ==============  =====

Oedema is the underlying tissue plus the shift; under the tumour CSF is displaced (mass effect). So the teacher
sees the whole tumour (WT) clearly in FLAIR and T2, while on T1ce alone the enhancing rim (+17 sigma) and the
dark core make ET and TC easy and the oedema boundary is only a 0.25-sigma shift: faint on purpose, the gap
that distillation from the 4-sequence teacher should close.
"""

from __future__ import annotations

import csv
import gzip
import io
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from kdcli.shards.format import atomic_write_bytes

NAMINGS = ("2018", "2019", "2020", "2021", "2023")
SEQUENCES = ("t1", "t1ce", "t2", "flair")  # canonical names; file suffixes per naming in _suffixes()
MISNAMED_2020 = "W39_1998.09.19_Segm.nii"
NOISE = 0.04  # Gaussian noise sigma relative to white matter
# sequence -> (WM, GM, CSF, oedema shift in noise sigmas, necrosis/NET level, ET level), see the table above
CONTRAST: dict[str, tuple[float, float, float, float, float, float]] = {
    "t1": (1.00, 0.72, 0.30, -0.50, 0.72, 0.86),
    "t1ce": (1.00, 0.76, 0.30, 0.25, 0.50, 1.70),
    "t2": (1.00, 1.30, 2.60, 22.0, 2.20, 1.50),
    "flair": (1.00, 1.15, 0.35, 16.0, 1.30, 1.40),
}
_WM_LEVEL = {"t1": 500.0, "t1ce": 600.0, "t2": 900.0, "flair": 400.0}  # output units of white matter
_FOV = (240.0, 240.0, 155.0)  # mm, the real BraTS grid at 1 mm
_BRAIN_AXES = (68.0, 84.0, 60.0)  # brain semi-axes, mm (x left-right, y front-back, z up-down)
_BRAIN_CENTRE = (0.0, 4.0, -4.0)  # mm from the grid centre
_WM_EDGE = 0.86  # white matter inside this normalised brain radius, grey matter outside
_HGG_INST = ("2013", "CBICA", "TCIA01", "TCIA02", "TCIA03", "TCIA04", "TCIA05", "TCIA06", "TCIA08")
_LGG_INST = ("2013", "TCIA09", "TCIA10", "TCIA12", "TCIA13")

# out root, folder (relative), {canonical name: file name}, case index, seed, size, depth, enhancing, naming
Job = tuple[str, str, dict[str, str], int, int, int, int, bool, str]


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


def _name_mapping(path: Path, ids: list[str], grades: list[str], seed: int) -> None:
    cores = _legacy_ids(grades, seed)
    n_new = len(ids) // 8  # the newest subjects have no 2017-2019 id, as in the real table
    rows = [["Grade", "BraTS_2017_subject_ID", "BraTS_2018_subject_ID", "BraTS_2019_subject_ID",
             "BraTS_2020_subject_ID"]]
    for k, (i, g, c) in enumerate(zip(ids, grades, cores, strict=True)):
        old = ["NA"] * 3 if k >= len(ids) - n_new else [f"Brats17_{c}_1", f"Brats18_{c}_1", f"BraTS19_{c}_1"]
        rows.append([g, *old, i])
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


def _phantom(
    rng: np.random.Generator, shape: tuple[int, int, int], enhancing: bool
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Float images (white matter ~1 x gain, before output scaling), labels (ET = 4) and brain mask of a case."""
    vox = np.asarray(_FOV) / shape
    px, py, pz = (((np.arange(n, dtype=np.float32) - (n - 1) / 2) * v - c)
                  for n, v, c in zip(shape, vox, _BRAIN_CENTRE, strict=True))
    px, py, pz = px[:, None, None], py[None, :, None], pz[None, None, :]
    ax, ay, az = _BRAIN_AXES
    rb = np.sqrt((px / ax) ** 2 + (py / ay) ** 2 + (pz / az) ** 2) * (1 + 0.03 * _smooth(rng, shape, vox, 30.0))
    brain = rb < 1
    w = rb + 0.025 * _smooth(rng, shape, vox, 12.0)  # wavy grey/white boundary
    tissue = np.where(w < _WM_EDGE, 1, 2).astype(np.uint8)  # 1 WM, 2 GM, 3 CSF
    tissue[rb > 0.975] = 3
    for side in (-1, 1):  # lateral ventricles: long, narrow, either side of the midline
        vent = ((px - side * 8.0) / 5.0) ** 2 + ((py - 6.0) / 24.0) ** 2 + ((pz - 6.0) / 9.0) ** 2 < 1
        tissue[vent] = 3
    texture = 1 + (0.25 * NOISE) * _smooth(rng, shape, vox, 10.0)

    # Tumour radii (mm), kept resolvable on coarse grids: a core and a rim at least ~1 voxel thick.
    v = float(vox.max())
    r_ed = float(rng.uniform(14, 24))
    r_et = r_ed * float(rng.uniform(0.45, 0.65))
    r_nc = max(r_et * float(rng.uniform(0.4, 0.65)), 0.9 * v)
    r_et = max(r_et, r_nc + 0.9 * v)
    r_ed = max(r_ed, r_et + 1.2 * v)
    centre = _place_tumour(rng, r_ed)
    rot = _rotation(rng) / rng.uniform(0.87, 1.15, 3)  # rotated, stretched ellipsoid
    dx, dy, dz = px - centre[0], py - centre[1], pz - centre[2]
    d = np.sqrt(sum((rot[0, i] * dx + rot[1, i] * dy + rot[2, i] * dz) ** 2 for i in range(3)))
    outer = np.clip(_smooth(rng, shape, vox, 16.0), -2, 2)  # oedema is the most irregular
    inner = np.clip(_smooth(rng, shape, vox, 10.0), -2, 2)
    labels = np.zeros(shape, np.uint8)
    labels[d * (1 + 0.15 * outer) < r_ed] = 2
    d_in = d * (1 + 0.1 * inner)
    labels[d_in < r_et] = 4 if enhancing else 1
    labels[d_in < r_nc] = 1
    labels[~brain] = 0
    tumour = labels > 0
    tissue[tumour & (tissue == 3)] = 1  # the mass displaces CSF

    images = {}
    for name in SEQUENCES:
        wm, gm, csf, shift, ncr, et = CONTRAST[name]
        img = np.choose(tissue, np.array([0.0, wm, gm, csf], np.float32)) * texture
        img[labels == 2] += shift * NOISE
        img[labels == 1] = ncr * (1 + 0.03 * inner[labels == 1])
        img[labels == 4] = et * (1 + 0.03 * inner[labels == 4])
        img *= np.exp(0.06 * _smooth(rng, shape, vox, 80.0))
        img += NOISE * rng.standard_normal(shape, dtype=np.float32)
        img *= rng.uniform(0.8, 1.2)
        images[name] = np.where(brain, img, 0).astype(np.float32)
    return images, labels, brain


# ---------------------------------------------------------------- writing


def affine(shape: tuple[int, int, int]) -> np.ndarray:
    """BraTS-style affine: x and y flipped, y origin at the far edge, voxel size = 240x240x155 mm / shape."""
    vox = np.asarray(_FOV) / shape
    a = np.diag([-vox[0], -vox[1], vox[2], 1.0])
    a[1, 3] = (shape[1] - 1) * vox[1]
    return a




def _nifti_bytes(arr: np.ndarray, aff: np.ndarray, gz: bool) -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(arr, aff)
    img.header.set_xyzt_units("mm", "sec")
    img.set_sform(aff, code=1)
    img.set_qform(aff, code=1)
    raw = img.to_bytes()
    # nibabel's own .gz writer stamps the time: gzip here with mtime 0 (and no file name) for identical bytes.
    return gzip.compress(raw, compresslevel=6, mtime=0) if gz else raw


def _render(job: Job) -> dict:
    root, folder, files, k, seed, size, depth, enhancing, naming = job
    shape = (size, size, depth)
    images, labels, brain = _phantom(np.random.default_rng([seed, k]), shape, enhancing)
    int16 = naming in ("2018", "2019", "2023")
    aff = affine(shape)
    case_dir = Path(root) / folder
    case_dir.mkdir(parents=True, exist_ok=True)
    for name in SEQUENCES:
        scaled = np.rint(images[name] * _WM_LEVEL[name])
        scaled[brain] = np.maximum(scaled[brain], 1)  # skull-stripped: 0 means outside the brain, only there
        arr = scaled.astype(np.int16) if int16 else scaled.astype(np.float32)
        atomic_write_bytes(case_dir / files[name], _nifti_bytes(arr, aff, files[name].endswith(".gz")))
    if naming == "2023":
        labels[labels == 4] = 3
    seg = files["seg"]
    atomic_write_bytes(case_dir / seg, _nifti_bytes(labels, aff, seg.endswith(".gz")))
    zs = np.flatnonzero(labels.any((0, 1)))
    return {"labels": np.unique(labels).tolist(), "tumour_slices": [int(zs[0]), int(zs[-1])] if zs.size else []}


def synth_brats(
    out: Path,
    cases: int = 12,
    size: int = 64,
    depth: int | None = None,
    naming: str = "2021",
    seed: int = 0,
    workers: int = 1,
) -> dict:
    """Write `cases` BraTS-like cases under `out` in the layout of release `naming` (2018, 2019, 2020, 2021, 2023).

    Returns {"root", "naming", "cases": [{"id", "folder" (relative to root), "grade", "labels" (values present),
    "tumour_slices" ([first, last] axial index), "files" ({t1, t1ce, t2, flair, seg: path relative to root})}],
    "label_values", "sequences" ({t1, t1ce, t2, flair, seg: file suffix})}. Files depend only on the arguments
    (not on `workers`); the same arguments give byte-identical files.
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
    out = Path(out)
    suffixes = _suffixes(naming)
    ids, folders, grades = _plan(cases, naming, seed)
    rng = np.random.default_rng([seed, 14])
    lgg_seen, jobs = False, []
    for k in range(cases):
        enhancing = True
        if grades[k] == "LGG":  # the first LGG never enhances, later ones sometimes
            enhancing = lgg_seen and bool(rng.random() >= 0.35)
            lgg_seen = True
        files = {name: f"{ids[k]}{suf}" for name, suf in suffixes.items()}
        if naming == "2020" and k + 1 == (355 if cases >= 355 else cases):
            files["seg"] = MISNAMED_2020
        jobs.append((str(out), folders[k], files, k, seed, size, depth, enhancing, naming))
    out.mkdir(parents=True, exist_ok=True)
    if naming == "2020":
        (out / "MICCAI_BraTS2020_TrainingData").mkdir(exist_ok=True)
        _name_mapping(out / "MICCAI_BraTS2020_TrainingData" / "name_mapping.csv", ids, grades, seed)
    if workers > 1:
        with ProcessPoolExecutor(min(workers, cases)) as pool:
            results = list(pool.map(_render, jobs))
    else:
        results = [_render(job) for job in jobs]
    summary = [
        {"id": ids[k], "folder": folders[k], "grade": grades[k], **res,
         "files": {name: f"{folders[k]}/{fn}" for name, fn in jobs[k][2].items()}}
        for k, res in enumerate(results)
    ]
    et = 3 if naming == "2023" else 4
    return {"root": str(out), "naming": naming, "cases": summary, "label_values": [0, 1, 2, et],
            "sequences": suffixes}
