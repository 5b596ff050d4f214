"""Deterministic DR + AMD grading phantoms for SALL (Ju et al., JBHI 2021), in EyePACS/APTOS-like layouts.

SALL trains a DR grader and an AMD grader together although each dataset is labelled for one disease only;
each model's soft predictions on the *other* dataset act as extra labels. That only helps when images of one
set also carry the other disease, as real patients do. So here EVERY eye has both a DR grade and an AMD grade:
in the DR set the DR grade is balanced (`per_class` per grade) and the AMD grade is drawn from a prior, and
the other way round in the AMD set. Only the set's own grade is written to its CSV; the hidden grade is
returned in the summary (for tests and benchmarks) and never written to disk.

Lesions shared by both diseases, as the paper observes: haemorrhage and exudation appear in DR >= 2 (spread
over the retina, all quadrants at grade 3+) and in late AMD (concentrated at the macula).

Calibration (per_class=40, size 128 read at 64 px, timm test_resnet from scratch, 20 epochs, AdamW 3e-3, batch
32, 60/20/20 split, 8 seeds): test accuracy ~0.49 for DR (0.38-0.63) and ~0.63 for AMD (0.47-0.78); the AMD
model applied to DR-set eyes matches their hidden AMD grade ~0.59 of the time (majority-class baseline ~0.4).
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from kdcli.synth._fundus import fx, vessel_paths

DR_GRADES = ("none", "mild", "moderate", "severe", "proliferative")  # 0..4, EyePACS/APTOS
AMD_GRADES = ("none", "early", "intermediate", "late")  # 0..3
# layout -> (labels csv, image column, grade column, image folder), as in the Kaggle downloads
DR_LAYOUTS = {
    "eyepacs": ("trainLabels.csv", "image", "level", "train"),
    "aptos": ("train.csv", "id_code", "diagnosis", "train_images"),
}
# Hidden-grade priors: most eyes have neither disease, as in a screening population.
AMD_PRIOR = (0.4, 0.25, 0.2, 0.15)
DR_PRIOR = (0.4, 0.2, 0.2, 0.1, 0.1)
_SET_ID = {"dr": 1, "amd": 2}

Job = tuple[str, int, int, int, int, int, int]  # path, set id, index, dr grade, amd grade, size, seed

# ---------------------------------------------------------------- drawing helpers



def _disc(yy: np.ndarray, xx: np.ndarray, c: np.ndarray, r: float, edge: float = 1.0) -> np.ndarray:
    return np.clip((r - np.hypot(xx - c[0], yy - c[1])) / edge + 0.5, 0.0, 1.0)


def _spots(s: int, pts: np.ndarray, radii: np.ndarray) -> np.ndarray:
    m = np.zeros((s, s), np.uint8)
    for p, rad in zip(pts, radii, strict=True):
        cv2.circle(m, fx(p), max(fx(rad), 10), 255, -1, cv2.LINE_AA, shift=4)
    return m.astype(np.float32) / 255.0


def _blend(img: np.ndarray, mask: np.ndarray, color: tuple[float, float, float], alpha: float) -> None:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size:  # work on the lesion's bounding box only: most masks cover a few percent of the image
        box = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
        img[box] += (mask[box] * np.float32(alpha))[..., None] * (np.asarray(color, np.float32) - img[box])


def _in_retina(rng: np.random.Generator, c: np.ndarray, r: float, n: int, lo: float, hi: float) -> np.ndarray:
    # Uniform over an annulus (area-uniform radius): lesions land in all four quadrants.
    rad = r * np.sqrt(rng.uniform(lo**2, hi**2, n))
    th = rng.uniform(0, 2 * np.pi, n)
    return c + np.stack([rad * np.cos(th), rad * np.sin(th)], 1)



# ---------------------------------------------------------------- lesions

_HAEM, _EXUD, _DRUSEN = (0.32, 0.03, 0.02), (0.98, 0.86, 0.3), (0.95, 0.88, 0.55)


def _dr_lesions(
    rng: np.random.Generator,
    img: np.ndarray,
    g: int,
    c: np.ndarray,
    r: float,
    disc: np.ndarray,
    paths: list[np.ndarray],
    red: np.ndarray,
) -> None:
    s = img.shape[0]
    # Counts overlap between neighbouring grades on purpose: grading is learnable, not a lookup.
    n_ma = int(rng.integers(*((0, 1), (6, 13), (8, 16), (12, 24), (12, 24))[g]))
    n_blot = int(rng.integers(*((0, 1), (0, 1), (3, 8), (10, 20), (10, 20))[g]))
    n_ex = int(rng.integers(*((0, 1), (0, 1), (2, 7), (4, 10), (4, 10))[g]))
    pts = _in_retina(rng, c, r, n_ma + n_blot, 0.15, 0.88)
    rad = np.concatenate([rng.uniform(0.024, 0.036, n_ma), rng.uniform(0.035, 0.065, n_blot)]) * r
    red += _spots(s, pts, rad) * rng.uniform(0.8, 1.0)
    if n_ex:  # hard exudates come in small clusters (leaking capillary beds)
        hubs = _in_retina(rng, c, r, 2, 0.2, 0.75)
        ex = hubs[rng.integers(0, 2, n_ex)] + rng.normal(0, 0.07 * r, (n_ex, 2))
        _blend(img, _spots(s, ex, rng.uniform(0.018, 0.032, n_ex) * r), _EXUD, rng.uniform(0.6, 0.9))
    if g >= 3:  # venous beading: sausage-like dark swellings along a stretch of a main vein
        m = np.zeros((s, s), np.uint8)
        for k in rng.choice(4, 2, replace=False):
            p = paths[2 * k]
            j = int(rng.integers(2, len(p) - 4))
            seg = p[j] + (p[j + 3] - p[j]) * np.linspace(0, 1, 7)[:, None]
            for q, w in zip(seg, 0.025 * r * (1 + 0.6 * (np.arange(7) % 2)), strict=True):
                cv2.circle(m, fx(q), max(fx(w), 10), 255, -1, cv2.LINE_AA, shift=4)
        red += m.astype(np.float32) / 255 * 0.6
    if g == 4:  # neovascular tufts: fine irregular loops at the disc, and a boat-shaped pre-retinal bleed
        m = np.zeros((s, s), np.uint8)
        for _ in range(int(rng.integers(2, 4))):
            ctr = disc + rng.normal(0, 0.12 * r, 2)
            th = np.linspace(0, 2 * np.pi, 9) + rng.normal(0, 0.3, 9)
            loop = ctr + (0.06 * r * rng.uniform(0.6, 1.4, (9, 1))) * np.stack([np.cos(th), np.sin(th)], 1)
            pts = np.round(loop * 16).astype(np.int32)
            cv2.polylines(m, [pts], True, 255, max(1, round(0.012 * s)), cv2.LINE_AA, 4)
        _blend(img, m.astype(np.float32) / 255, (0.55, 0.04, 0.05), 0.8)
        b = np.zeros((s, s), np.uint8)
        ctr, ax = _in_retina(rng, c, r, 1, 0.35, 0.7)[0], fx(rng.uniform(0.18, 0.28, 2) * r)
        cv2.ellipse(b, fx(ctr), ax, 0, 0, 180, 255, -1, cv2.LINE_AA, 4)  # flat top: blood settles
        red += b.astype(np.float32) / 255 * 0.9


def _amd_lesions(
    rng: np.random.Generator,
    img: np.ndarray,
    g: int,
    mac: np.ndarray,
    r: float,
    red: np.ndarray,
    yy: np.ndarray,
    xx: np.ndarray,
) -> None:
    s = img.shape[0]
    # Grade 0 still may show a few tiny hard drusen (normal ageing, "no AMD" in AREDS): 0 vs 1 is by size.
    n_tiny = int(rng.integers(0, 4)) if g == 0 else 0
    n_small = int(rng.integers(*((0, 1), (5, 12), (3, 8), (0, 5))[g]))
    n_large = int(rng.integers(*((0, 1), (0, 1), (5, 11), (0, 4))[g]))
    pts = mac + rng.normal(0, 0.13 * r, (n_tiny + n_small + n_large, 2))
    rad = (
        np.concatenate(
            [rng.uniform(0.012, 0.02, n_tiny), rng.uniform(0.02, 0.035, n_small), rng.uniform(0.045, 0.075, n_large)]
        )
        * r
    )
    _blend(img, cv2.GaussianBlur(_spots(s, pts, rad), (3, 3), 0.7), _DRUSEN, rng.uniform(0.35, 0.65))
    if g >= 2:  # pigment change: coarse dark/light mottling confined to the macula
        noise = cv2.resize(rng.random((7, 7)).astype(np.float32), (s, s), interpolation=cv2.INTER_CUBIC)
        near = np.exp(-((np.hypot(xx - mac[0], yy - mac[1]) / (0.2 * r)) ** 2))
        a = rng.uniform(0.25, 0.5)
        _blend(img, (noise < 0.35) * near, (0.25, 0.1, 0.04), a)
        _blend(img, (noise > 0.7) * near, (0.95, 0.75, 0.5), 0.6 * a)
    if g == 3:  # CNV: grey-green membrane, a rim of haemorrhage, exudate ring further out
        rad0 = rng.uniform(0.1, 0.16) * r
        ctr = mac + rng.normal(0, 0.04 * r, 2)
        inner = _disc(yy, xx, ctr, rad0, 2)
        red += (_disc(yy, xx, ctr, rad0 * rng.uniform(1.3, 1.6), 2) - inner) * 0.85
        th = rng.uniform(0, 2 * np.pi, 6)
        ring = ctr + rad0 * rng.uniform(1.7, 2.2, (6, 1)) * np.stack([np.cos(th), np.sin(th)], 1)
        _blend(img, _spots(s, ring, rng.uniform(0.015, 0.03, 6) * r), _EXUD, 0.7)
        _blend(img, inner, (0.38, 0.46, 0.4), rng.uniform(0.55, 0.8))


# ---------------------------------------------------------------- fundus photo


def _fundus(rng: np.random.Generator, dr: int, amd: int, s: int) -> np.ndarray:
    c = (s / 2 + rng.normal(0, 0.03 * s, 2)).astype(np.float32)  # float32 throughout: 2x faster
    r = float(s * rng.uniform(0.42, 0.48))
    side = int(rng.choice([-1, 1]))  # left / right eye: disc on either side
    # float32 landmarks too: a float64 scalar would silently promote every full-image array below.
    disc = (c + [side * 0.55 * r + rng.normal(0, 0.03 * r), rng.normal(0, 0.06 * r)]).astype(np.float32)
    mac = (c + [-side * 0.12 * r + rng.normal(0, 0.04 * r), rng.normal(0, 0.04 * r)]).astype(np.float32)
    yy, xx = np.mgrid[:s, :s].astype(np.float32)
    rr = np.hypot(xx - c[0], yy - c[1]) / r
    grad = rng.normal(0, 0.15, 2).astype(np.float32)
    tilt = 1 + grad[0] * (xx - c[0]) / r + grad[1] * (yy - c[1]) / r
    illum = rng.uniform(0.7, 1.15) * (1 - 0.35 * rr**2) * tilt
    base = np.array([0.8, 0.36, 0.15], np.float32) * rng.uniform(0.88, 1.12, 3).astype(np.float32)
    img = (illum[..., None] * base).astype(np.float32)
    img *= 1 - 0.35 * np.exp(-((np.hypot(xx - mac[0], yy - mac[1]) / (0.13 * r)) ** 2))[..., None]
    paths = vessel_paths(rng, disc, r, side)
    vmask = np.zeros((s, s), np.uint8)
    for i, p in enumerate(paths):
        width = max(1, round((0.018 if i % 2 == 0 else 0.011) * s))
        cv2.polylines(vmask, [np.round(p * 16).astype(np.int32)], False, 255, width, cv2.LINE_AA, shift=4)
    img *= 1 - (vmask.astype(np.float32) / 255)[..., None] * np.array([0.35, 0.6, 0.5], np.float32)
    dr_ = 0.13 * r * rng.uniform(0.9, 1.1)
    _blend(img, _disc(yy, xx, disc, dr_), (1.0, 0.85, 0.55), 0.8)
    _blend(img, _disc(yy, xx, disc, rng.uniform(0.25, 0.45) * dr_), (1.0, 0.97, 0.85), 0.8)
    red = np.zeros((s, s), np.float32)  # haemorrhage opacity, from both diseases: blended once at the end
    # Hard cases: a dust speck or a small dark camera artefact on any grade, mimicking a red lesion.
    if rng.random() < 0.3:
        red += _spots(s, _in_retina(rng, c, r, 1, 0.1, 0.9), rng.uniform(0.02, 0.04, 1) * r) * 0.5
    _dr_lesions(rng, img, dr, c, r, disc, paths, red)
    _amd_lesions(rng, img, amd, mac, r, red, yy, xx)
    _blend(img, np.minimum(red, 1.0), _HAEM, 0.85)
    img *= rng.uniform(0.85, 1.15) ** 2  # exposure varies a lot between cameras
    # Sensor noise, std 0.025: uniform is 5x cheaper to draw than normal and the blur below rounds it off anyway.
    img += 0.0866 * (rng.random(img.shape, dtype=np.float32) - 0.5)
    sigma = float(rng.uniform(0.4, 0.9))  # focus varies, too
    img = cv2.GaussianBlur(img, (3, 3), sigma) * _disc(yy, xx, c, r, 1.5)[..., None]
    return np.clip(img[..., ::-1] * 255 + 0.5, 0, 255).astype(np.uint8)  # RGB -> BGR for cv2.imwrite


# ---------------------------------------------------------------- planning and writing


def _names(set_name: str, layout: str, n: int, seed: int) -> list[str]:
    if set_name == "amd":
        return [f"amd_{k + 1:04d}" for k in range(n)]
    if layout == "aptos":  # APTOS id_code: 12 hex digits
        return [hashlib.blake2b(f"{seed}:dr:{k}".encode(), digest_size=6).hexdigest() for k in range(n)]
    return [f"{10 + 3 * (k // 2)}_{('left', 'right')[k % 2]}" for k in range(n)]  # Kaggle: <patient>_<eye>


def _render(job: Job) -> None:
    path, set_id, k, dr, amd, size, seed = job
    img = _fundus(np.random.default_rng([seed, set_id, k]), dr, amd, size)
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if path.endswith(".jpeg") else []
    if not cv2.imwrite(path, img, params):
        raise OSError(f"cv2 could not write {path}")


def synth_fundus_grading(
    out: Path, *, per_class: int = 20, size: int = 128, seed: int = 0, dr_layout: str = "eyepacs", workers: int = 1
) -> dict:
    """Write a DR-graded set (EyePACS or APTOS layout) and an AMD-graded set under `out`.

    Returns {"root": str, "sets": {"dr"|"amd": {"labels": csv path, "images": dir, "counts": [n per grade],
    "hidden": {image name: the other disease's grade}}}}. Output depends only on the arguments (not `workers`).
    """
    if per_class < 3:
        raise ValueError(f"per_class must be >= 3, got {per_class}")
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    if dr_layout not in DR_LAYOUTS:
        raise ValueError(f"dr_layout must be one of {sorted(DR_LAYOUTS)}, got {dr_layout!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")  # numpy SeedSequence rejects negative entropy
    out = Path(out)
    sets = {
        "dr": (*DR_LAYOUTS[dr_layout], ".jpeg" if dr_layout == "eyepacs" else ".png", len(DR_GRADES), AMD_PRIOR),
        "amd": ("labels.csv", "image", "level", "images", ".png", len(AMD_GRADES), DR_PRIOR),
    }
    jobs: list[Job] = []
    summary: dict[str, dict] = {}
    for name, (csv_name, col_img, col_lvl, folder, ext, n_grades, prior) in sets.items():
        sid, n = _SET_ID[name], per_class * n_grades
        own = np.random.default_rng([seed, sid, 1]).permutation(np.repeat(np.arange(n_grades), per_class))
        hidden = np.random.default_rng([seed, sid, 2]).choice(len(prior), size=n, p=prior)
        names = _names(name, dr_layout, n, seed)
        img_dir = out / name / folder
        img_dir.mkdir(parents=True, exist_ok=True)
        rows = [f"{col_img},{col_lvl}"] + [f"{nm},{g}" for nm, g in zip(names, own, strict=True)]
        (out / name / csv_name).write_text("\n".join(rows) + "\n")
        for k in range(n):
            dr, amd = (own[k], hidden[k]) if name == "dr" else (hidden[k], own[k])
            jobs.append((str(img_dir / f"{names[k]}{ext}"), sid, k, int(dr), int(amd), size, seed))
        summary[name] = {
            "labels": str(out / name / csv_name),
            "images": str(img_dir),
            "counts": np.bincount(own, minlength=n_grades).tolist(),
            "hidden": {nm: int(h) for nm, h in zip(names, hidden, strict=True)},
        }
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_render, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    else:
        for job in jobs:
            _render(job)
    return {"root": str(out), "sets": summary}
