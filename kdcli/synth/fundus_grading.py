"""Deterministic DR + AMD grading phantoms for SALL (Ju et al., JBHI 2021), in EyePACS/APTOS-like layouts.

SALL trains a DR grader and an AMD grader together although each set is graded for one disease only; each
model's soft predictions on the *other* set act as extra labels. That can only help when the eyes of one set
also show the other disease, as real patients do, when one set is too small to learn its disease alone, and
when the graders' labels are noisy. This phantom is built so that all three hold, and so that a control
removes the first.

Generative story
----------------
1. Eye latent. Every eye draws its latent u first, from a random stream keyed by the eye alone (seed, set,
   pool, case index) -- never by its grade or split:
     - DR severity d = Phi(z_d)^1.76 and AMD severity a = Phi(z_a)^1.51: continuous disease progress, most
       eyes mild as in a screening population; (z_d, z_a) are standard normal with correlation 0.6
       (SEVERITY_CORRELATION: shared risk such as age and vascular health), so d and a correlate (Pearson
       ~0.57) and an eye with one disease tends to show the other -- what lets one grader's knowledge serve
       the other;
     - shared lesion propensities h (haemorrhage) and e (exudation), each ~ U(0.5, 1): how strongly this eye
       bleeds and leaks, whichever disease makes it do so.
2. Grades. DR grade = number of DR_CUTS (0.2, 0.4, 0.6, 0.8) at or below d; AMD grade = number of AMD_CUTS
   (0.25, 0.5, 0.75) at or below a. Thresholded scores of u, so borderline eyes exist: an eye whose severity
   lies within 0.02 of a cut (17 % of a grade-balanced DR set, 12 % of an AMD one) looks like its neighbouring
   grade. Population priors: DR (0.40, 0.19, 0.15, 0.13, 0.12), AMD (0.40, 0.23, 0.19, 0.17); a set's
   hidden grades follow them shifted by the shared risk (more late AMD among severe DR eyes, and back).
   Every eye has both grades. The DR set keeps eyes in stream order until each DR grade holds `per_class`
   (quota sampling: within a grade, eyes are i.i.d. from p(u | grade)); its AMD grades are whatever the eyes
   have (the prior). The AMD set likewise, `amd_per_class` per AMD grade. Only the set's own grade is written
   to its CSV; the other ("hidden") grade is in the summary and in `<out>/latents.csv`.
3. Rendering. Each image renders its eye's whole latent, both diseases -- the grades never enter the pixels
   except through u. Lesion amounts ramp continuously with the severity (counts ~ Poisson of a ramp),
   crossing each grade's cut in its middle:
     - DR (spread over the retina): microaneurysms from d ~ 0.1, blot haemorrhages (x h) and hard-exudate
       clusters (x e) from d ~ 0.33, venous beading from d ~ 0.52, neovascular tufts at the disc and a
       pre-retinal bleed (x h) from d ~ 0.72;
     - AMD (at the macula): a few tiny ageing drusen when a is low, small drusen from a ~ 0.12, large drusen
       from a ~ 0.38, pigment mottling from a ~ 0.4, a grey-green CNV membrane with a haemorrhage rim (x h) and
       an exudate ring (x e) from a ~ 0.68.
   Haemorrhage and exudate look the same whichever disease causes them (one colour, one blend), and both
   scale with the eye's h and e: the lesions the paper notes the diseases share. So a DR grader must learn
   that macular bleeding with a membrane is AMD's, and an AMD grader that scattered bleeding is DR's.
   Nuisance (camera, illumination, vessels, disc side, exact lesion scatter, a dust speck on 30 %, sensor
   noise, focus, exposure) comes from streams of its own per eye: the photo's base, DR's lesions and AMD's
   lesions each draw from their own stream, so an eye's DR lesions are the same pixels whatever a is.
4. Grader noise (`label_noise` = rho), TRAIN images only: a training eye's listed grade is moved to its
   neighbouring grade (the other side of the nearest cut) with probability min(1/2, c exp(-margin / 0.04)),
   margin = |severity - nearest cut|: disagreements fall on borderline eyes, as between real graders. c is
   solved per set on a reference sample so that a grade-balanced training split flips rho in expectation.
   Dev and test grades stay clean; `<out>/label_noise.csv` lists every moved grade (set, image, clean, listed).
5. Negative control (`independent=True`): each set's eyes carry no sign of the other disease -- the DR set is
   drawn from a population without AMD (a = 0: hidden AMD grade 0, no drusen, pigment or membrane), the AMD
   set from one without DR (d = 0). Everything else is byte for byte the shared design: the same eyes, own
   severities, propensities, splits, grader noise, base photos and own-disease lesions. Why this control:
   SALL's extra labels are the other teacher's soft labels on a set's images, and they can only say what
   those images show of the other disease. Here they show nothing, so the AMD teacher's soft labels on the
   DR set carry no AMD grading information (all eyes are "none") and the DR teacher's on the AMD set none
   about DR; nor can the shared risk help, since a set's images hold no lesion of the other disease for a
   grader to read. Rendering the other disease from an independent latent instead would only remove the
   correlation: the other set's images would still show the other disease at its prior, and the soft labels
   would still grade it. What the control keeps is SALL's shared backbone (DR's haemorrhage and exudate
   features also serve late AMD): a gain there is the multi-task part, not the extra labels.

Sizes and splits. `per_class` DR eyes per grade and `amd_per_class` AMD eyes per grade (the asymmetric sets
SALL was made for: a large DR set, a small AMD one), all splits together, split by patient 60/20/20 with
`prepare fundus-grading`'s default split (stratified by the patient's highest grade, split seed 0). With
`test_per_class` > 0 each set gains that many test eyes per grade from a case pool of its own, the same
whatever `per_class` is, and the main eyes split 75/25 into train/dev. The split is written to
`<set>/splits.csv` (`image,split`): pass it as `prepare fundus-grading --splits`; without label noise and test
pool it equals prepare's default split, with them it is needed (noise only in train, the pool only in test).

Calibration (measured, 2 shared CPU cores): `kdcli bench distill fundus-grading --sizes 4,8 --seeds 5
--label-smoothing 0` (48 DR eyes per grade, 4 or 8 AMD eyes per grade, test pools of 40 per grade and set,
drawn at 64 px and stored at 32, timm test_resnet, 15 epochs of 512 samples, SALL at its defaults; 60 runs,
about 10 CPU-seconds each). Single-task graders (chance 0.20 DR, 0.25 AMD): DR 0.47 (shared) / 0.51 (control);
AMD 0.35 / 0.30 at 4 eyes per grade, 0.53 / 0.46 at 8 (the shared risk lets the AMD grader read DR lesions
too). SALL - single-task, accuracy points, mean (95% t interval), seeds up/down of 5:
    AMD, 4 per grade: shared +2.6 (+0.6, +4.6) 4/0;   control +2.4 (-3.5, +8.3) 3/2
    AMD, 8 per grade: shared -4.6 (-13.6, +4.4) 1/4;  control -2.2 (-5.0, +0.5) 0/4
    DR (48 per grade): shared -5.2 (-9.6, -0.8) and -4.9 (-11.3, +1.5); control -3.4 and -4.2 (intervals
    include 0)
So at this scale SALL's AMD head gains a little on the smallest AMD set, but as much in the control, so the
gain is not its extra labels' (presumably the shared backbone and the other set's images); at 8 per
grade it loses, and the DR head pays for sharing a fixed budget (it sees about 5/9 of the DR grader's DR
samples). With grader noise (`--label-noise 0.2`, 3 seeds) every interval includes 0 (AMD shared +0.6 and
-0.8, control +2.1 and -3.3; DR +0.2 and +1.2). Without the shared risk (independent severities, the first
version of this design, 3 seeds) AMD +0.2 and +0.4, DR -7.7 and -5.2. The soft labels come from a teacher
trained on the same few AMD eyes as the baseline (same modality: self-training), which theory does not
expect to beat its own labels; the levers here (asymmetry, shared latent, grader noise) are what a larger
budget (64 px, more epochs, a GPU) can test.
"""

from __future__ import annotations

import csv
import hashlib
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import ClassVar, NamedTuple

import cv2
import numpy as np

from kdcli.synth._fundus import fx, vessel_paths
from kdcli.synth._noise import scale_for_rate
from kdcli.synth._options import label_noise_field, seed_field, size_field, takes, workers_field

DR_GRADES = ("none", "mild", "moderate", "severe", "proliferative")  # 0..4, EyePACS/APTOS
AMD_GRADES = ("none", "early", "intermediate", "late")  # 0..3
SETS = ("dr", "amd")
# layout -> (labels csv, image column, grade column, image folder), as in the Kaggle downloads
DR_LAYOUTS = {
    "eyepacs": ("trainLabels.csv", "image", "level", "train"),
    "aptos": ("train.csv", "id_code", "diagnosis", "train_images"),
}
AMD_LAYOUT = ("labels.csv", "image", "level", "images")
DR_CUTS = (0.2, 0.4, 0.6, 0.8)  # DR grade = cuts at or below the DR severity
AMD_CUTS = (0.25, 0.5, 0.75)
DR_POWER, AMD_POWER = 1.76, 1.51  # severity = U^power: 40 % of the population without either disease
SEVERITY_CORRELATION = 0.6  # of the two severities' normal scores: shared risk (age, vascular health)
CUTS = {"dr": DR_CUTS, "amd": AMD_CUTS}
FLIP_MARGIN = 0.04  # grader disagreement falls off as exp(-|severity - cut| / FLIP_MARGIN)
FLIP_CAP = 0.5  # no grade is moved more often than kept
SPLITS_NAME = "splits.csv"  # in each set's folder
LATENTS_NAME = "latents.csv"  # at the root
NOISE_NAME = "label_noise.csv"  # at the root, when label_noise > 0
MAX_PER_CLASS = 10_000  # EyePACS-style patient ids of the main eyes stay below the test pool's reserved range
_SET_ID = {"dr": 1, "amd": 2}
_POOL_ID = {"main": 0, "test": 2}
# Stream keys: each random stream has its own first entry, so no two streams ever coincide.
_CASE, _ORDER, _NOISE, _BASE, _DR_LESIONS, _AMD_LESIONS, _REFERENCE = 21, 22, 23, 24, 25, 26, 27


class EyeLatent(NamedTuple):
    """One eye's latent u (see the module docstring)."""

    dr: float  # DR severity d in [0, 1)
    amd: float  # AMD severity a in [0, 1)
    haemorrhage: float  # propensity h, shared by both diseases
    exudate: float  # propensity e, shared by both diseases

    def grade(self, disease: str) -> int:
        return grade_of(self.dr if disease == "dr" else self.amd, disease)


def grade_of(severity: float, disease: str) -> int:
    return int(np.searchsorted(CUTS[disease], severity, side="right"))


def _normal_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def _draw_latent(rng: np.random.Generator) -> EyeLatent:
    z = rng.standard_normal(2)
    shared = SEVERITY_CORRELATION * z[0] + math.sqrt(1 - SEVERITY_CORRELATION**2) * z[1]
    u = rng.random(2)
    return EyeLatent(_normal_cdf(float(z[0])) ** DR_POWER, _normal_cdf(float(shared)) ** AMD_POWER,
                     float(0.5 + 0.5 * u[0]), float(0.5 + 0.5 * u[1]))


def _neighbour_and_margin(severity: np.ndarray, disease: str) -> tuple[np.ndarray, np.ndarray]:
    """Per severity: the grade across the nearest cut, and the distance to that cut."""
    cuts = np.asarray(CUTS[disease])
    nearest = np.abs(np.asarray(severity)[..., None] - cuts).argmin(-1)
    margin = np.abs(np.asarray(severity) - cuts[nearest])
    grade = np.searchsorted(cuts, severity, side="right")
    return np.where(grade > nearest, nearest, nearest + 1), margin


@lru_cache(maxsize=32)
def _flip_scale(rho: float, disease: str) -> float:
    """c such that a grade-balanced training split of this disease moves rho of its grades in expectation."""
    power = DR_POWER if disease == "dr" else AMD_POWER
    severity = np.random.default_rng([_REFERENCE, _SET_ID[disease]]).random(200_000) ** power
    grade = np.searchsorted(CUTS[disease], severity, side="right")
    weight = np.exp(-_neighbour_and_margin(severity, disease)[1] / FLIP_MARGIN)
    per_grade = [weight[grade == g] for g in range(len(CUTS[disease]) + 1)]

    def rate(c: float) -> float:
        return float(np.mean([np.minimum(FLIP_CAP, c * w).mean() for w in per_grade]))

    return scale_for_rate(rate, rho)


def flip_probability(severity: float, disease: str, rho: float) -> float:
    """How likely a grader moves this eye's grade to its neighbour, at noise level rho."""
    if rho <= 0:
        return 0.0
    margin = float(_neighbour_and_margin(np.array([severity]), disease)[1][0])
    return min(FLIP_CAP, _flip_scale(rho, disease) * float(np.exp(-margin / FLIP_MARGIN)))


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


def _ramp(x: float, lo: float, hi: float) -> float:
    return float(np.clip((x - lo) / (hi - lo), 0.0, 1.0))


# ---------------------------------------------------------------- lesions

_HAEM, _EXUD, _DRUSEN = (0.32, 0.03, 0.02), (0.98, 0.86, 0.3), (0.95, 0.88, 0.55)


class Eye(NamedTuple):
    """The photo's anatomy, drawn from the base stream: what both diseases' lesions are placed on."""

    c: np.ndarray
    r: float
    disc: np.ndarray
    mac: np.ndarray
    paths: list[np.ndarray]
    yy: np.ndarray
    xx: np.ndarray


def _dr_lesions(rng: np.random.Generator, img: np.ndarray, u: EyeLatent, eye: Eye, red: np.ndarray) -> None:
    d, s, c, r = u.dr, img.shape[0], eye.c, eye.r
    if d <= 0:  # the control's AMD set: no DR at all
        return
    n_ma = int(rng.poisson(16 * _ramp(d, 0.1, 0.45)))
    n_blot = int(rng.poisson(18 * u.haemorrhage * _ramp(d, 0.33, 0.75)))
    n_ex = int(rng.poisson(9 * u.exudate * _ramp(d, 0.33, 0.7)))
    pts = _in_retina(rng, c, r, n_ma + n_blot, 0.15, 0.88)
    rad = np.concatenate([rng.uniform(0.024, 0.036, n_ma), rng.uniform(0.035, 0.065, n_blot)]) * r
    red += _spots(s, pts, rad) * rng.uniform(0.8, 1.0)
    if n_ex:  # hard exudates come in small clusters (leaking capillary beds)
        hubs = _in_retina(rng, c, r, 2, 0.2, 0.75)
        ex = hubs[rng.integers(0, 2, n_ex)] + rng.normal(0, 0.07 * r, (n_ex, 2))
        _blend(img, _spots(s, ex, rng.uniform(0.018, 0.032, n_ex) * r), _EXUD, rng.uniform(0.6, 0.9))
    beading = _ramp(d, 0.52, 0.68)
    if beading > 0.02:  # venous beading: sausage-like dark swellings along a stretch of a main vein
        m = np.zeros((s, s), np.uint8)
        for k in rng.choice(4, 2, replace=False):
            p = eye.paths[2 * k]
            j = int(rng.integers(2, len(p) - 4))
            seg = p[j] + (p[j + 3] - p[j]) * np.linspace(0, 1, 7)[:, None]
            for q, w in zip(seg, 0.025 * r * (1 + 0.6 * (np.arange(7) % 2)), strict=True):
                cv2.circle(m, fx(q), max(fx(w), 10), 255, -1, cv2.LINE_AA, shift=4)
        red += m.astype(np.float32) / 255 * 0.6 * beading
    growth = _ramp(d, 0.72, 0.88)
    if growth > 0.02:  # neovascular tufts: fine irregular loops at the disc, and a boat-shaped pre-retinal bleed
        m = np.zeros((s, s), np.uint8)
        for _ in range(int(rng.integers(2, 4))):
            ctr = eye.disc + rng.normal(0, 0.12 * r, 2)
            th = np.linspace(0, 2 * np.pi, 9) + rng.normal(0, 0.3, 9)
            loop = ctr + (0.06 * r * rng.uniform(0.6, 1.4, (9, 1))) * np.stack([np.cos(th), np.sin(th)], 1)
            pts = np.round(loop * 16).astype(np.int32)
            cv2.polylines(m, [pts], True, 255, max(1, round(0.012 * s)), cv2.LINE_AA, 4)
        _blend(img, m.astype(np.float32) / 255, (0.55, 0.04, 0.05), 0.8 * growth)
        b = np.zeros((s, s), np.uint8)
        ctr, ax = _in_retina(rng, c, r, 1, 0.35, 0.7)[0], fx(rng.uniform(0.18, 0.28, 2) * r)
        cv2.ellipse(b, fx(ctr), ax, 0, 0, 180, 255, -1, cv2.LINE_AA, 4)  # flat top: blood settles
        red += b.astype(np.float32) / 255 * 0.9 * growth * u.haemorrhage


def _amd_lesions(rng: np.random.Generator, img: np.ndarray, u: EyeLatent, eye: Eye, red: np.ndarray) -> None:
    a, s, r, mac, yy, xx = u.amd, img.shape[0], eye.r, eye.mac, eye.yy, eye.xx
    if a <= 0:  # the control's DR set: no AMD at all
        return
    # A few tiny hard drusen on low grades (normal ageing, "no AMD" in AREDS): grade 0 vs 1 is by size.
    n_tiny = int(rng.poisson(2.0 * (1 - _ramp(a, 0.15, 0.3))))
    n_small = int(rng.poisson(10 * _ramp(a, 0.12, 0.35) * (1 - 0.6 * _ramp(a, 0.5, 0.8))))
    n_large = int(rng.poisson(9 * _ramp(a, 0.38, 0.6) * (1 - 0.6 * _ramp(a, 0.75, 0.95))))
    pts = mac + rng.normal(0, 0.13 * r, (n_tiny + n_small + n_large, 2))
    rad = np.concatenate([rng.uniform(0.012, 0.02, n_tiny), rng.uniform(0.02, 0.035, n_small),
                          rng.uniform(0.045, 0.075, n_large)]) * r
    _blend(img, cv2.GaussianBlur(_spots(s, pts, rad), (3, 3), 0.7), _DRUSEN, rng.uniform(0.35, 0.65))
    pigment = _ramp(a, 0.4, 0.6)
    if pigment > 0.02:  # pigment change: coarse dark/light mottling confined to the macula
        noise = cv2.resize(rng.random((7, 7)).astype(np.float32), (s, s), interpolation=cv2.INTER_CUBIC)
        near = np.exp(-((np.hypot(xx - mac[0], yy - mac[1]) / (0.2 * r)) ** 2))
        alpha = rng.uniform(0.25, 0.5) * pigment
        _blend(img, (noise < 0.35) * near, (0.25, 0.1, 0.04), alpha)
        _blend(img, (noise > 0.7) * near, (0.95, 0.75, 0.5), 0.6 * alpha)
    cnv = _ramp(a, 0.68, 0.82)
    if cnv > 0.02:  # CNV: grey-green membrane, a rim of haemorrhage, exudate ring further out
        rad0 = rng.uniform(0.1, 0.16) * r
        ctr = mac + rng.normal(0, 0.04 * r, 2)
        inner = _disc(yy, xx, ctr, rad0, 2)
        red += (_disc(yy, xx, ctr, rad0 * rng.uniform(1.3, 1.6), 2) - inner) * 0.85 * cnv * u.haemorrhage
        n_ring = int(rng.poisson(7 * cnv * u.exudate))
        th = rng.uniform(0, 2 * np.pi, n_ring)
        ring = ctr + rad0 * rng.uniform(1.7, 2.2, (n_ring, 1)) * np.stack([np.cos(th), np.sin(th)], 1)
        _blend(img, _spots(s, ring, rng.uniform(0.015, 0.03, n_ring) * r), _EXUD, 0.7)
        _blend(img, inner, (0.38, 0.46, 0.4), rng.uniform(0.55, 0.8) * cnv)


# ---------------------------------------------------------------- fundus photo


def _fundus(streams: tuple[np.random.Generator, ...], u: EyeLatent, s: int) -> np.ndarray:
    rng, dr_rng, amd_rng = streams
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
    eye = Eye(c, r, disc, mac, paths, yy, xx)
    _dr_lesions(dr_rng, img, u, eye, red)
    _amd_lesions(amd_rng, img, u, eye, red)
    _blend(img, np.minimum(red, 1.0), _HAEM, 0.85)
    img *= rng.uniform(0.85, 1.15) ** 2  # exposure varies a lot between cameras
    # Sensor noise, std 0.025: uniform is 5x cheaper to draw than normal and the blur below rounds it off anyway.
    img += 0.0866 * (rng.random(img.shape, dtype=np.float32) - 0.5)
    sigma = float(rng.uniform(0.4, 0.9))  # focus varies, too
    img = cv2.GaussianBlur(img, (3, 3), sigma) * _disc(yy, xx, c, r, 1.5)[..., None]
    return np.clip(img[..., ::-1] * 255 + 0.5, 0, 255).astype(np.uint8)  # RGB -> BGR for cv2.imwrite


# ---------------------------------------------------------------- planning: eyes, names, splits, noise


class Image(NamedTuple):
    set: str  # dr | amd: the disease this image is graded for
    name: str
    split: str
    pool: str  # main | test
    case: int  # index in the pool's case stream
    clean_grade: int  # the set's own grade, from the latent
    grade: int  # as listed (after grader noise)
    hidden_grade: int  # the other disease's grade, from the same latent
    latent: EyeLatent  # what the image renders


def _fill(seed: int, disease: str, pool: str, per_grade: int) -> list[list[tuple[int, EyeLatent]]]:
    """Eyes in stream order, each kept until its own grade holds `per_grade`: [(case, latent)] per grade."""
    kept: list[list[tuple[int, EyeLatent]]] = [[] for _ in range(len(CUTS[disease]) + 1)]
    case = 0
    while min(len(rows) for rows in kept) < per_grade:
        latent = _draw_latent(np.random.default_rng([seed, _CASE, _SET_ID[disease], _POOL_ID[pool], case]))
        rows = kept[latent.grade(disease)]
        if len(rows) < per_grade:
            rows.append((case, latent))
        case += 1
    return kept


def _names(disease: str, layout: str, pool: str, n: int, seed: int) -> list[str]:
    if disease == "amd":
        return [f"amd_{'t' if pool == 'test' else ''}{k + 1:04d}" for k in range(n)]
    if layout == "aptos":  # APTOS id_code: 12 hex digits
        tag = "" if pool == "main" else f"{pool}:"
        return [hashlib.blake2b(f"{seed}:dr:{tag}{k}".encode(), digest_size=6).hexdigest() for k in range(n)]
    first = 10 if pool == "main" else 100_000  # Kaggle: <patient>_<eye>, two eyes per patient
    return [f"{first + 3 * (k // 2)}_{('left', 'right')[k % 2]}" for k in range(n)]


def _main_splits(names: list[str], grades: list[int], held_test: bool) -> list[str]:
    """prepare fundus-grading's default split (patient-level, stratified, split seed 0), or train/dev 75/25
    when the test pool is the test split."""
    from kdcli.sources.fundus_grading import patient_of, split_groups

    group_grades: dict[str, int] = {}
    for name, grade in zip(names, grades, strict=True):
        group_grades[patient_of(name)] = max(grade, group_grades.get(patient_of(name), 0))
    ratios = (0.75, 0.25, 0.0) if held_test else (0.6, 0.2, 0.2)
    by_group = split_groups(group_grades, ratios, 0)
    return [by_group[patient_of(name)] for name in names]


def _plan(per_grade: dict[str, int], test_per_class: int, seed: int, dr_layout: str, independent: bool,
          label_noise: float) -> list[Image]:
    images: list[Image] = []
    for disease in SETS:
        other = "amd" if disease == "dr" else "dr"
        pools = {"main": per_grade[disease], **({"test": test_per_class} if test_per_class else {})}
        for pool, count in pools.items():
            by_grade = _fill(seed, disease, pool, count)
            flat = [(grade, case, latent) for grade, rows in enumerate(by_grade) for case, latent in rows]
            # grades interleaved, so that the two eyes of an EyePACS patient mostly differ
            order = np.random.default_rng([seed, _ORDER, _SET_ID[disease], _POOL_ID[pool]]).permutation(len(flat))
            flat = [flat[i] for i in order]
            names = _names(disease, dr_layout, pool, len(flat), seed)
            splits = (_main_splits(names, [g for g, _, _ in flat], bool(test_per_class)) if pool == "main"
                      else ["test"] * len(flat))
            for name, split, (grade, case, latent) in zip(names, splits, flat, strict=True):
                if independent:  # a population without the other disease: its severity is 0
                    latent = latent._replace(**{other: 0.0})
                listed = grade
                if split == "train" and label_noise > 0:
                    severity = getattr(latent, disease)
                    draw = np.random.default_rng([seed, _NOISE, _SET_ID[disease], _POOL_ID[pool], case]).random()
                    if draw < flip_probability(severity, disease, label_noise):
                        listed = int(_neighbour_and_margin(np.array([severity]), disease)[0][0])
                images.append(Image(disease, name, split, pool, case, grade, listed, latent.grade(other), latent))
    return images


# ---------------------------------------------------------------- writing


Job = tuple[str, tuple[int, ...], tuple[float, ...], int]  # path, stream key, latent, size


def _render(job: Job) -> None:
    path, key, latent, size = job
    streams = tuple(np.random.default_rng([*key, part]) for part in (_BASE, _DR_LESIONS, _AMD_LESIONS))
    img = _fundus(streams, EyeLatent(*latent), size)
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if path.endswith(".jpeg") else []
    if not cv2.imwrite(path, img, params):
        raise OSError(f"cv2 could not write {path}")


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


@dataclass
class FundusGradingSynthOptions:
    """Two disjoint graded fundus sets (DR 0-4, AMD 0-3): every eye renders one latent with both diseases, each
    set lists its own grade; splits.csv in each set is the phantom's split (prepare --splits)."""

    out_help: ClassVar[str] = "Folder to write: dr/ (EyePACS or APTOS layout) and amd/."

    per_class: int = field(default=100, metadata={
        "help": "DR eyes per DR grade, all splits together (without --test-per-class's pool)."})
    amd_per_class: int = field(default=20, metadata={"help": "AMD eyes per AMD grade: the small set SALL helps."})
    size: int = size_field(128)
    seed: int = seed_field()
    dr_layout: str = field(default="eyepacs", metadata={"help": "eyepacs (trainLabels.csv) or aptos (train.csv)."})
    label_noise: float = label_noise_field(
        "Share of TRAINING grades moved to the neighbouring grade, borderline eyes most often (grader noise); "
        "dev/test stay clean; listed in label_noise.csv.")
    independent: bool = field(default=False, metadata={
        "help": "Negative control: each set's eyes show no sign of the other disease, so SALL's extra labels "
                "carry nothing."})
    test_per_class: int = field(default=0, metadata={
        "help": "Test eyes per grade and set from a pool of their own, the same whatever --per-class is (0: 20% "
                "of each set)."})
    workers: int = workers_field()

    def report(self, summary: dict, out: Path) -> list[str]:
        lines = []
        for name, info in summary["sets"].items():
            counts = info["split_counts"]
            moved = f", {info['flipped']} training grades moved" if self.label_noise else ""
            lines.append(f"{name}: {sum(info['counts'])} images ({counts['train']}/{counts['dev']}/{counts['test']} "
                         f"train/dev/test{moved}), labels {info['labels']}")
        if self.label_noise or self.test_per_class:
            lines.append("prepare each set with --splits <set>/splits.csv (the grader noise and the test pool "
                         "depend on it)")
        return lines


@takes(FundusGradingSynthOptions)
def synth_fundus_grading(
    out: Path,
    *,
    per_class: int = 100,
    amd_per_class: int = 20,
    size: int = 128,
    seed: int = 0,
    dr_layout: str = "eyepacs",
    label_noise: float = 0.0,
    independent: bool = False,
    test_per_class: int = 0,
    workers: int = 1,
) -> dict:
    """Write a DR-graded set (EyePACS or APTOS layout, `per_class` eyes per DR grade) and an AMD-graded set
    (`amd_per_class` per AMD grade) under `out`; the module docstring tells the generative story.

    `label_noise` (rho in [0, 0.5)): grader noise on the TRAIN grades, moved to the neighbouring grade, mostly
    on borderline eyes. `independent`: the negative control (each set without the other disease).
    `test_per_class`: that many more test eyes per grade and set, from a pool of their own.
    Returns {"root", "design" ("shared" | "independent"), "label_noise", "sets": {"dr"|"amd": {"labels" (csv
    path), "images" (folder), "splits" (splits.csv path), "counts" ([eyes per own grade, all splits]),
    "split_counts" ({split: n}), "hidden" ({image name: the other disease's grade}), "flipped" (n)}},
    "images": [{"set", "name", "split", "pool", "clean_grade", "grade", "hidden_grade", "latent" (EyeLatent)}]}.
    Output depends only on the arguments (not `workers`): the same arguments give identical bytes.
    """
    for name, value in (("per_class", per_class), ("amd_per_class", amd_per_class)):
        if not 3 <= value <= MAX_PER_CLASS:
            raise ValueError(f"{name} must be between 3 and {MAX_PER_CLASS}, got {value}")
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    if dr_layout not in DR_LAYOUTS:
        raise ValueError(f"dr_layout must be one of {sorted(DR_LAYOUTS)}, got {dr_layout!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")  # numpy SeedSequence rejects negative entropy
    label_noise = float(label_noise)
    if not 0.0 <= label_noise < FLIP_CAP:  # also refuses NaN
        raise ValueError(f"label_noise must be in [0, {FLIP_CAP}), got {label_noise}")
    if not 0 <= test_per_class <= MAX_PER_CLASS:
        raise ValueError(f"test_per_class must be between 0 and {MAX_PER_CLASS}, got {test_per_class}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out)
    images = _plan({"dr": per_class, "amd": amd_per_class}, test_per_class, seed, dr_layout, independent,
                   label_noise)
    layouts = {"dr": (*DR_LAYOUTS[dr_layout], ".jpeg" if dr_layout == "eyepacs" else ".png"),
               "amd": (*AMD_LAYOUT, ".png")}
    jobs: list[Job] = []
    summary: dict[str, dict] = {}
    for disease in SETS:
        csv_name, col_img, col_lvl, folder, ext = layouts[disease]
        rows = [im for im in images if im.set == disease]
        img_dir = out / disease / folder
        img_dir.mkdir(parents=True, exist_ok=True)
        _write_csv(out / disease / csv_name, [col_img, col_lvl], [[im.name, im.grade] for im in rows])
        _write_csv(out / disease / SPLITS_NAME, ["image", "split"], [[im.name, im.split] for im in rows])
        jobs += [(str(img_dir / f"{im.name}{ext}"), (seed, _SET_ID[disease], _POOL_ID[im.pool], im.case),
                  tuple(im.latent), size) for im in rows]
        summary[disease] = {
            "labels": str(out / disease / csv_name),
            "images": str(img_dir),
            "splits": str(out / disease / SPLITS_NAME),
            "counts": np.bincount([im.clean_grade for im in rows], minlength=len(CUTS[disease]) + 1).tolist(),
            "split_counts": {split: sum(im.split == split for im in rows) for split in ("train", "dev", "test")},
            "hidden": {im.name: im.hidden_grade for im in rows},
            "flipped": sum(im.grade != im.clean_grade for im in rows),
        }
    _write_csv(out / LATENTS_NAME, ["set", "image", "split", "pool", "dr_severity", "amd_severity", "haemorrhage",
                                    "exudate", "dr_grade", "amd_grade", "listed_grade"],
               [[im.set, im.name, im.split, im.pool, *(f"{v:.6f}" for v in im.latent), im.latent.grade("dr"),
                 im.latent.grade("amd"), im.grade] for im in images])
    if label_noise > 0:
        _write_csv(out / NOISE_NAME, ["set", "image", "clean_grade", "listed_grade"],
                   [[im.set, im.name, im.clean_grade, im.grade] for im in images if im.grade != im.clean_grade])
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_render, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    else:
        for job in jobs:
            _render(job)
    return {
        "root": str(out), "design": "independent" if independent else "shared", "label_noise": label_noise,
        "sets": summary,
        "images": [{"set": im.set, "name": im.name, "split": im.split, "pool": im.pool,
                    "clean_grade": im.clean_grade, "grade": im.grade, "hidden_grade": im.hidden_grade,
                    "latent": im.latent} for im in images],
    }
