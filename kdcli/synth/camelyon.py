"""Deterministic breast core-needle-biopsy WSI phantoms + a BCNB-style clinical sheet, for ALN metastasis (N0 vs N+).

Target: bidirectional distillation with a missing clinical modality (Zhang et al., arXiv 2401.01553) on BCNB
(1,058 patients, one biopsy WSI each, an Excel clinical sheet, ALN status N0 / N+(1-2) / N+(>2), ~62% N0).

Slides. Level 0 is 20x, 0.5 um/px (BCNB was scanned on an Iscan Coreo and read at 200x), `size` x 0.75*size px.
Nuclei, adipocytes and ducts have their real sizes in um at that mpp (a nucleus is 5-12 px across), but the
slide itself is shrunk: the 1-3 core strips span the field, so a 4096 px slide is a 2 mm field, not a 20 mm one.
Each slide is painted in optical density with two slightly jittered stain vectors (haematoxylin, eosin), so
colour varies between slides as between labs: white background (~240), pink eosin stroma with adipocyte holes,
benign ducts (rings of small nuclei), lymphocyte clusters (small, very dark), sparse elongated stromal nuclei,
and 1-5 tumour regions of nests of large, dark, pleomorphic nuclei with coarse chromatin. About a third of the
slides carry a pen stroke (green or blue ink circling tissue) and a quarter an out-of-focus patch. Small slides
keep nuclei at their real size but cap ducts and fat cells at a fraction of the strip width.
Level 0 is rendered in memory, float32 maps of the full slide: peak ~0.9 GB and ~2 s per slide at the default
4096, ~3.5 GB and ~10 s at the 8192 cap, per worker. The reduced levels are area-averaged from level 0.

Formats. "tiff": `slides/<id>.tif`, an Aperio-SVS-style tiled TIFF (256x256 JPEG tiles, YCbCr, levels at
downsample 1, 4, 16) written by tifffile (the [wsi] extra) from tiles cv2 encodes, so imagecodecs is not needed.
The first ImageDescription starts `Aperio Image Library` and carries
`|AppMag = 20|MPP = 0.5`, so OpenSlide (vendor "aperio") reports openslide.objective-power and openslide.mpp-x;
Aperio detection goes by content, so the `.tif` extension is fine. Tumour outlines go to `annotations/<id>.json`.
"bcnb": BCNB's own layout, `WSIs/<n>.jpg` (the full level 0) with `WSIs/<n>.json` next to it. Outlines are
ASAP-style `{"positive": [{"name": "Annotation 0", "vertices": [[x, y], ...]}, ...]}` in level-0 (= jpg) pixels.
Both write `clinical.xlsx` with BCNB's 14 columns (its `Patient ID` is the slide id) and `latents.csv`.
Ids: tiff cnb_0001..., bcnb 1..N; extra test slides cnb_t0001... / 100001...; unlabeled ones cnb_u0001... /
200001..., so neither depends on `slides`.

Generative story (default, "shared" design; what a distillation method can and cannot exploit here)
---------------------------------------------------------------------------------------------------
1. Tumour biology. Every patient draws one latent first, its tumour's aggressiveness b ~ N(0, 1), from a
   random stream keyed by the patient alone (seed, pool, case index) -- never by its label, split or modality.
2. Label. The ALN status is a thresholded score of b: N0 if b < 0.253, N+(1-2) if b < 1.036, else N+(>2) (the
   60 / 25 / 15 % quantiles of N(0, 1)), so patients near b = 0.253 are borderline N0 / N+. Exact class counts
   (round(0.6 n) N0, at least one, round(0.25 n) N+(1-2), the rest N+(>2)) come from drawing patients in stream
   order and keeping each until its class is full (quota sampling: within a class patients are i.i.d. from
   p(b | class)); they are then listed in a seeded shuffled order.
3. Clinical record (what the fusion teacher adds to the slide), strong gain, a small encoding: b enters four
   columns with noise of their own (a clinical stream per patient): log tumour size 0.30 b (+ 0.25 noise),
   Ki67 through sigmoid(-1.3 + 0.7 b + 0.8 noise), grade as thresholds of 0.7 b + 0.8 noise, ER negativity with
   probability sigmoid(-1.7 + 0.6 b); age falls 1 year per unit of b (sd 10). PR, HER2, tumour type follow the
   receptors and their own draws, as before; `Surgical` follows the size. No other column sees b.
4. Slide (the WSI-only student's modality), weak but present gain: the image latent is 0.6 b + 0.8 e, where e
   ~ N(0, 1) is how much of the tumour's biology the needle happened to catch (a sampling stream of its own),
   mapped to the renderer's scale as 0.45 + 1.14 x that (the earlier design's mean and spread); it sets the
   number and size of tumour regions and their nuclear size, darkness, density, pleomorphism and chromatin
   coarseness. Stain, geometry, ducts, lymphocytes, pen and blur come from a slide stream of their own and do
   not depend on anything above. Labels never enter the pixels or the record except through b.
   Every patient, N0 included, has a carcinoma on the biopsy (BCNB is a cohort of breast cancers): N0 is told
   from N+ by the tumour's extent and look, not by its presence.
5. Label noise (`label_noise` = rho, TRAIN patients only): a training patient's listed status is flipped across
   the N0 / N+ boundary (N0 -> N+(1-2), N+ -> N0: the nodal status a sampled axilla can get wrong) with
   probability min(1/2, c exp(-|b - 0.253| / 0.25)), c solved on a reference sample so that rho of the training
   labels flip in expectation: flips favour borderline patients (at rho = 0.1 about 65 % of them have
   |b - 0.253| < 0.25). One draw per patient from a noise stream of its own. Dev and test stay clean; the
   `Number of lymph node metastases` column follows the listed status; `label_noise.csv` lists every flipped
   patient with both labels.
6. Negative control (`independent=True`): the design before this one, modalities independent given the label.
   The same patients, labels, splits and flips (decided on b), but the slide renders a latent b_s and the
   record a latent b_c of their own, each drawn from p(b | clean status) from a stream of its own: each
   modality alone is distributed exactly as in the shared design, and the two share only the class.
   Why: distillation can only add what the labels lack (see the theory note): the fusion teacher's soft labels
   help a WSI-only student when they carry, beyond the label, something the slide also renders (here b, which
   the record shows strongly and the slide faintly), or when training labels are noisy given the slide and
   cleaner given the record. The control removes both (b_c is noise to the slide given the label).

Splits. prepare splits by patient, stratified by N0 / N+ with ratios 0.6 / 0.2 / 0.2 and split seed 0, unless
given `--splits`. The phantom records its split per slide and overall ("split", "splits"): prepare's default
split of the main slides, or 0.75 / 0.25 / 0 train / dev when extra test slides exist. With `label_noise` > 0
or `test_slides` > 0 the split shapes the files, so it is also written to `splits.json` ({"train": [...],
"dev": [...], "test": [...]}, labelled slides only): pass it to `kdcli prepare camelyon --splits`.
Extra test slides (`test_slides` = N): N more patients from a pool of their own (exact class counts as above),
all in test, byte-identical whatever `slides` is: one fixed large test set beside training sets of any size.
Unlabeled slides (`unlabeled` = N): N more patients from a pool of their own in the natural class mix (no quota:
nobody staged their axilla), rendered like every slide, their sheet row complete except `ALN status` and
`Number of lymph node metastases` (empty): what `prepare camelyon` reads as unlabeled training slides.
Side files: `latents.csv` (every patient's b, image and clinical latent, clean and listed status, pool, split),
`label_noise.csv` and `splits.json` when they apply. Same arguments, same bytes (the xlsx included).

Calibration (N0 vs N+ AUCs; 20,000 planned patients, seed 0, the sheet's observed columns -- age, log size, Ki67,
grade, ER, PR, HER2 -- through a logistic regression fitted on 10,000 and scored on the other 10,000): b itself
1.0 (the label is its threshold); the image latent 0.78, as in the earlier design (the slide is as hard as it
was); the sheet 0.92 (tumour size alone 0.87, Ki67 0.80), identical in both designs; sheet + image latent 0.93
shared but 0.94 in the control, where the slide's evidence is independent of the record's. Within-class
correlation of the image and clinical latents: 0.38 shared, 0.01 control. On 120 rendered slides (size 512,
seed 1) the summed tumour-box area scores 0.80 in both designs, and its within-class correlation with the
sheet's log tumour size is 0.21 shared, -0.04 control. A slide model sees the latent through stain, geometry,
pen, blur, ducts and lymphocytes (the WSI-only phantom model scored ~0.71 on the earlier design's slides). For
scale, BCNB's authors report clinical-only 0.61, WSI 0.82 and WSI + clinical 0.83, the paper 0.861 for WSI +
clinical: the phantom's record is deliberately stronger than BCNB's (it is what the teacher adds here).
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import math
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import ClassVar, NamedTuple

import cv2
import numpy as np

from kdcli.extras import require
from kdcli.shards.format import atomic_write_bytes
from kdcli.synth._noise import scale_for_rate
from kdcli.synth._options import label_noise_field, seed_field, takes, workers_field

FORMATS = ("tiff", "bcnb")
ALN_STATUS = ("N0", "N+(1-2)", "N+(>2)")
CLINICAL_COLUMNS = (
    "Patient ID",
    "Age(years)",
    "Tumour Size(cm)",
    "Tumour Type",
    "ER",
    "PR",
    "HER2",
    "HER2 Expression",
    "Histological grading",
    "Surgical",
    "Ki67",
    "Molecular subtype",
    "Number of lymph node metastases",
    "ALN status",
)
MPP = 0.5  # um per level-0 pixel: 20x, as BCNB's 200x reading
OBJECTIVE_POWER = 20
DOWNSAMPLES = (1, 4, 16)
TILE = 256
MAX_SIZE = 8192  # level 0 is rendered in memory: a few float32 full-size maps
MAX_EXTRA = 99_999  # extra test slides and unlabeled slides each: their id ranges hold this many
JPEG_QUALITY = 90
FOR_TIFF, FOR_SHEET = "the pyramidal TIFF slide phantom", "the phantom's clinical sheet (clinical.xlsx)"
LATENTS_NAME = "latents.csv"
NOISE_NAME = "label_noise.csv"
SPLITS_FILE = "splits.json"
SPLIT_RATIOS = (0.6, 0.2, 0.2)  # prepare camelyon's default --ratios and split seed
SPLIT_SEED = 0
NPLUS_THRESHOLD = 0.2533471  # Phi^-1(0.60): b above it is node-positive
MANY_THRESHOLD = 1.0364334  # Phi^-1(0.85): b above it has more than two positive nodes
SLIDE_GAIN = 0.6  # the image latent is SLIDE_GAIN b + sqrt(1 - SLIDE_GAIN^2) e: faint
_IMAGE_MEAN, _IMAGE_SD = 0.45, 1.14  # the renderer's scale: the earlier design's image latent had these
FLIP_MARGIN = 0.25  # label flips fall off as exp(-|b - threshold| / FLIP_MARGIN)
FLIP_CAP = 0.5  # no label is flipped more often than kept
_HAEM = np.array([0.65, 0.70, 0.29], np.float32)  # Ruifrok/Macenko optical-density stain vectors (R, G, B)
_EOSIN = np.array([0.22, 0.80, 0.56], np.float32)
_INKS = {"green": np.array([1.6, 0.35, 1.0], np.float32), "blue": np.array([1.4, 0.9, 0.2], np.float32)}
POOLS = ("main", "test", "unlabeled")
_POOL_ID = {"main": 1, "test": 2, "unlabeled": 3}
_ID_BASE = {"main": 0, "test": 100_000, "unlabeled": 200_000}  # bcnb's numeric ids
_ID_TAG = {"main": "", "test": "t", "unlabeled": "u"}  # tiff's cnb_<tag><n>
# Stream tags, the last entry of every key [seed, pool, case, tag] (never 0: numpy's SeedSequence ignores trailing
# zeros, so [s, p, c, 0] would be [s, p, c])
_BIOLOGY, _SAMPLING, _SLIDE, _CLINICAL, _NOISE, _FREE_SLIDE, _FREE_CLINICAL, _ORDER, _REFERENCE = range(1, 10)

Job = tuple[str, str, float, tuple[int, ...], int, str]  # image path, outline path, image latent, key, size, format


def _um(x: float) -> float:
    return x / MPP


# ---------------------------------------------------------------- file formats


def _jpeg(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise OSError("cv2 could not encode a JPEG")
    return buf.tobytes()


def _tiles(img: np.ndarray) -> Iterator[bytes]:
    """The level's 256x256 JPEG tiles in row-major order; edge tiles are full size, padded by repeating the edge."""
    h, w = img.shape[:2]
    for y in range(0, h, TILE):
        for x in range(0, w, TILE):
            blk = img[y : y + TILE, x : x + TILE]
            if blk.shape[:2] != (TILE, TILE):
                blk = np.pad(blk, ((0, TILE - blk.shape[0]), (0, TILE - blk.shape[1]), (0, 0)), mode="edge")
            yield _jpeg(blk)


def _svs_bytes(levels: list[np.ndarray]) -> bytes:
    """A classic little-endian TIFF written by tifffile, one tiled JPEG (YCbCr 4:2:0, as cv2 encodes) page per
    level, with Aperio's ImageDescription on each."""
    tifffile = require("tifffile", "wsi", FOR_TIFF)
    h0, w0 = levels[0].shape[:2]
    head = f"Aperio Image Library v12.0.15\r\n{w0}x{h0} [0,0 {w0}x{h0}] ({TILE}x{TILE}) JPEG/RGB Q={JPEG_QUALITY}"
    tail = f"|AppMag = {OBJECTIVE_POWER}|MPP = {MPP}|Filename = phantom"
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tif:
        for i, img in enumerate(levels):
            h, w = img.shape[:2]
            desc = (head if i == 0 else f"Aperio Image Library v12.0.15\r\n{w0}x{h0} -> {w}x{h} - ") + tail
            per_cm = 10000 / MPP / DOWNSAMPLES[i]  # the generic-TIFF fallback for mpp
            # tifffile wants an encoder (imagecodecs) for compression="jpeg" even for tiles handed to it encoded,
            # so the cv2 tiles go in as they are and the two tags tifffile derives are set right below
            tif.write(_tiles(img), shape=(h, w, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                      description=desc, metadata=None, software=False, subfiletype=0,
                      resolution=(per_cm, per_cm), resolutionunit="centimeter",
                      extratags=[(530, 3, 2, (2, 2), False)])  # YCbCrSubsampling 4:2:0
    buf.seek(0)
    with tifffile.TiffFile(buf, mode="r+") as tif:
        for page in tif.pages:
            page.tags["Compression"].overwrite(7)  # JPEG
            page.tags["PhotometricInterpretation"].overwrite(6)  # YCbCr
    return buf.getvalue()


# ---------------------------------------------------------------- drawing


def _noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth value noise in [0, 1] with features about `cell` px across."""
    gh, gw = max(2, math.ceil(h / cell) + 1), max(2, math.ceil(w / cell) + 1)
    return np.clip(cv2.resize(rng.random((gh, gw), np.float32), (w, h), interpolation=cv2.INTER_CUBIC), 0, 1)


def _pt(p: np.ndarray) -> tuple[int, int]:
    return int(round(float(p[0]))), int(round(float(p[1])))


def _blob(rng: np.random.Generator, c: np.ndarray, a: float, b: float, ang: float, n: int = 18) -> np.ndarray:
    """An irregular closed outline: an ellipse (semi-axes a, b, rotated by ang) with a wobbly radius."""
    th = np.linspace(0, 2 * np.pi, n, endpoint=False)
    wob = 1 + 0.18 * np.convolve(np.tile(rng.normal(0, 1, n), 3), np.ones(3) / 3, "same")[n : 2 * n]
    x, y = a * np.cos(th) * wob, b * np.sin(th) * wob
    ca, sa = math.cos(ang), math.sin(ang)
    return np.stack([c[0] + ca * x - sa * y, c[1] + sa * x + ca * y], 1)


def _nuclei(
    canvas: np.ndarray,
    rng: np.random.Generator,
    pts: np.ndarray,
    r: np.ndarray,
    elong: np.ndarray,
    ang: np.ndarray,
    dark: np.ndarray,
) -> None:
    for p, rad, e, a, d in zip(pts, r, elong, ang, dark, strict=True):
        ax = (max(1, round(rad * e)), max(1, round(rad / e)))
        cv2.ellipse(canvas, _pt(p), ax, float(a), 0, 360, int(np.clip(d * 200, 1, 255)), -1)


def _inside(mask: np.ndarray, pts: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    xi = np.clip(pts[:, 0].astype(int), 0, w - 1)
    yi = np.clip(pts[:, 1].astype(int), 0, h - 1)
    return mask[yi, xi] > 0


def _slide(rng: np.random.Generator, s: float, w: int, h: int) -> tuple[np.ndarray, dict]:
    """Render one H&E core-biopsy slide (RGB uint8) and its tumour outlines, pen and blur flags; `s` is the image
    latent on the renderer's scale (image_latent)."""
    # ---- tissue: 1-3 elongated core strips, one per horizontal band, ragged edges, sometimes fragmented
    n_pieces = int(rng.integers(1, 4))
    band = h / n_pieces
    q = 4  # the strip outline is drawn and smoothed at 1/4 scale, then upsampled
    small = np.zeros((math.ceil(h / q), math.ceil(w / q)), np.uint8)
    pieces = []
    for i in range(n_pieces):
        hw = min(0.07 * h, 0.3 * band) * rng.uniform(0.8, 1.15)
        x0, x1 = sorted(rng.uniform([0.03, 0.62], [0.3, 0.97]) * w)
        yc = band * (i + 0.5) + rng.normal(0, 0.06 * band)
        slope, amp, ph = rng.normal(0, 0.06), rng.uniform(0, 0.25) * band * 0.4, rng.uniform(0, 2 * np.pi)
        t = np.linspace(0, 1, 64)
        xs = x0 + (x1 - x0) * t
        ys = yc + slope * (xs - (x0 + x1) / 2) + amp * np.sin(np.pi * t + ph)
        path = np.stack([xs, ys], 1)
        widths = hw * (1 + 0.15 * np.convolve(rng.normal(0, 1, 64), np.ones(9) / 3, "same"))
        gaps = set()
        if rng.random() < 0.4:  # core fragmented in one or two places
            for g in rng.integers(8, 56, int(rng.integers(1, 3))):
                gaps |= set(range(g, g + int(rng.integers(2, 4))))
        for j in range(64):
            if j not in gaps:
                cv2.circle(small, _pt(path[j] / q), max(1, round(widths[j] / q)), 255, -1)
        pieces.append((path, hw, math.atan2(ys[-1] - ys[0], xs[-1] - xs[0])))
    rough = _noise(rng, h, w, _um(40)) - 0.5
    smooth = cv2.GaussianBlur(small.astype(np.float32) / 255, (0, 0), _um(8) / q)
    tissue = cv2.resize(smooth, (small.shape[1] * q, small.shape[0] * q))[:h, :w] + 0.45 * rough
    tissue = (tissue > 0.5).astype(np.float32)
    tis8 = (tissue * 255).astype(np.uint8)
    area = float(tissue.sum())
    # ---- eosin: stroma with smooth texture and white adipocyte holes
    E = tissue * rng.uniform(0.45, 0.7) * (0.6 + 0.55 * _noise(rng, h, w, _um(60)))
    E *= 0.85 + 0.3 * _noise(rng, h, w, _um(8))
    fat = np.zeros((h, w), np.uint8)
    hw_min = min(p[1] for p in pieces)
    nf = int(area / _um(55) ** 2 * rng.uniform(0.2, 1.0))
    for p in rng.uniform([0, 0], [w, h], (nf, 2)):
        rad = min(_um(rng.uniform(12, 28)), 0.3 * hw_min)  # structures stay smaller than the strip
        cv2.ellipse(fat, _pt(p), (round(rad), round(rad * rng.uniform(0.7, 1))), rng.uniform(0, 180), 0, 360, 255, -1)
    E *= 1 - 0.92 * fat.astype(np.float32) / 255
    # ---- nuclei canvas (uint8 darkness), chromatin coarseness map
    nuc = np.zeros((h, w), np.uint8)
    coarse = np.full((h, w), 0.25, np.float32)
    # sparse elongated stromal nuclei, along the strip
    n_str = int(area / _um(22) ** 2)
    pts = rng.uniform([0, 0], [w, h], (n_str * 2, 2))
    pts = pts[_inside(tis8, pts)][:n_str]
    k = len(pts)
    ang0 = np.degrees(np.mean([p[2] for p in pieces]))
    _nuclei(
        nuc,
        rng,
        pts,
        _um(rng.uniform(2.2, 3.2, k)),
        rng.uniform(1.4, 2.2, k),
        ang0 + rng.normal(0, 25, k),
        rng.uniform(0.7, 0.95, k),
    )
    # benign ducts: a ring of small regular nuclei around a pale lumen (a look-alike for tumour nests)
    lumen = np.zeros((h, w), np.uint8)
    for path, hw, _ in pieces:
        for _ in range(int(rng.integers(0, 4))):
            c = path[int(rng.integers(6, 58))] + rng.normal(0, 0.3 * hw, 2)
            rad = min(_um(rng.uniform(15, 35)), 0.4 * hw)
            cv2.circle(lumen, _pt(c), round(rad * 0.6), 255, -1)
            m = int(2 * np.pi * rad / _um(7))
            th = np.linspace(0, 2 * np.pi, m, endpoint=False) + rng.normal(0, 0.05, m)
            ring = c + rad * np.stack([np.cos(th), np.sin(th)], 1) * rng.uniform(0.9, 1.05, (m, 1))
            _nuclei(
                nuc,
                rng,
                ring,
                _um(rng.uniform(2.6, 3.4, m)),
                rng.uniform(1.0, 1.4, m),
                np.degrees(th) + 90,
                rng.uniform(0.75, 0.95, m),
            )
    E *= 1 - 0.8 * (lumen & tis8).astype(np.float32) / 255
    # lymphocyte clusters: small, round, very dark nuclei (dark but not tumour)
    for _ in range(int(rng.integers(0, 3))):
        path, hw, _ = pieces[int(rng.integers(n_pieces))]
        c = path[int(rng.integers(4, 60))]
        m = int(rng.integers(30, 90))
        pts = c + rng.normal(0, 0.35 * hw, (m, 2))
        pts = pts[_inside(tis8, pts)]
        m = len(pts)
        _nuclei(nuc, rng, pts, _um(rng.uniform(2.0, 2.6, m)), np.ones(m), np.zeros(m), rng.uniform(1.0, 1.15, m))
    # ---- tumour regions: the image latent sets their number, size and nuclear look
    n_tum = int(np.clip(round(1.6 + 0.55 * s + rng.normal(0, 0.5)), 1, 5))
    tum8 = np.zeros((h, w), np.uint8)
    outlines = []
    r_um, pleo = 3.6 + 0.45 * s, max(0.06, 0.13 + 0.06 * s)
    dark, spacing = 0.95 + 0.1 * s, _um(9.5) / (1 + 0.12 * max(s, -1.5))
    for _ in range(n_tum):
        path, hw, ang = pieces[int(rng.integers(n_pieces))]
        c = path[int(rng.integers(10, 54))] + rng.normal(0, 0.15 * hw, 2)
        a = hw * max(0.45, (1.0 + 0.35 * s) * rng.uniform(0.75, 1.25))
        b = hw * rng.uniform(0.55, 0.85)
        poly = _blob(rng, c, a, b, ang + rng.normal(0, 0.15))
        poly = np.clip(poly, 0, [w - 1, h - 1])
        outlines.append(np.round(poly).astype(int))
        reg = np.zeros((h, w), np.uint8)
        cv2.fillPoly(reg, [np.round(poly).astype(np.int32)], 255)
        reg &= tis8
        tum8 |= reg
        ys, xs = np.nonzero(reg)
        if xs.size == 0:
            continue
        # nests: clusters of nuclei; the rest of the region is desmoplastic stroma
        n_nuc = int(xs.size / spacing**2 * rng.uniform(0.8, 1.1))
        n_nest = max(1, n_nuc // 25)
        pick = rng.integers(0, xs.size, n_nest)
        hubs = np.stack([xs[pick], ys[pick]], 1).astype(np.float64)
        pts = hubs[rng.integers(0, n_nest, n_nuc)] + rng.normal(0, _um(12), (n_nuc, 2))
        pts = pts[_inside(reg, pts)]
        m = len(pts)
        rad = _um(r_um) * rng.lognormal(0, pleo, m)
        _nuclei(
            nuc,
            rng,
            pts,
            rad,
            rng.uniform(1.0, 1.0 + 2 * pleo, m),
            rng.uniform(0, 180, m),
            dark * rng.uniform(0.85, 1.05, m),
        )
    tum = tum8.astype(np.float32) / 255
    coarse += tum * np.float32(np.clip(0.2 + 0.12 * s, 0.05, 0.7))
    # ---- compose in optical density
    grain = cv2.GaussianBlur(rng.random((h, w), np.float32), (0, 0), 0.8)
    grain = (grain - grain.mean()) / (grain.std() + 1e-6)
    H = cv2.GaussianBlur(nuc.astype(np.float32) / 200, (0, 0), 0.7) * (1 + coarse * 0.5 * grain)
    H = np.maximum(H, 0) * rng.uniform(1.0, 1.3) + tissue * 0.08 + tum * 0.12  # cytoplasm a little purple
    hv = _HAEM + rng.normal(0, 0.04, 3).astype(np.float32)
    ev = _EOSIN + rng.normal(0, 0.05, 3).astype(np.float32)
    hv, ev = hv / np.linalg.norm(hv), ev / np.linalg.norm(ev)
    del nuc, coarse, grain
    bg = np.float32(-math.log(rng.uniform(234, 246) / 255))
    meta = {"outlines": outlines, "pen": False, "blur": False}
    pen_od: np.ndarray | None = None
    if rng.random() < 0.35:  # pen: a pathologist's ink stroke circling some tissue
        path, hw, ang = pieces[int(rng.integers(n_pieces))]
        c = path[int(rng.integers(16, 48))]
        pen = np.zeros((h, w), np.uint8)
        a0 = rng.uniform(0, 360)
        axes = (round(hw * rng.uniform(2.5, 4)), round(hw * rng.uniform(1.6, 2.4)))
        thick = max(2, round(0.008 * w))
        cv2.ellipse(pen, _pt(c), axes, math.degrees(ang), a0, a0 + rng.uniform(120, 300), 255, thick, cv2.LINE_AA)
        ink = _INKS[("green", "blue")[int(rng.integers(2))]] * np.float32(rng.uniform(0.7, 1.0))
        pen_od = cv2.GaussianBlur(pen.astype(np.float32) / 255, (0, 0), 1.5)
        meta["pen"] = True
    E *= 1 - 0.3 * tum  # tumour cells: less eosinophilic stroma between them
    rgb = np.empty((h, w, 3), np.float32)
    for ch in range(3):  # one channel at a time: keeps the peak at a few full-size float32 maps
        od = H * hv[ch] + E * ev[ch] + bg
        if pen_od is not None:
            od += pen_od * ink[ch]
        rgb[..., ch] = np.exp(-od) * 255
    rgb += rng.standard_normal((h, w, 1), np.float32) * 2.0  # sensor noise
    if rng.random() < 0.25:  # out of focus: a soft elliptic patch blurred, worked on its bounding box only
        path, hw, _ = pieces[int(rng.integers(n_pieces))]
        c = path[int(rng.integers(8, 56))]
        ax, ay, rot = rng.uniform(0.08, 0.16) * w, rng.uniform(0.08, 0.16) * h, rng.uniform(0, 180)
        edge, f = 0.02 * w, 8  # soft edge, mask built at 1/8 scale
        m = max(ax, ay) + 3 * edge
        x0, y0 = max(0, int(c[0] - m)), max(0, int(c[1] - m))
        x1, y1 = min(w, int(c[0] + m) + 1), min(h, int(c[1] + m) + 1)
        small = np.zeros((math.ceil((y1 - y0) / f), math.ceil((x1 - x0) / f)), np.float32)
        cv2.ellipse(small, _pt((c - [x0, y0]) / f), (round(ax / f), round(ay / f)), rot, 0, 360, 1.0, -1)
        small = cv2.GaussianBlur(small, (0, 0), edge / f)
        soft = cv2.resize(small, (small.shape[1] * f, small.shape[0] * f))[: y1 - y0, : x1 - x0, None]
        box = rgb[y0:y1, x0:x1]
        box += (cv2.GaussianBlur(box, (0, 0), _um(rng.uniform(2, 3.5))) - box) * soft
        meta["blur"] = True
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8), meta


# ---------------------------------------------------------------- the latent, the label and the label noise


def aln_status(biology: float) -> str:
    """The ALN status a tumour-biology latent b implies (module docstring, step 2)."""
    return "N0" if biology < NPLUS_THRESHOLD else "N+(1-2)" if biology < MANY_THRESHOLD else "N+(>2)"


def class_counts(n: int) -> dict[str, int]:
    """round(0.6 n) N0 (at least one), round(0.25 n) N+(1-2), the rest N+(>2) (at least one N+)."""
    n0 = min(n - 1, max(1, round(0.6 * n)))
    n12 = min(n - n0, round(0.25 * n))
    return {"N0": n0, "N+(1-2)": n12, "N+(>2)": n - n0 - n12}


def _rng(seed: int, pool: str, case: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, _POOL_ID[pool], case, stream])


def draw_biology(seed: int, pool: str, case: int) -> float:
    """Patient `case` of `pool`'s tumour biology b ~ N(0, 1): its own stream, nothing else in the key."""
    return float(_rng(seed, pool, case, _BIOLOGY).standard_normal())


def image_latent(biology: float, sampling: float) -> float:
    """What the slide renders (unit scale): SLIDE_GAIN b + sqrt(1 - SLIDE_GAIN^2) e."""
    return SLIDE_GAIN * biology + math.sqrt(1 - SLIDE_GAIN**2) * sampling


def _render_scale(latent: float) -> float:
    return float(np.clip(_IMAGE_MEAN + _IMAGE_SD * latent, -2.5, 3.5))


def _conditioned(seed: int, pool: str, case: int, stream: int, status: str) -> float:
    """The negative control's latent of one modality: b drawn from a stream of its own until its status matches."""
    rng = _rng(seed, pool, case, stream)
    while True:
        value = float(rng.standard_normal())
        if aln_status(value) == status:
            return value


def _neighbour(status: str) -> str:
    return "N+(1-2)" if status == "N0" else "N0"


@lru_cache(maxsize=16)
def _flip_scale(rho: float) -> float:
    """c such that the expected flip rate over patients (the prior's class mix, as every split's) is rho."""
    biology = np.random.default_rng([_REFERENCE]).standard_normal(100_000)
    weight = np.exp(-np.abs(biology - NPLUS_THRESHOLD) / FLIP_MARGIN)

    def rate(c: float) -> float:
        return float(np.minimum(FLIP_CAP, c * weight).mean())

    return scale_for_rate(rate, rho)


def flip_probability(biology: float, rho: float) -> float:
    """How likely a training patient's listed status is flipped across the N0 / N+ boundary at noise rate rho."""
    if rho <= 0:
        return 0.0
    return min(FLIP_CAP, _flip_scale(rho) * math.exp(-abs(biology - NPLUS_THRESHOLD) / FLIP_MARGIN))


# ---------------------------------------------------------------- planning: patients, ids, splits


class Patient(NamedTuple):
    id: str  # slide id (file stem) and sheet id
    pool: str  # main | test | unlabeled
    case: int  # index in the pool's patient stream
    biology: float  # b
    clean_label: str
    label: str | None  # as listed in the sheet (after label noise); None: unlabeled
    split: str
    image_latent: float  # what the slide renders (unit scale)
    clinical_latent: float  # what the record renders (b itself in the shared design)


def _patient_id(pool: str, n: int, format: str) -> str:
    return f"cnb_{_ID_TAG[pool]}{n:04d}" if format == "tiff" else str(_ID_BASE[pool] + n)


def _fill(seed: int, pool: str, counts: dict[str, int]) -> list[tuple[int, float]]:
    """Patients in stream order, each kept until its class is full, listed in a seeded shuffled order."""
    kept: dict[str, list[tuple[int, float]]] = {status: [] for status in ALN_STATUS}
    case = 0
    while any(len(kept[s]) < counts[s] for s in ALN_STATUS):
        biology = draw_biology(seed, pool, case)
        rows = kept[aln_status(biology)]
        if len(rows) < counts[aln_status(biology)]:
            rows.append((case, biology))
        case += 1
    every = [row for status in ALN_STATUS for row in kept[status]]
    order = _rng(seed, pool, 0, _ORDER).permutation(len(every))
    return [every[i] for i in order]


def _main_splits(ids: list[str], labels: list[str], extra_tests: int) -> list[str]:
    """prepare camelyon's default split of the main slides (stratified N0 / N+, ratios 0.6/0.2/0.2, split seed 0),
    or train/dev 0.75/0.25 when extra test slides exist."""
    from kdcli.sources.camelyon import stratified_splits

    ratios = (0.75, 0.25, 0.0) if extra_tests else SPLIT_RATIOS
    binary = {i: int(label != "N0") for i, label in zip(ids, labels, strict=True)}
    assignment = stratified_splits(binary, ratios, SPLIT_SEED)
    return [assignment[i] for i in ids]


def _plan(slides: int, seed: int, format: str, independent: bool, label_noise: float, test_slides: int,
          unlabeled: int) -> list[Patient]:
    drawn: list[tuple[str, int, float]] = [("main", case, b) for case, b in _fill(seed, "main", class_counts(slides))]
    if test_slides:
        drawn += [("test", case, b) for case, b in _fill(seed, "test", class_counts(test_slides))]
    drawn += [("unlabeled", case, draw_biology(seed, "unlabeled", case)) for case in range(unlabeled)]
    number = dict.fromkeys(POOLS, 0)
    ids = []
    for pool, _, _ in drawn:
        number[pool] += 1
        ids.append(_patient_id(pool, number[pool], format))
    main = [k for k, (pool, _, _) in enumerate(drawn) if pool == "main"]
    main_splits = _main_splits([ids[k] for k in main], [aln_status(drawn[k][2]) for k in main], test_slides)
    split_of = dict(zip(main, main_splits, strict=True))
    patients = []
    for k, (pool, case, b) in enumerate(drawn):
        clean = aln_status(b)
        split = split_of.get(k, "test" if pool == "test" else "train")
        label: str | None = None if pool == "unlabeled" else clean
        if label is not None and split == "train" and label_noise > 0:
            if _rng(seed, pool, case, _NOISE).random() < flip_probability(b, label_noise):
                label = _neighbour(clean)
        if independent:
            slide_b = _conditioned(seed, pool, case, _FREE_SLIDE, clean)
            clinical_b = _conditioned(seed, pool, case, _FREE_CLINICAL, clean)
        else:
            slide_b = clinical_b = b
        sampling = float(_rng(seed, pool, case, _SAMPLING).standard_normal())
        patients.append(Patient(ids[k], pool, case, b, clean, label, split, image_latent(slide_b, sampling),
                                clinical_b))
    return patients


# ---------------------------------------------------------------- clinical sheet


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def clinical_row(patient_id: str | int, latent: float, label: str | None, rng: np.random.Generator) -> dict:
    """One BCNB clinical row (keys = CLINICAL_COLUMNS, None = empty cell) rendering the latent `latent` (b in the
    shared design) with the record's gains; `label` is the listed status (None: not staged, unlabeled)."""
    c = latent
    age = int(np.clip(round(51 + 10 * rng.normal() - 1.0 * c), 24, 86))
    size = round(float(np.clip(math.exp(math.log(2.1) + 0.30 * c + 0.25 * rng.normal()), 0.5, 10.0)), 1)
    g = 0.7 * c + 0.8 * rng.normal()
    grade = 1 if g < -0.9 else 2 if g < 0.7 else 3
    ki67 = int(np.clip(5 * round(20 * _sig(-1.3 + 0.7 * c + 0.8 * rng.normal())), 1, 95))
    er = rng.random() >= _sig(-1.7 + 0.6 * c)
    pr_draw = rng.random()
    pr = pr_draw >= 0.18 if er else pr_draw < 0.08
    expr = ("0", "1+", "2+", "3+")[int(rng.choice(4, p=(0.3, 0.3, 0.22, 0.18)))]
    her2 = expr == "3+" or (expr == "2+" and rng.random() < 0.3)
    if er or pr:
        subtype = "Luminal B" if her2 or ki67 >= 20 else "Luminal A"
    else:
        subtype = "HER2(+)" if her2 else "Triple negative"
    ttype = ("Invasive ductal carcinoma", "Invasive lobular carcinoma", "Other type")[
        int(rng.choice(3, p=(0.85, 0.06, 0.09)))
    ]
    surgical = "Modified radical mastectomy" if rng.random() < _sig(0.9 * (size - 2.3)) else "Breast-conserving surgery"
    node_draw = (int(rng.integers(1, 3)), 2 + int(rng.geometric(0.2)))  # drawn whatever the label: rows stay aligned
    nodes = None if label is None else 0 if label == "N0" else node_draw[0] if label == "N+(1-2)" else node_draw[1]
    miss = rng.random(3)  # a few empty cells, independent of everything else, as in the real sheet
    values = (patient_id, age, size, ttype, "Positive" if er else "Negative", "Positive" if pr else "Negative",
              "Positive" if her2 else "Negative", None if miss[0] < 0.03 else expr, None if miss[1] < 0.08 else grade,
              surgical, None if miss[2] < 0.03 else ki67, subtype, nodes, label)
    return dict(zip(CLINICAL_COLUMNS, values, strict=True))


def _write_xlsx(path: Path, rows: list[dict]) -> None:
    xlsxwriter = require("xlsxwriter", "wsi", FOR_SHEET)

    tmp = path.with_name(f".{path.name}.tmp")
    wb = xlsxwriter.Workbook(str(tmp))
    wb.set_properties({"created": datetime.datetime(2000, 1, 1)})  # no clock in the file: same arguments, same bytes
    ws = wb.add_worksheet("Sheet1")
    ws.write_row(0, 0, CLINICAL_COLUMNS)
    for r, row in enumerate(rows, 1):
        for col, name in enumerate(CLINICAL_COLUMNS):
            if row[name] is not None:
                ws.write(r, col, row[name])
    wb.close()
    os.replace(tmp, path)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_bytes(path, text.getvalue().encode())


# ---------------------------------------------------------------- per-slide job


def _dims(size: int) -> tuple[int, int]:
    return size, round(0.75 * size)


def _render(job: Job) -> dict:
    img_path, ann_path, latent, key, size, fmt = job
    w, h = _dims(size)
    rgb, meta = _slide(np.random.default_rng(list(key)), _render_scale(latent), w, h)
    if fmt == "tiff":
        levels = [rgb]
        for d in DOWNSAMPLES[1:]:  # each level area-reduced from the one above
            levels.append(cv2.resize(levels[-1], (w // d, h // d), interpolation=cv2.INTER_AREA))
        atomic_write_bytes(Path(img_path), _svs_bytes(levels))
    else:
        atomic_write_bytes(Path(img_path), _jpeg(rgb))
    polys = [
        {"name": f"Annotation {i}", "vertices": [[int(x), int(y)] for x, y in o]}
        for i, o in enumerate(meta["outlines"])
    ]
    atomic_write_bytes(Path(ann_path), (json.dumps({"positive": polys}) + "\n").encode())
    boxes = [[int(o[:, 0].min()), int(o[:, 1].min()), int(o[:, 0].max()), int(o[:, 1].max())] for o in meta["outlines"]]
    return {"tumour_boxes": boxes, "pen": meta["pen"], "blur": meta["blur"]}


@dataclass
class CamelyonSynthOptions:
    """Core-needle biopsy slide phantoms and a BCNB clinical sheet: one tumour-biology latent per patient, shown
    strongly in the record and faintly in the slide."""

    out_help: ClassVar[str] = "Folder to write: slides/ (tiff) or WSIs/ (bcnb), clinical.xlsx."

    slides: int = field(default=12, metadata={"help": "Slides (patients)."})
    format: str = field(default="tiff", metadata={"help": "tiff (pyramidal, OpenSlide) or bcnb (jpg + json outlines)."})
    size: int = field(default=4096, metadata={"help": "Level-0 width in pixels (20x, 0.5 um/px)."})
    seed: int = seed_field()
    workers: int = workers_field()
    label_noise: float = label_noise_field(
        "Share of TRAINING ALN statuses flipped across N0 / N+, borderline patients most often; dev/test stay "
        "clean; flips listed in label_noise.csv.")
    independent: bool = field(default=False, metadata={
        "help": "Negative control: slide and clinical record render latents of their own; they share only the ALN "
                "status."})
    test_slides: int = field(default=0, metadata={
        "help": "Extra test slides, identical whatever --slides is (a fixed test set across training sizes)."})
    unlabeled: int = field(default=0, metadata={
        "help": "Extra slides whose sheet row has no ALN status (unlabeled training slides for prepare)."})

    def report(self, summary: dict, out: Path) -> list[str]:
        counts = {split: len(ids) for split, ids in summary["splits"].items()}
        lines = [f"wrote {len(summary['slides'])} slides ({self.format}, {summary['design']} design; "
                 f"{counts['train']}/{counts['dev']}/{counts['test']} train/dev/test"
                 + (f", {self.unlabeled} unlabeled" if self.unlabeled else "")
                 + f") and {summary['clinical']} to {out}"]
        if self.label_noise:
            lines.append(f"labels of {summary['flipped']} training slides flipped, see {out / 'label_noise.csv'}")
        if summary["splits_file"]:
            lines.append(f"prepare with --splits {out / summary['splits_file']} (the noisy labels and extra test "
                         "slides depend on this split)")
        return lines


@takes(CamelyonSynthOptions)
def synth_camelyon(
    out: Path,
    slides: int = 12,
    format: str = "tiff",
    size: int = 4096,
    seed: int = 0,
    workers: int = 1,
    *,
    label_noise: float = 0.0,
    independent: bool = False,
    test_slides: int = 0,
    unlabeled: int = 0,
) -> dict:
    """Write `slides` phantom breast core-biopsy WSIs and a BCNB clinical sheet under `out`.

    format "tiff": slides/<id>.tif (Aperio-style pyramid, OpenSlide-readable) + annotations/<id>.json;
    format "bcnb": WSIs/<n>.jpg + WSIs/<n>.json (BCNB's layout). Both: clinical.xlsx and latents.csv.
    `label_noise` (0 <= rho < 0.5): that share of TRAIN labels flipped across N0 / N+, borderline patients most
    often (label_noise.csv; pass splits.json to prepare). `independent`: the negative control (slide and record
    independent given the label). `test_slides`: extra test slides, the same whatever `slides` is (splits.json).
    `unlabeled`: extra slides whose sheet row has no ALN status (unlabeled training slides for prepare).
    Returns {"root", "format", "design", "label_noise", "slides": [{"id", "file", "annotation", "label" (listed;
    None when unlabeled), "clean_label", "split", "pool", "biology", "image_latent", "clinical_latent",
    "tumour_boxes" ([x0, y0, x1, y1] in level-0 px), "pen", "blur"}], "splits" ({train, dev, test: labelled
    ids}), "splits_file" (relative path or None), "unlabeled" (ids), "flipped" (count), "clinical", "mpp",
    "objective_power", "level_dimensions"}; paths are relative to root. Output depends only on the arguments
    (not on `workers`). The module docstring tells the generative story.
    """
    if slides < 2:
        raise ValueError(f"slides must be >= 2 (at least one N0 and one N+), got {slides}")
    if not 512 <= size <= MAX_SIZE:
        raise ValueError(f"size must be in [512, {MAX_SIZE}] (level 0 is rendered in memory), got {size}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")  # numpy SeedSequence rejects negative entropy
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    label_noise = float(label_noise)
    if not (math.isfinite(label_noise) and 0.0 <= label_noise < FLIP_CAP):
        raise ValueError(f"label_noise must be in [0, 0.5), got {label_noise}")
    if test_slides == 1 or not 0 <= test_slides <= MAX_EXTRA:
        raise ValueError(f"test_slides must be 0 or in [2, {MAX_EXTRA}] (one N0 and one N+ at least), got "
                         f"{test_slides}")
    if not 0 <= unlabeled <= MAX_EXTRA:
        raise ValueError(f"unlabeled must be in [0, {MAX_EXTRA}], got {unlabeled}")
    slides_max = 9999 if format == "tiff" else _ID_BASE["test"] - 1
    if slides > slides_max:
        raise ValueError(f"slides must be <= {slides_max} for format {format!r} (ids), got {slides}")
    require("xlsxwriter", "wsi", FOR_SHEET)  # checked before any slide is rendered
    if format == "tiff":
        require("tifffile", "wsi", FOR_TIFF)
    out = Path(out)
    patients = _plan(slides, seed, format, bool(independent), label_noise, test_slides, unlabeled)
    if format == "tiff":
        files = [f"slides/{p.id}.tif" for p in patients]
        anns = [f"annotations/{p.id}.json" for p in patients]
    else:
        files = [f"WSIs/{p.id}.jpg" for p in patients]
        anns = [f"WSIs/{p.id}.json" for p in patients]
    for rel in {Path(f).parent for f in files + anns}:
        (out / rel).mkdir(parents=True, exist_ok=True)
    jobs: list[Job] = [
        (str(out / f), str(out / a), p.image_latent, (seed, _POOL_ID[p.pool], p.case, _SLIDE), size, format)
        for p, f, a in zip(patients, files, anns, strict=True)
    ]
    if workers > 1:
        with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
            results = list(pool.map(_render, jobs))
    else:
        results = [_render(j) for j in jobs]
    rows = [clinical_row(int(p.id) if format == "bcnb" else p.id, p.clinical_latent, p.label,
                         _rng(seed, p.pool, p.case, _CLINICAL)) for p in patients]
    _write_xlsx(out / "clinical.xlsx", rows)
    _write_csv(out / LATENTS_NAME, ["id", "pool", "split", "biology", "image_latent", "clinical_latent",
                                    "clean_label", "label"],
               [[p.id, p.pool, p.split, f"{p.biology:.6f}", f"{p.image_latent:.6f}", f"{p.clinical_latent:.6f}",
                 p.clean_label, p.label or ""] for p in patients])
    flipped = [p for p in patients if p.label is not None and p.label != p.clean_label]
    if label_noise > 0:
        _write_csv(out / NOISE_NAME, ["id", "clean_label", "label", "biology"],
                   [[p.id, p.clean_label, p.label, f"{p.biology:.6f}"] for p in flipped])
    labelled = [p for p in patients if p.label is not None]
    splits = {split: [p.id for p in labelled if p.split == split] for split in ("train", "dev", "test")}
    splits_file = None
    if label_noise > 0 or test_slides > 0:  # the split now shapes the files: prepare must use this one
        splits_file = SPLITS_FILE
        atomic_write_bytes(out / SPLITS_FILE, (json.dumps(splits, indent=1) + "\n").encode())
    w, h = _dims(size)
    return {
        "root": str(out),
        "format": format,
        "design": "independent" if independent else "shared",
        "label_noise": label_noise,
        "slides": [
            {"id": p.id, "file": f, "annotation": a, "label": p.label, "clean_label": p.clean_label,
             "split": p.split, "pool": p.pool, "biology": p.biology, "image_latent": p.image_latent,
             "clinical_latent": p.clinical_latent, **r}
            for p, f, a, r in zip(patients, files, anns, results, strict=True)
        ],
        "splits": splits,
        "splits_file": splits_file,
        "unlabeled": [p.id for p in patients if p.label is None],
        "flipped": len(flipped),
        "clinical": str(out / "clinical.xlsx"),
        "mpp": MPP,
        "objective_power": OBJECTIVE_POWER,
        "level_dimensions": [[w // d, h // d] for d in DOWNSAMPLES] if format == "tiff" else [[w, h]],
    }
