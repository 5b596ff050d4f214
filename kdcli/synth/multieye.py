"""Deterministic MultiEYE phantom: fake fundus photos + OCT B-scans in the real xmed-lab/MultiEYE layout.

Every class shows its disease concepts clearly in OCT and only faintly in fundus, so an OCT teacher is strong
and a fundus-only student is weak but above chance -- the gap that distillation is meant to close.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from kdcli.synth._fundus import fx, vessel_paths

CLASSES = ("NOR", "AMD", "CSC", "DR", "GLC", "MEM", "MYO", "RVO", "WAMD")
SPLITS = ("train", "dev", "test")
MODALITIES = ("fundus", "oct")
# (list root, image folder) as data/dataset.py reads them; every split's images live under train/ImageData.
LAYOUT = {"fundus": ("assemble", "cfp-clahe-224x224"), "oct": ("assemble_oct", "oct-filter-448x448")}
LIST_NAME = "large9cls.txt"
_MOD_ID = {"fundus": 1, "oct": 2}

Job = tuple[str, str, int, int, int, int, float]  # path, modality, label, index, size, seed, fundus_signal


# ---------------------------------------------------------------- planning: names, splits, list files


def _split_counts(n: int) -> dict[str, int]:
    held = max(1, round(0.2 * n))
    return {"train": n - 2 * held, "dev": held, "test": held}


def _eye_name(tag: str, seed: int, k: int) -> str:
    name = f"{tag}-{hashlib.blake2b(f'{seed}:{tag}:{k}'.encode(), digest_size=5).hexdigest()}"
    # Real MultiEYE names carry dots (the official code even shows "<uuid>..png"): breaks naive suffix logic.
    if k % 9 == 4:
        return name + ".1"
    return name + "." if k % 9 == 7 else name


def _plan(per_class: int, seed: int, paired: bool) -> dict[str, list[tuple[str, int, str, int]]]:
    counts = _split_counts(per_class)
    bounds = np.cumsum([counts[s] for s in SPLITS])
    plan: dict[str, list[tuple[str, int, str, int]]] = {}
    for mod in MODALITIES:
        tag = "e" if paired else mod[0]  # paired: one eye, one name, in both modalities
        rows = []
        for label in range(len(CLASSES)):
            # Split assignment ignores the modality, so paired eyes land in the same split everywhere.
            rank = np.argsort(np.random.default_rng([seed, 7, label]).permutation(per_class))
            for i in range(per_class):
                k = label * per_class + i
                split = SPLITS[int(np.searchsorted(bounds, rank[i], side="right"))]
                rows.append((_eye_name(tag, seed, k), label, split, k))
        plan[mod] = rows
    return plan


def _write_list(path: Path, rows: list[tuple[str, int]], sep: str) -> None:
    # Quirks of the real download: some trailing whitespace and a blank last line.
    lines = [f"{name}{sep}{label}{' ' if j % 6 == 2 else ''}" for j, (name, label) in enumerate(rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n\n")


# ---------------------------------------------------------------- drawing helpers


def _disc_mask(shape: tuple[int, int], cx: float, cy: float, r: float, edge: float = 1.0) -> np.ndarray:
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return np.clip((r - np.hypot(xx - cx, yy - cy)) / edge + 0.5, 0.0, 1.0).astype(np.float32)


def _spots(shape: tuple[int, int], pts: np.ndarray, radii: np.ndarray) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    for (x, y), r in zip(np.round(pts * 16).astype(int), np.round(radii * 16).astype(int), strict=True):
        cv2.circle(m, (int(x), int(y)), max(int(r), 12), 255, -1, cv2.LINE_AA, shift=4)
    return m.astype(np.float32) / 255.0



def _blend(img: np.ndarray, mask: np.ndarray, color: tuple[float, float, float], alpha: float) -> None:
    img += (mask * alpha)[..., None] * (np.asarray(color, np.float32) - img)



# ---------------------------------------------------------------- fundus photo


def _fundus(rng: np.random.Generator, label: int, s: int, signal: float) -> np.ndarray:
    cls, a = CLASSES[label], 0.25 * signal  # `a`: how visible the concepts are in fundus
    c = (s / 2 + rng.normal(0, 0.025 * s, 2)).astype(np.float32)  # float32 throughout: 2x faster
    r = np.float32(s * rng.uniform(0.43, 0.48))
    side = int(rng.choice([-1, 1]))
    disc = c + [side * 0.55 * r + rng.normal(0, 0.03 * r), rng.normal(0, 0.06 * r)]
    mac = c + [-side * 0.12 * r + rng.normal(0, 0.04 * r), rng.normal(0, 0.04 * r)]
    yy, xx = np.mgrid[:s, :s].astype(np.float32)
    rr = np.hypot(xx - c[0], yy - c[1]) / r
    grad = rng.normal(0, 0.15, 2).astype(np.float32)
    tilt = 1 + grad[0] * (xx - c[0]) / r + grad[1] * (yy - c[1]) / r
    illum = rng.uniform(0.75, 1.15) * (1 - 0.35 * rr**2) * tilt
    base = np.array([0.8, 0.36, 0.15], np.float32) * rng.uniform(0.9, 1.1, 3).astype(np.float32)
    img = (illum[..., None] * base).astype(np.float32)
    img *= 1 - 0.35 * np.exp(-((np.hypot(xx - mac[0], yy - mac[1]) / (0.13 * r)) ** 2))[..., None]
    if cls == "MYO":  # tessellation: choroidal vessels showing through a thin pigment layer
        noise = cv2.resize(rng.random((9, 9)).astype(np.float32), (s, s), interpolation=cv2.INTER_CUBIC)
        _blend(img, (np.abs(noise - 0.5) > 0.08).astype(np.float32), (0.45, 0.16, 0.08), 0.6 * a)
    paths = vessel_paths(rng, disc, r, side)
    vmask = np.zeros((s, s), np.uint8)
    for i, p in enumerate(paths):
        width = max(1, round((0.018 if i % 2 == 0 else 0.011) * s))
        cv2.polylines(vmask, [np.round(p * 16).astype(np.int32)], False, 255, width, cv2.LINE_AA, shift=4)
    img *= 1 - (vmask.astype(np.float32) / 255)[..., None] * np.array([0.35, 0.6, 0.5], np.float32)
    dr = 0.13 * r * rng.uniform(0.9, 1.1)
    cdr = rng.uniform(0.25, 0.45) + (signal * rng.uniform(0.08, 0.2) if cls == "GLC" else 0.0)
    _blend(img, _disc_mask((s, s), *disc, dr), (1.0, 0.85, 0.55), 0.8)
    _blend(img, _disc_mask((s, s), *disc, min(cdr, 0.9) * dr), (1.0, 0.97, 0.85), 0.8)
    near_mac = mac + rng.normal(0, 0.18 * r, (16, 2))
    if cls == "AMD":  # drusen
        n = int(rng.integers(6, 16))
        _blend(img, _spots((s, s), near_mac[:n], rng.uniform(0.025, 0.05, n) * r), (0.95, 0.85, 0.35), a)
    elif cls == "CSC":  # serous detachment: round darker-yellow patch
        patch = _disc_mask((s, s), *(near_mac[0] * 0.3 + mac * 0.7), rng.uniform(0.13, 0.2) * r, 3)
        _blend(img, patch, (0.7, 0.5, 0.15), 1.2 * a)
    elif cls == "DR":  # dot haemorrhages anywhere, exudates near the macula
        n = int(rng.integers(6, 16))
        dots = c + rng.uniform(-0.65, 0.65, (n, 2)) * r
        _blend(img, _spots((s, s), dots, rng.uniform(0.02, 0.04, n) * r), (0.35, 0.02, 0.02), a)
        _blend(img, _spots((s, s), near_mac[:6], rng.uniform(0.02, 0.035, 6) * r), (0.95, 0.9, 0.4), a)
    elif cls == "MEM":  # cellophane sheen: thin bright wavy arcs around the macula
        m = np.zeros((s, s), np.uint8)
        for _ in range(int(rng.integers(3, 6))):
            ax, ang = fx(rng.uniform(0.12, 0.3, 2) * r), rng.uniform(0, 180)
            cv2.ellipse(m, fx(mac), ax, ang, 0, 200, 255, 1, cv2.LINE_AA, 4)
        _blend(img, m.astype(np.float32) / 255, (1.0, 1.0, 0.95), 0.5 * a)
    elif cls == "MYO":  # peripapillary atrophy crescent on the temporal side of the disc
        m = np.zeros((s, s), np.uint8)
        ctr, ax = fx(disc), fx([dr * 1.35] * 2)
        start = 90 if side == 1 else -90
        cv2.ellipse(m, ctr, ax, 0, start, start + 180, 255, max(1, round(0.5 * dr)), cv2.LINE_AA, 4)
        _blend(img, m.astype(np.float32) / 255, (0.95, 0.85, 0.7), 0.6 * a)
    elif cls == "RVO":  # flame haemorrhages along one (blocked) vein branch
        p = paths[2 * int(rng.integers(0, 2))]
        m = np.zeros((s, s), np.uint8)
        for j in range(3, len(p) - 1):
            d = p[j + 1] - p[j] + rng.normal(0, 0.02 * r, 2)
            ctr, ax = fx(p[j] + rng.normal(0, 0.03 * r, 2)), fx([0.07 * r, max(0.02 * r, 1.0)])
            ang = float(np.degrees(np.arctan2(d[1], d[0])))  # flame-shaped: elongated along the vessel
            cv2.ellipse(m, ctr, ax, ang, 0, 360, 255, -1, cv2.LINE_AA, 4)
        _blend(img, m.astype(np.float32) / 255, (0.45, 0.03, 0.02), 1.2 * a)
    elif cls == "WAMD":  # grey-green CNV membrane with a rim of haemorrhage
        rad = rng.uniform(0.1, 0.16) * r
        ctr = near_mac[0] * 0.3 + mac * 0.7
        inner = _disc_mask((s, s), *ctr, rad, 2)
        _blend(img, _disc_mask((s, s), *ctr, rad * 1.35, 2) - inner, (0.4, 0.03, 0.02), 0.7 * a)
        _blend(img, inner, (0.42, 0.48, 0.33), 0.7 * a)
    img += 0.025 * rng.standard_normal(img.shape, dtype=np.float32)
    img = cv2.GaussianBlur(img, (3, 3), 0.6) * _disc_mask((s, s), *c, r, 1.5)[..., None]
    return np.clip(img[..., ::-1] * 255 + 0.5, 0, 255).astype(np.uint8)  # RGB -> BGR for cv2.imwrite


# ---------------------------------------------------------------- OCT B-scan

# Reflectivity across the neuroretina below the RNFL, by relative depth: GCL, IPL, INL, OPL, ONL, EZ, OS.
_RETINA_D = np.array([0.0, 0.25, 0.35, 0.5, 0.6, 0.86, 0.9, 0.94, 1.0], np.float32)
_RETINA_V = np.array([0.45, 0.55, 0.22, 0.5, 0.15, 0.15, 0.7, 0.3, 0.4], np.float32)


def _bumps(x: np.ndarray, centers: np.ndarray, widths: np.ndarray, heights: np.ndarray) -> np.ndarray:
    return (heights * np.exp(-(((x[:, None] - centers) / widths) ** 2))).sum(1).astype(np.float32)


def _oct(rng: np.random.Generator, label: int, s: int) -> np.ndarray:
    cls = CLASSES[label]
    x = (np.arange(s, dtype=np.float32) + 0.5) / s
    y = x[:, None]
    side = int(rng.choice([0, 1]))  # which edge the optic disc is on
    fovea_x = 0.5 + rng.normal(0, 0.05)
    curv = rng.uniform(0.7, 1.0) if cls == "MYO" else rng.uniform(0.05, 0.35)
    depth = rng.uniform(0.62, 0.7) if cls == "MYO" else rng.uniform(0.5, 0.6)
    bm = depth + rng.normal(0, 0.06) * (x - fovea_x) - curv * (x - fovea_x) ** 2  # Bruch's membrane
    thick = rng.uniform(0.19, 0.24) * {"MYO": 0.65, "RVO": rng.uniform(1.4, 1.7)}.get(cls, 1.0)
    pit = rng.uniform(0.4, 0.6) * (0.3 if cls in ("MEM", "RVO") else 1.0)
    nerve = np.exp(-(((x - side) / 0.1) ** 2))  # proximity to the disc
    t = thick * (1 - pit * np.exp(-(((x - fovea_x) / 0.07) ** 2))) + (0.03 if cls == "RVO" else 0.0) * nerve
    rnfl = (0.012 + 0.035 * np.abs(x - (1 - side))) * (0.3 if cls == "GLC" else 1.0) * (t / thick)
    # Disc-side excavation: the whole retina dips, and the inner surface dips far more (cupping).
    cup = rng.uniform(0.14, 0.22) if cls == "GLC" else rng.uniform(0.0, 0.03)
    cup = cup * np.exp(-(((x - side) / 0.14) ** 2))
    bm = bm + 0.5 * cup
    elev = np.zeros(s, np.float32)  # RPE lifted off Bruch's membrane (drusen, PED)
    srf = np.zeros(s, np.float32)  # neuroretina lifted off the RPE (subretinal fluid)
    sub_val = 0.5
    if cls == "AMD":
        n = int(rng.integers(4, 9))
        elev = _bumps(x, rng.uniform(0.2, 0.8, n), rng.uniform(0.02, 0.05, n), rng.uniform(0.03, 0.055, n))
    elif cls == "CSC":
        srf = _bumps(x, fovea_x + rng.normal(0, 0.05, 1), rng.uniform(0.08, 0.15, 1), rng.uniform(0.05, 0.09, 1))
    elif cls == "WAMD":
        sub_val, cx = 0.14, fovea_x + rng.normal(0, 0.05)
        elev = _bumps(x, np.array([cx]), rng.uniform(0.06, 0.1, 1), rng.uniform(0.06, 0.1, 1))
        beside = cx + rng.choice([-1, 1]) * rng.uniform(0.1, 0.15, 1)
        srf = _bumps(x, beside, np.array([0.06]), rng.uniform(0.02, 0.05, 1))
    rpe_th = 0.022
    rpe = bm - rpe_th - elev
    bot = rpe - srf
    top = bot - t + cup
    if cls == "MEM":
        top = top + 0.012 * np.sin(x * rng.uniform(40, 70) + rng.uniform(0, 6))
    img = np.full((s, s), 0.03, np.float32)  # vitreous
    rel = (y - top - rnfl) / np.maximum(bot - top - rnfl, 1e-3)
    inside = (y >= top) & (y < bot)
    img = np.where(inside, np.interp(rel, _RETINA_D, _RETINA_V), img)
    img = np.where(inside & (y < top + rnfl), 0.8, img)
    img = np.where((y >= bot) & (y < rpe), 0.04, img)  # subretinal fluid
    img = np.where((y >= rpe) & (y < rpe + rpe_th), 0.95, img)
    img = np.where((y >= rpe + rpe_th) & (y < bm), sub_val, img)  # drusen material / PED
    chor = (y - bm) / (rng.uniform(0.1, 0.16) * (0.4 if cls == "MYO" else 1.0))
    img = np.where(y >= bm, 0.03 + 0.4 * np.exp(-(np.maximum(chor, 0) ** 2)), img).astype(np.float32)
    lesions = np.zeros((s, s), np.uint8)  # intraretinal cysts: 255 = dark fluid pocket
    if cls in ("DR", "RVO"):
        n = int(rng.integers(3, 7)) * (2 if cls == "RVO" else 1)
        for cx in rng.uniform(0.2, 0.8, n):
            j = min(int(cx * s), s - 1)
            cy = top[j] + rng.uniform(0.35, 0.65) * (bot[j] - top[j])
            ax = fx([rng.uniform(0.015, 0.035) * s + 0.5, rng.uniform(0.012, 0.03) * s + 0.5])
            cv2.ellipse(lesions, fx([cx * s, cy * s]), ax, 0, 0, 360, 255, -1, cv2.LINE_AA, 4)
    img *= 1 - 0.9 * (lesions.astype(np.float32) / 255) * inside
    bright = np.zeros((s, s), np.uint8)
    if cls == "DR":  # hard exudates: hyperreflective dots in the outer plexiform layer
        for cx in rng.uniform(0.2, 0.8, int(rng.integers(3, 7))):
            j = min(int(cx * s), s - 1)
            cy = top[j] + 0.55 * (bot[j] - top[j])
            cv2.circle(bright, fx([cx * s, cy * s]), fx(0.015 * s + 0.5), 255, -1, cv2.LINE_AA, 4)
    elif cls == "MEM":  # the membrane: a bright wrinkled line just above the inner retina
        lo, hi = sorted(rng.uniform(0.1, 0.9, 2))
        xs = np.linspace(min(lo, 0.3), max(hi, 0.7), 40)
        ys = np.interp(xs, x, top) - 0.015 + 0.008 * np.sin(xs * rng.uniform(30, 60))
        pts = np.round(np.stack([xs, ys], 1) * s * 16).astype(np.int32)
        cv2.polylines(bright, [pts], False, 255, max(1, round(0.02 * s)), cv2.LINE_AA, shift=4)
    elif cls == "WAMD":  # hyperreflective CNV mass sitting on the PED
        j = int(np.argmax(elev))
        ctr = fx([x[j] * s, (rpe[j] - 0.02) * s])
        ax = fx([rng.uniform(0.05, 0.08) * s, rng.uniform(0.02, 0.035) * s])
        cv2.ellipse(bright, ctr, ax, float(rng.uniform(-15, 15)), 0, 360, 255, -1, cv2.LINE_AA, 4)
    img = np.maximum(img, 0.85 * bright.astype(np.float32) / 255)
    img = img * rng.uniform(0.8, 1.2) * rng.gamma(4.0, 1 / 4.0, (s, s)).astype(np.float32)  # speckle
    return np.clip(cv2.GaussianBlur(img, (3, 3), 0.5) + rng.normal(0, 0.02, (s, s)), 0, 1).astype(np.float32)


# ---------------------------------------------------------------- writing


def _render(job: Job) -> None:
    path, mod, label, k, size, seed, signal = job
    rng = np.random.default_rng([seed, _MOD_ID[mod], k])
    if mod == "fundus":
        img = _fundus(rng, label, size, signal)
        if k % 8 == 6:  # a wide photo: the round retina between black side bands
            pad = round(size * 1.25) - size
            img = cv2.copyMakeBorder(img, 0, 0, pad // 2, pad - pad // 2, cv2.BORDER_CONSTANT, value=0)
    else:
        g = _oct(rng, label, size)
        # A few scanners export 16-bit greyscale.
        img = (g * 65535 + 0.5).astype(np.uint16) if k % 8 == 5 else (g * 255 + 0.5).astype(np.uint8)
    if not cv2.imwrite(path, img):
        raise OSError(f"cv2 could not write {path}")


def synth_multieye(
    out: Path,
    *,
    per_class: int = 20,
    size: int = 128,
    seed: int = 0,
    paired: bool = False,
    fundus_signal: float = 1.0,
    workers: int = 1,
) -> dict:
    """Write a fake MultiEYE dataset (fundus + OCT, 9 classes) under `out` in the official on-disk layout.

    `per_class` images per class per modality, split train/dev/test 60/20/20 (at least one each);
    `fundus_signal` scales how visible the disease concepts are in fundus (OCT always shows them clearly).
    Output depends only on the arguments (not on `workers`).
    Returns {"root": str, "counts": {modality: {split: n}}, "classes": [...]}.
    """
    if per_class < 3:
        raise ValueError(f"per_class must be >= 3 (one image per split per class), got {per_class}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")  # numpy SeedSequence rejects negative entropy
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    out = Path(out)
    jobs: list[Job] = []
    counts: dict[str, dict[str, int]] = {}
    for mod, rows in _plan(per_class, seed, paired).items():
        root, folder = LAYOUT[mod]
        img_dir = out / root / "train" / "ImageData" / folder
        img_dir.mkdir(parents=True, exist_ok=True)
        counts[mod] = {}
        for si, split in enumerate(SPLITS):
            sel = [(name, label) for name, label, sp, _ in rows if sp == split]
            order = np.random.default_rng([seed, 8, _MOD_ID[mod], si]).permutation(len(sel))
            sep = "\t" if (mod == "oct" and split == "test") else " "  # as in the real download
            _write_list(out / root / split / LIST_NAME, [sel[i] for i in order], sep)
            counts[mod][split] = len(sel)
        jobs += [(str(img_dir / f"{n}.png"), mod, lb, k, size, seed, fundus_signal) for n, lb, _, k in rows]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_render, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    else:
        for job in jobs:
            _render(job)
    return {"root": str(out), "counts": counts, "classes": list(CLASSES)}
