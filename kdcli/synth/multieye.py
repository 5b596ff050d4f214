"""Deterministic MultiEYE phantom: fake fundus photos + OCT B-scans in the real xmed-lab/MultiEYE layout.

Generative story (what a distillation method can and cannot exploit here)
------------------------------------------------------------------------
1. Case latent. Every eye ("case") draws a latent u first, from a random stream keyed by the case alone
   (seed, pool, eye tag, case index) -- never by its class, its modality or its split:
     - severity s = U^1.5, U ~ U(0, 1): how far the disease has progressed (most eyes far from the threshold);
     - a subtype mix: a primary disease p (uniform over the 8 diseases), a secondary disease q (70 %: one of
       p's two clinical neighbours, e.g. dry AMD -> wet AMD or CSC, DR -> RVO; 30 %: any other disease) and
       the secondary share m ~ Beta(1, 5); disease loads L_p = s (1 - m), L_q = s m, every other load 0;
     - the lesion position: a focus f ~ U(-1, 1), the signed distance of the lesions from the fovea towards
       the optic disc (the same anatomical place in both modalities);
     - a concept profile e_k ~ U(0.8, 1) for each of the K = 22 concepts of the source's bank
       (kdcli.sources.multieye.CONCEPTS): how strongly this eye expresses each sign of its diseases.
   Concept activations: a_k = L_d(k) e_k for a concept k of disease d(k); a_k = (1 - s) e_k for the three
   "normal" concepts.
2. Label. Class scores are NOR: S0 max(1 - m, m) with S0 = 0.15, disease d: L_d; the label is the argmax.
   So an eye is NOR exactly when s < S0, and otherwise its dominant disease; eyes near s = S0 or m = 0.5 are
   borderline (about 13 % of the diseased eyes and 18 % of the normal ones have a margin below 0.3). The
   margin, log(best score / second score), measures how borderline; the second-best class is the eye's
   confusable neighbour (for a diseased eye NOR in about 3 cases of 4, else the other disease of its mix).
   Exact per-class counts come from drawing cases in stream order and keeping each until its class is full
   (quota sampling: within a class, cases are i.i.d. from p(u | class)).
3. Rendering. Each modality draws every concept from the same activations a_k and focus f -- the label
   never enters the pixels except through u:
     - OCT (the teacher's modality), strong gain: a concept is drawn at (1 + h) a / (a + h), h = OCT_KNEE
       = 0.25 (a quarter load already shows at 5/8): drusen and PED lift the RPE, fluid lifts the retina,
       cysts, exudates, membranes, cupping, nerve fibre thinning, staphyloma curvature..., sized and counted
       in proportion;
     - fundus (the student's), weak gain: alpha blending at FUNDUS_GAIN * fundus_signal * a (FUNDUS_GAIN =
       1.3, faint against the photo's own variation): the same concepts as yellow spots, patches, red dots,
       arcs, a larger cup-to-disc ratio..., lesion counts following a itself.
   Nuisance (illumination, vessel tree, disc side, fovea position, exact lesion scatter, speckle, noise)
   comes from a separate stream per modality and case, so two modalities of one eye share u and nothing else.
4. Pairing. `paired=True`: one eye, one name, in both modalities; its fundus photo and its B-scan render the
   same u (what paired KD needs). Unpaired (default): each modality's eyes are separate cases with their own
   latents; CoDA can relate the modalities only through the class and the concepts.
5. Label noise (`label_noise` = rho). A training eye's listed label is flipped to its confusable neighbour with
   probability min(1/2, c exp(-margin / M0)), M0 = 0.2: flips favour borderline eyes, as with real raters,
   and no label is flipped more often than kept. c is solved once on a large reference sample of latents so
   that the expected flip rate of a class-balanced training split is rho. At rho = 0.1 two flips in three hit
   an eye with margin < 0.3, at rho = 0.2 one in three (the borderline eyes alone cannot supply more). One
   draw per eye (a paired eye keeps one label in both lists). Dev and test labels stay clean;
   `<out>/label_noise.csv` lists every flipped image with both labels.
6. Negative control (`independent=True`): the design before this one. The OCT image renders the case latent
   as above (byte-identical images), but the fundus image renders its own latent, drawn from a stream of its
   own conditioned on the eye's clean label: fundus and OCT of one eye then share only the class. For
   unpaired data this changes nothing in distribution when rho = 0; with label noise the flips (decided on
   the case latent) no longer relate to what the fundus shows.

Sizes: `per_class` images per class and modality over all splits, split 60/20/20; with `test_per_class` (or
`dev_per_class`) > 0 that split comes from a case pool of its own, identical whatever `per_class` is, and
`per_class` covers the remaining splits (75/25, or all of it when both are set).
Unlabeled pool (`unlabeled=N`): N more eyes per modality (the same eyes in both when paired) from a case pool
of their own, in the stream's natural class mix (no class quota: nobody graded them), rendered like the
others and listed by name only in `assemble[_oct]/train/unlabeled.txt` — what `prepare multieye` reads as
unlabeled training data for distillation. Their latents and clean classes are in `latents.csv`.
Side files: `<out>/concept_embeddings.npy` (K x 512, orthonormal rows, the bank's order: pass it as
`--concept-embeddings`), `<out>/latents.csv` (every image's latent, clean and listed label) and, when
rho > 0, `<out>/label_noise.csv`.
"""

from __future__ import annotations

import csv
import hashlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import ClassVar, NamedTuple

import cv2
import numpy as np

from kdcli.sources.multieye import CONCEPTS
from kdcli.synth._fundus import fx, vessel_paths
from kdcli.synth._noise import scale_for_rate
from kdcli.synth._options import label_noise_field, seed_field, size_field, takes, workers_field

CLASSES = ("NOR", "AMD", "CSC", "DR", "GLC", "MEM", "MYO", "RVO", "WAMD")
SPLITS = ("train", "dev", "test")
MODALITIES = ("fundus", "oct")
# (list root, image folder) as data/dataset.py reads them; every split's images live under train/ImageData.
LAYOUT = {"fundus": ("assemble", "cfp-clahe-224x224"), "oct": ("assemble_oct", "oct-filter-448x448")}
LIST_NAME = "large9cls.txt"
UNLABELED_LIST = "unlabeled.txt"
EMBEDDINGS_NAME = "concept_embeddings.npy"
LATENTS_NAME = "latents.csv"
NOISE_NAME = "label_noise.csv"
EMBEDDING_DIM = 512  # kdcli's default --concept-dim
_MOD_ID = {"fundus": 1, "oct": 2}
_TAG_ID = {"e": 0, "f": 1, "o": 2}
_POOL_ID = {"main": 0, "dev": 1, "test": 2, "unlabeled": 3}
# Stream keys: each random stream has its own first entry, so no two streams ever coincide.
_CASE, _FREE, _NOISE, _NUISANCE, _REFERENCE = 11, 12, 13, 14, 15

# Which class drives each concept of the bank (kdcli.sources.multieye.CONCEPTS, in order).
CONCEPT_CLASS = (0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 4, 4, 5, 5, 6, 6, 6, 7, 7, 8, 8, 8)
assert len(CONCEPT_CLASS) == len(CONCEPTS), "one driving class per concept of the source's bank"
(_DRUSEN, _RPE, _SRF, _DISCOLOUR, _HAEM_DOTS, _EXUDATES, _CYSTS, _CUP, _RNFL, _ERM, _WRINKLE, _TESSEL, _PPA,
 _STAPH, _FLAME, _OEDEMA, _PED, _CNV, _SUB_HAEM) = range(3, 22)

NOR_THRESHOLD = 0.15  # S0: severity below which an eye is normal
SEVERITY_POWER = 1.5  # s = U^1.5: most normal eyes are far from the threshold, most diseased ones too
NEIGHBOUR_SHARE = 0.7  # how often the secondary disease is one of the primary's clinical neighbours
MIX_BETA = 5.0  # secondary share m ~ Beta(1, MIX_BETA)
FLIP_MARGIN = 0.2  # M0: label flips fall off as exp(-margin / M0)
FLIP_CAP = 0.5  # no label is flipped more often than kept
FUNDUS_GAIN = 1.3  # fundus alpha per unit of activation (each lesion type scales it further): faint
OCT_KNEE = 0.25  # OCT draws a concept at (1 + knee) a / (a + knee): concave, a quarter load is already 5/8
# Clinical neighbours of each disease (the continua raters confuse): two per class index 1..8.
NEIGHBOURS = np.array([[0, 0], [8, 2], [8, 1], [7, 5], [6, 1], [3, 7], [4, 1], [3, 5], [1, 2]])


class Latent(NamedTuple):
    """One eye's latent u (see the module docstring)."""

    severity: float
    primary: int
    secondary: int
    mix: float
    focus: float
    profile: tuple[float, ...]

    def scores(self) -> np.ndarray:
        return _scores(np.array([self.severity]), np.array([self.primary]), np.array([self.secondary]),
                       np.array([self.mix]))[0]

    def activations(self) -> np.ndarray:
        """Concept activations a_k in [0, 1], in the bank's order."""
        loads = self.scores()
        loads[0] = 1 - self.severity
        return loads[list(CONCEPT_CLASS)] * np.asarray(self.profile)


def _sample_latents(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    severity = rng.random(n) ** SEVERITY_POWER
    primary = rng.integers(1, len(CLASSES), n)
    near = rng.random(n) < NEIGHBOUR_SHARE
    pick = rng.integers(0, 2, n)
    other = rng.integers(1, len(CLASSES) - 1, n)  # any disease but the primary
    secondary = np.where(near, NEIGHBOURS[primary, pick], other + (other >= primary))
    mix = rng.beta(1.0, MIX_BETA, n)
    focus = rng.uniform(-1.0, 1.0, n)
    profile = rng.uniform(0.8, 1.0, (n, len(CONCEPTS)))
    return {"severity": severity, "primary": primary, "secondary": secondary, "mix": mix, "focus": focus,
            "profile": profile}


def _scores(severity: np.ndarray, primary: np.ndarray, secondary: np.ndarray, mix: np.ndarray) -> np.ndarray:
    rows = np.arange(len(severity))
    scores = np.zeros((len(severity), len(CLASSES)))
    scores[rows, primary] = severity * (1 - mix)
    scores[rows, secondary] = severity * mix
    scores[:, 0] = NOR_THRESHOLD * np.maximum(1 - mix, mix)
    return scores


def _draw_latent(rng: np.random.Generator) -> Latent:
    d = _sample_latents(rng, 1)
    return Latent(float(d["severity"][0]), int(d["primary"][0]), int(d["secondary"][0]), float(d["mix"][0]),
                  float(d["focus"][0]), tuple(float(v) for v in d["profile"][0]))


def _rank(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(label, confusable neighbour, margin) per row of class scores; the margin is the log ratio of the two
    best scores, so that "twice as much" is as clear on the faint side of the NOR threshold as on the other."""
    order = np.argsort(-scores, axis=-1, kind="stable")
    top = np.log(np.maximum(np.take_along_axis(scores, order[..., :2], -1), 1e-12))
    return order[..., 0], order[..., 1], top[..., 0] - top[..., 1]


def label_of(latent: Latent) -> int:
    return int(_rank(latent.scores())[0])


@lru_cache(maxsize=16)
def _flip_scale(rho: float) -> float:
    """c such that a class-balanced training split flips rho of its labels in expectation."""
    d = _sample_latents(np.random.default_rng([_REFERENCE]), 100_000)
    label, _, margin = _rank(_scores(d["severity"], d["primary"], d["secondary"], d["mix"]))
    weight = np.exp(-margin / FLIP_MARGIN)
    per_class = [weight[label == c] for c in range(len(CLASSES))]

    def rate(c: float) -> float:
        return float(np.mean([np.minimum(FLIP_CAP, c * w).mean() for w in per_class]))

    return scale_for_rate(rate, rho)


def flip_probability(latent: Latent, rho: float) -> float:
    if rho <= 0:
        return 0.0
    return min(FLIP_CAP, _flip_scale(rho) * float(np.exp(-_rank(latent.scores())[2] / FLIP_MARGIN)))


def concept_embeddings(dim: int = EMBEDDING_DIM) -> np.ndarray:
    """K x dim orthonormal rows, one per concept of the bank: every concept its own direction, so a concept
    similarity head can express any pattern of activations. Fixed: the same for every phantom."""
    q, _ = np.linalg.qr(np.random.default_rng([_REFERENCE, 1]).standard_normal((dim, len(CONCEPTS))))
    return np.ascontiguousarray(q.T, dtype=np.float32)


# ---------------------------------------------------------------- planning: cases, names, splits, lists


class Image(NamedTuple):
    name: str
    modality: str
    split: str
    pool: str
    case: int  # index in the pool's case stream
    index: int  # k: position among the pool's images of this modality (drives the file-format quirks)
    clean_label: int
    label: int  # as listed (after label noise)
    latent: Latent  # what the image renders


def _eye_name(tag: str, seed: int, pool: str, case: int, k: int) -> str:
    key = f"{seed}:{tag}:{case}" if pool == "main" else f"{seed}:{tag}:{pool}:{case}"
    name = f"{tag}-{hashlib.blake2b(key.encode(), digest_size=5).hexdigest()}"
    # Real MultiEYE names carry dots (the official code even shows "<uuid>..png"): breaks naive suffix logic.
    if k % 9 == 4:
        return name + ".1"
    return name + "." if k % 9 == 7 else name


def _fill(seed: int, pool: str, tag: str, per_class: int) -> list[list[tuple[int, Latent]]]:
    """Cases in stream order, each kept until its class holds `per_class`: [(case index, latent)] per class."""
    kept: list[list[tuple[int, Latent]]] = [[] for _ in CLASSES]
    case = 0
    while min(len(rows) for rows in kept) < per_class:
        latent = _draw_latent(np.random.default_rng([seed, _CASE, _POOL_ID[pool], _TAG_ID[tag], case]))
        rows = kept[label_of(latent)]
        if len(rows) < per_class:
            rows.append((case, latent))
        case += 1
    return kept


def _free_latent(seed: int, pool: str, tag: str, case: int, label: int) -> Latent:
    """The negative control's fundus latent: a stream of its own, conditioned on the eye's clean label."""
    rng = np.random.default_rng([seed, _FREE, _POOL_ID[pool], _TAG_ID[tag], case])
    while True:
        latent = _draw_latent(rng)
        if label_of(latent) == label:
            return latent


def _held_counts(n: int, held: tuple[str, ...]) -> dict[str, int]:
    if not held:
        return {"train": n}
    share = 0.2 if len(held) == 2 else 0.25
    counts = {split: max(1, round(share * n)) for split in held}
    return {"train": n - sum(counts.values()), **counts}


def _plan(per_class: int, seed: int, paired: bool, independent: bool, label_noise: float,
          pools: dict[str, int], unlabeled: int = 0) -> list[Image]:
    """Every image to write. `pools`: pool name -> images per class (main covers the splits the others don't)."""
    own = [split for split in ("dev", "test") if split in pools]
    held = tuple(split for split in ("dev", "test") if split not in own)
    images: list[Image] = []
    for tag, mods in ((("e", MODALITIES),) if paired else (("f", ("fundus",)), ("o", ("oct",)))):
        for pool, count in pools.items():
            by_class = _fill(seed, pool, tag, count)
            counts = _held_counts(count, held) if pool == "main" else {pool: count}
            bounds = np.cumsum(list(counts.values()))
            for label, rows in enumerate(by_class):
                rank = np.argsort(np.random.default_rng([seed, 7, label]).permutation(count))
                for i, (case, latent) in enumerate(rows):
                    split = list(counts)[int(np.searchsorted(bounds, rank[i], side="right"))]
                    noisy = label
                    if split == "train" and label_noise > 0:
                        draw = np.random.default_rng([seed, _NOISE, _POOL_ID[pool], _TAG_ID[tag], case]).random()
                        if draw < flip_probability(latent, label_noise):
                            noisy = int(_rank(latent.scores())[1])
                    k = label * count + i
                    for mod in mods:
                        shown = latent
                        if independent and mod == "fundus":
                            shown = _free_latent(seed, pool, tag, case, label)
                        images.append(Image(_eye_name(tag, seed, pool, case, k), mod, split, pool, case, k,
                                            label, noisy, shown))
        for case in range(unlabeled):  # the natural class mix, label -1
            latent = _draw_latent(np.random.default_rng([seed, _CASE, _POOL_ID["unlabeled"], _TAG_ID[tag], case]))
            label = label_of(latent)
            for mod in mods:
                shown = _free_latent(seed, "unlabeled", tag, case, label) if independent and mod == "fundus" \
                    else latent
                images.append(Image(_eye_name(tag, seed, "unlabeled", case, case), mod, "unlabeled", "unlabeled",
                                    case, case, label, -1, shown))
    return images


def _write_list(path: Path, rows: list[tuple[str, int]], sep: str) -> None:
    # Quirks of the real download: some trailing whitespace and a blank last line.
    lines = [f"{name}{sep}{label}{' ' if j % 6 == 2 else ''}" for j, (name, label) in enumerate(rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n\n")


def _write_sidecars(out: Path, images: list[Image], label_noise: float) -> None:
    np.save(out / EMBEDDINGS_NAME, concept_embeddings())
    with open(out / LATENTS_NAME, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "modality", "split", "clean_label", "label", "severity", "primary", "secondary",
                         "mix", "focus", *[f"concept_{k}" for k in range(len(CONCEPTS))]])
        for im in images:
            u = im.latent
            writer.writerow([im.name, im.modality, im.split, im.clean_label, im.label, f"{u.severity:.6f}",
                             CLASSES[u.primary], CLASSES[u.secondary], f"{u.mix:.6f}", f"{u.focus:.6f}",
                             *[f"{a:.4f}" for a in u.activations()]])
    if label_noise > 0:
        with open(out / NOISE_NAME, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["name", "modality", "clean_label", "noisy_label"])
            writer.writerows([im.name, im.modality, im.clean_label, im.label]
                             for im in images if im.label != im.clean_label and im.split != "unlabeled")


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


def _count(rng: np.random.Generator, activation: float, most: float) -> int:
    """Lesion count growing with the activation (the load), with some nuisance spread."""
    return int(rng.poisson(most * activation)) if activation > 0.02 else 0


# ---------------------------------------------------------------- fundus photo


def _fundus(rng: np.random.Generator, act: np.ndarray, focus: float, s: int, gain: float) -> np.ndarray:
    a = gain * act  # how visible each concept is in fundus; lesion counts follow the activation itself
    c = (s / 2 + rng.normal(0, 0.025 * s, 2)).astype(np.float32)  # float32 throughout: 2x faster
    r = np.float32(s * rng.uniform(0.43, 0.48))
    side = int(rng.choice([-1, 1]))
    disc = c + [side * 0.55 * r + rng.normal(0, 0.03 * r), rng.normal(0, 0.06 * r)]
    mac = c + [-side * 0.12 * r + rng.normal(0, 0.04 * r), rng.normal(0, 0.04 * r)]
    focal = mac + [side * focus * 0.2 * r, rng.normal(0, 0.05 * r)]  # the shared lesion focus (towards the disc)
    yy, xx = np.mgrid[:s, :s].astype(np.float32)
    rr = np.hypot(xx - c[0], yy - c[1]) / r
    grad = rng.normal(0, 0.15, 2).astype(np.float32)
    tilt = 1 + grad[0] * (xx - c[0]) / r + grad[1] * (yy - c[1]) / r
    # A staphyloma bulges the posterior pole: the periphery falls off faster.
    illum = rng.uniform(0.75, 1.15) * (1 - (0.35 + 0.3 * a[_STAPH]) * rr**2) * tilt
    base = np.array([0.8, 0.36, 0.15], np.float32) * rng.uniform(0.9, 1.1, 3).astype(np.float32)
    img = (illum[..., None] * base).astype(np.float32)
    img *= 1 - 0.35 * np.exp(-((np.hypot(xx - mac[0], yy - mac[1]) / (0.13 * r)) ** 2))[..., None]
    noise = cv2.resize(rng.random((9, 9)).astype(np.float32), (s, s), interpolation=cv2.INTER_CUBIC)
    if a[_TESSEL] > 0:  # tessellation: choroidal vessels showing through a thin pigment layer
        _blend(img, (np.abs(noise - 0.5) > 0.08).astype(np.float32), (0.45, 0.16, 0.08), 0.6 * a[_TESSEL])
    paths = vessel_paths(rng, disc, r, side)
    vmask = np.zeros((s, s), np.uint8)
    for i, p in enumerate(paths):
        width = max(1, round((0.018 if i % 2 == 0 else 0.011) * s))
        cv2.polylines(vmask, [np.round(p * 16).astype(np.int32)], False, 255, width, cv2.LINE_AA, shift=4)
    img *= 1 - (vmask.astype(np.float32) / 255)[..., None] * np.array([0.35, 0.6, 0.5], np.float32)
    dr = 0.13 * r * rng.uniform(0.9, 1.1)
    cdr = rng.uniform(0.25, 0.45) + 0.6 * a[_CUP]
    # Thin nerve fibre layer: a duller peripapillary sheen.
    _blend(img, _disc_mask((s, s), *disc, 2.2 * dr, 0.8 * dr), (0.5, 0.2, 0.1), 0.5 * a[_RNFL])
    _blend(img, _disc_mask((s, s), *disc, dr), (1.0, 0.85, 0.55), 0.8)
    _blend(img, _disc_mask((s, s), *disc, min(cdr, 0.9) * dr), (1.0, 0.97, 0.85), 0.8)
    near = focal + rng.normal(0, 0.16 * r, (32, 2))
    if a[_RPE] > 0:  # irregular RPE: pigment mottling at the macula
        mottle = (np.abs(noise - 0.5) < 0.06).astype(np.float32) * _disc_mask((s, s), *focal, 0.35 * r, 0.2 * r)
        _blend(img, mottle, (0.3, 0.12, 0.05), 0.6 * a[_RPE])
    if n := min(16, _count(rng, act[_DRUSEN], 14)):  # drusen
        _blend(img, _spots((s, s), near[:n], rng.uniform(0.025, 0.05, n) * r), (0.95, 0.85, 0.35), a[_DRUSEN])
    if act[_SRF] > 0.02:  # serous detachment: round darker-yellow patch, a paler discoloured rim
        rad = (0.06 + 0.14 * act[_SRF]) * r * rng.uniform(0.85, 1.15)
        _blend(img, _disc_mask((s, s), *focal, rad * 1.3, 2) - _disc_mask((s, s), *focal, rad, 2),
               (1.0, 0.8, 0.5), 0.8 * a[_DISCOLOUR])
        _blend(img, _disc_mask((s, s), *focal, rad, 3), (0.7, 0.5, 0.15), 1.2 * a[_SRF])
    if n := _count(rng, act[_HAEM_DOTS], 14):  # dot haemorrhages anywhere
        dots = c + rng.uniform(-0.65, 0.65, (n, 2)) * r
        _blend(img, _spots((s, s), dots, rng.uniform(0.02, 0.04, n) * r), (0.35, 0.02, 0.02), a[_HAEM_DOTS])
    if n := min(16, _count(rng, act[_EXUDATES], 8)):  # hard exudates near the lesion focus
        _blend(img, _spots((s, s), near[16:16 + n], rng.uniform(0.02, 0.035, n) * r), (0.95, 0.9, 0.4),
               a[_EXUDATES])
    if act[_CYSTS] + act[_OEDEMA] > 0.04:  # macular oedema: a greyish thickened haze
        haze = _disc_mask((s, s), *focal, (0.1 + 0.1 * act[_OEDEMA]) * r, 0.1 * r)
        _blend(img, haze, (0.75, 0.6, 0.45), 0.5 * max(a[_CYSTS], a[_OEDEMA]))
    if n := _count(rng, act[_ERM], 6):  # cellophane sheen: thin bright wavy arcs around the macula
        m = np.zeros((s, s), np.uint8)
        for _ in range(n):
            ax, ang = fx(rng.uniform(0.12, 0.3, 2) * r), rng.uniform(0, 180)
            cv2.ellipse(m, fx(mac), ax, ang, 0, 200, 255, 1, cv2.LINE_AA, 4)
        _blend(img, m.astype(np.float32) / 255, (1.0, 1.0, 0.95), 0.6 * max(a[_ERM], a[_WRINKLE]))
    if act[_PPA] > 0.02:  # peripapillary atrophy crescent on the temporal side of the disc
        m = np.zeros((s, s), np.uint8)
        ctr, ax = fx(disc), fx([dr * 1.35] * 2)
        start = 90 if side == 1 else -90
        cv2.ellipse(m, ctr, ax, 0, start, start + 180, 255, max(1, round((0.2 + 0.6 * act[_PPA]) * dr)),
                    cv2.LINE_AA, 4)
        _blend(img, m.astype(np.float32) / 255, (0.95, 0.85, 0.7), 0.8 * a[_PPA])
    if n := _count(rng, act[_FLAME], 9):  # flame haemorrhages along one (blocked) vein branch
        p = paths[2 * int(rng.integers(0, 2))]
        m = np.zeros((s, s), np.uint8)
        for j in rng.choice(np.arange(2, len(p) - 1), min(n, len(p) - 3), replace=False):
            d = p[j + 1] - p[j] + rng.normal(0, 0.02 * r, 2)
            ctr, ax = fx(p[j] + rng.normal(0, 0.03 * r, 2)), fx([0.07 * r, max(0.02 * r, 1.0)])
            ang = float(np.degrees(np.arctan2(d[1], d[0])))  # flame-shaped: elongated along the vessel
            cv2.ellipse(m, ctr, ax, ang, 0, 360, 255, -1, cv2.LINE_AA, 4)
        _blend(img, m.astype(np.float32) / 255, (0.45, 0.03, 0.02), 1.2 * a[_FLAME])
    if max(act[_PED], act[_CNV]) > 0.02:  # grey-green CNV membrane over a PED, a rim of haemorrhage
        rad = (0.05 + 0.12 * max(act[_PED], act[_CNV])) * r
        inner = _disc_mask((s, s), *focal, rad, 2)
        _blend(img, _disc_mask((s, s), *focal, rad * 1.35, 2) - inner, (0.4, 0.03, 0.02), 0.8 * a[_SUB_HAEM])
        _blend(img, inner, (0.6, 0.55, 0.4), 0.5 * a[_PED])
        _blend(img, inner, (0.42, 0.48, 0.33), 0.8 * a[_CNV])
    img += 0.025 * rng.standard_normal(img.shape, dtype=np.float32)
    img = cv2.GaussianBlur(img, (3, 3), 0.6) * _disc_mask((s, s), *c, r, 1.5)[..., None]
    return np.clip(img[..., ::-1] * 255 + 0.5, 0, 255).astype(np.uint8)  # RGB -> BGR for cv2.imwrite


# ---------------------------------------------------------------- OCT B-scan

# Reflectivity across the neuroretina below the RNFL, by relative depth: GCL, IPL, INL, OPL, ONL, EZ, OS.
_RETINA_D = np.array([0.0, 0.25, 0.35, 0.5, 0.6, 0.86, 0.9, 0.94, 1.0], np.float32)
_RETINA_V = np.array([0.45, 0.55, 0.22, 0.5, 0.15, 0.15, 0.7, 0.3, 0.4], np.float32)


def _bumps(x: np.ndarray, centers: np.ndarray, widths: np.ndarray, heights: np.ndarray) -> np.ndarray:
    return (heights * np.exp(-(((x[:, None] - centers) / widths) ** 2))).sum(1).astype(np.float32)


def _oct(rng: np.random.Generator, act: np.ndarray, focus: float, s: int) -> np.ndarray:
    act = (1 + OCT_KNEE) * act / (act + OCT_KNEE)  # strong gain: even a small load shows clearly
    x = (np.arange(s, dtype=np.float32) + 0.5) / s
    y = x[:, None]
    side = int(rng.choice([0, 1]))  # which edge the optic disc is on
    fovea_x = 0.5 + rng.normal(0, 0.05)
    lesion_x = fovea_x + (1 if side else -1) * focus * 0.15  # the shared lesion focus, towards the disc
    spread = rng.uniform(0.06, 0.12)
    curv = rng.uniform(0.05, 0.35) + 0.9 * act[_STAPH]
    depth = rng.uniform(0.5, 0.6) + 0.1 * act[_STAPH]
    bm = depth + rng.normal(0, 0.06) * (x - fovea_x) - curv * (x - fovea_x) ** 2  # Bruch's membrane
    thick = rng.uniform(0.19, 0.24) * (1 - 0.4 * act[_STAPH]) * (1 + 0.8 * act[_OEDEMA])
    pit = rng.uniform(0.4, 0.6) * (1 - 0.7 * max(act[_WRINKLE], act[_OEDEMA]))
    nerve = np.exp(-(((x - side) / 0.1) ** 2))  # proximity to the disc
    t = thick * (1 - pit * np.exp(-(((x - fovea_x) / 0.07) ** 2))) + 0.03 * act[_OEDEMA] * nerve
    rnfl = (0.012 + 0.035 * np.abs(x - (1 - side))) * (1 - 0.8 * act[_RNFL]) * (t / thick)
    if n := _count(rng, act[_FLAME], 3):  # flame haemorrhages: a swollen, bright nerve fibre layer in places
        rnfl = rnfl + _bumps(x, rng.uniform(0.15, 0.85, n), np.full(n, 0.04), np.full(n, 0.02 * act[_FLAME]))
    # Disc-side excavation: the whole retina dips, and the inner surface dips far more (cupping).
    cup = (rng.uniform(0.0, 0.03) + 0.3 * act[_CUP]) * np.exp(-(((x - side) / 0.14) ** 2))
    bm = bm + 0.5 * cup
    drusen = np.zeros(s, np.float32)  # RPE lifted off Bruch's membrane by drusen material
    if n := _count(rng, act[_DRUSEN], 10):
        drusen = _bumps(x, lesion_x + rng.normal(0, 2 * spread, n), rng.uniform(0.02, 0.05, n),
                        rng.uniform(0.6, 1.0, n) * (0.02 + 0.05 * act[_DRUSEN]))
    ped = np.zeros(s, np.float32)  # serous pigment epithelial detachment
    if act[_PED] > 0.02:
        ped = _bumps(x, np.array([lesion_x]), rng.uniform(0.06, 0.1, 1), np.array([0.13 * act[_PED]]))
    srf = np.zeros(s, np.float32)  # neuroretina lifted off the RPE (subretinal fluid)
    if act[_SRF] > 0.02:
        srf = _bumps(x, lesion_x + rng.normal(0, 0.03, 1), rng.uniform(0.1, 0.16, 1), np.array([0.18 * act[_SRF]]))
    blood = np.zeros(s, np.float32)  # subretinal haemorrhage beside the CNV
    if act[_SUB_HAEM] > 0.02:
        beside = lesion_x + rng.choice([-1, 1]) * rng.uniform(0.1, 0.15, 1)
        blood = _bumps(x, beside, np.array([0.06]), np.array([0.05 * act[_SUB_HAEM]]))
    elev = drusen + ped
    # Drusen material is bright, a serous PED dark.
    sub_val = np.where(elev > 1e-4, (0.5 * drusen + 0.14 * ped) / np.maximum(elev, 1e-4), 0.5)
    rpe_th = 0.022 * (1 + 0.6 * act[_RPE] * rng.random(s).astype(np.float32))
    rpe = bm - rpe_th - elev - 0.012 * act[_RPE] * np.sin(x * rng.uniform(50, 90) + rng.uniform(0, 6))
    bot = rpe - srf - blood
    top = bot - t + cup
    if act[_WRINKLE] > 0.02:
        top = top + 0.025 * act[_WRINKLE] * np.sin(x * rng.uniform(40, 70) + rng.uniform(0, 6))
    img = np.full((s, s), 0.03, np.float32)  # vitreous
    rel = (y - top - rnfl) / np.maximum(bot - top - rnfl, 1e-3)
    inside = (y >= top) & (y < bot)
    img = np.where(inside, np.interp(rel, _RETINA_D, _RETINA_V), img)
    img = np.where(inside & (y < top + rnfl), 0.8, img)
    img = np.where((y >= bot) & (y < rpe), np.where(y >= bot + srf, 0.35, 0.04), img)  # fluid, then blood
    # Peripapillary atrophy: the RPE stops short of the disc.
    gap = np.abs(x - side) < 0.02 + 0.15 * act[_PPA]
    img = np.where((y >= rpe) & (y < rpe + rpe_th), np.where(gap, 0.3, 0.95), img)
    img = np.where((y >= rpe + rpe_th) & (y < bm), sub_val, img)  # drusen material / PED
    # Tessellation goes with a thin choroid.
    chor = (y - bm) / (rng.uniform(0.1, 0.16) * (1 - 0.6 * max(act[_TESSEL], act[_STAPH])))
    img = np.where(y >= bm, 0.03 + 0.4 * np.exp(-(np.maximum(chor, 0) ** 2)), img).astype(np.float32)
    lesions = np.zeros((s, s), np.uint8)  # intraretinal cysts: 255 = dark fluid pocket
    n = _count(rng, act[_CYSTS], 8) + _count(rng, act[_OEDEMA], 12)
    for cx in np.clip(lesion_x + rng.normal(0, 2.5 * spread, n), 0.05, 0.95):
        j = min(int(cx * s), s - 1)
        cy = top[j] + rng.uniform(0.35, 0.65) * (bot[j] - top[j])
        ax = fx([rng.uniform(0.015, 0.035) * s + 0.5, rng.uniform(0.012, 0.03) * s + 0.5])
        cv2.ellipse(lesions, fx([cx * s, cy * s]), ax, 0, 0, 360, 255, -1, cv2.LINE_AA, 4)
    img *= 1 - 0.9 * (lesions.astype(np.float32) / 255) * inside
    bright = np.zeros((s, s), np.uint8)
    # Hard exudates: hyperreflective dots in the outer plexiform layer; dot haemorrhages: in the inner layers.
    for concept, depth_frac, most in ((_EXUDATES, 0.55, 8), (_HAEM_DOTS, 0.3, 6)):
        for cx in np.clip(lesion_x + rng.normal(0, 3 * spread, _count(rng, act[concept], most)), 0.05, 0.95):
            j = min(int(cx * s), s - 1)
            cy = top[j] + depth_frac * (bot[j] - top[j])
            cv2.circle(bright, fx([cx * s, cy * s]), fx(0.015 * s + 0.5), 255, -1, cv2.LINE_AA, 4)
    if n := _count(rng, act[_DISCOLOUR], 6):  # shaggy photoreceptors: bright dots under the detached retina
        for cx in lesion_x + rng.normal(0, 0.04, n):
            j = min(max(int(cx * s), 0), s - 1)
            cv2.circle(bright, fx([cx * s, (rpe[j] - 0.3 * srf[j]) * s]), fx(0.01 * s + 0.5), 255, -1,
                       cv2.LINE_AA, 4)
    if act[_ERM] > 0.02:  # the membrane: a bright wrinkled line just above the inner retina
        half = 0.1 + 0.3 * act[_ERM]
        xs = np.linspace(fovea_x - half, fovea_x + half, 40)
        ys = np.interp(xs, x, top) - 0.015 + 0.008 * np.sin(xs * rng.uniform(30, 60))
        pts = np.round(np.stack([xs, ys], 1) * s * 16).astype(np.int32)
        cv2.polylines(bright, [pts], False, int(255 * min(1.0, 1.5 * act[_ERM])), max(1, round(0.02 * s)),
                      cv2.LINE_AA, shift=4)
    if act[_CNV] > 0.02:  # hyperreflective CNV mass sitting on the RPE
        j = min(max(int(lesion_x * s), 0), s - 1)
        ctr = fx([x[j] * s, (rpe[j] - 0.02) * s])
        ax = fx([(0.03 + 0.1 * act[_CNV]) * s, (0.015 + 0.045 * act[_CNV]) * s])
        cv2.ellipse(bright, ctr, ax, float(rng.uniform(-15, 15)), 0, 360, 255, -1, cv2.LINE_AA, 4)
    img = np.maximum(img, 0.85 * bright.astype(np.float32) / 255)
    img = img * rng.uniform(0.8, 1.2) * rng.gamma(4.0, 1 / 4.0, (s, s)).astype(np.float32)  # speckle
    return np.clip(cv2.GaussianBlur(img, (3, 3), 0.5) + rng.normal(0, 0.02, (s, s)), 0, 1).astype(np.float32)


# ---------------------------------------------------------------- writing

Job = tuple[str, str, int, int, tuple[int, ...], tuple[float, ...], float, float]
# path, modality, k, size, nuisance stream key, concept activations, focus, fundus gain


def _render(job: Job) -> None:
    path, mod, k, size, key, act, focus, gain = job
    rng = np.random.default_rng(list(key))
    activations = np.asarray(act, np.float32)
    if mod == "fundus":
        img = _fundus(rng, activations, focus, size, gain)
        if k % 8 == 6:  # a wide photo: the round retina between black side bands
            pad = round(size * 1.25) - size
            img = cv2.copyMakeBorder(img, 0, 0, pad // 2, pad - pad // 2, cv2.BORDER_CONSTANT, value=0)
    else:
        g = _oct(rng, activations, focus, size)
        # A few scanners export 16-bit greyscale.
        img = (g * 65535 + 0.5).astype(np.uint16) if k % 8 == 5 else (g * 255 + 0.5).astype(np.uint8)
    if not cv2.imwrite(path, img):
        raise OSError(f"cv2 could not write {path}")


@dataclass
class MultiEyeSynthOptions:
    """MultiEYE phantoms: one latent per eye (severity, subtype mix, lesion position) rendered clearly in OCT and
    faintly in fundus; concept_embeddings.npy beside the data is for --concept-embeddings."""

    out_help: ClassVar[str] = "Folder to write (MultiEYE layout: assemble/, assemble_oct/)."

    per_class: int = field(default=20, metadata={
        "help": "Images per class and modality, all splits together (without the splits --test-per-class / "
                "--dev-per-class fill)."})
    size: int = size_field(128)
    seed: int = seed_field()
    paired: bool = field(default=False, metadata={
        "help": "Same eyes in both modalities (for --method kd): each eye's fundus and OCT render one latent."})
    label_noise: float = label_noise_field(
        "Share of TRAINING labels flipped to the eye's confusable neighbour class, borderline eyes most often; "
        "dev/test stay clean; flips listed in label_noise.csv.")
    independent: bool = field(default=False, metadata={
        "help": "Negative control: each fundus image renders a latent of its own; fundus and OCT of an eye share "
                "only the class."})
    test_per_class: int = field(default=0, metadata={
        "help": "Test images per class from a case pool of their own, the same whatever --per-class is (0: 20% "
                "of it)."})
    dev_per_class: int = field(default=0, metadata={
        "help": "Dev images per class from a case pool of their own (0: 20% of --per-class, 25% with "
                "--test-per-class)."})
    unlabeled: int = field(default=0, metadata={
        "help": "Unlabeled eyes per modality (the same eyes in both with --paired), listed in "
                "train/unlabeled.txt."})
    workers: int = workers_field()

    def report(self, summary: dict, out: Path) -> list[str]:
        flipped = sum(summary["flipped"].values())
        return [f"wrote {sum(sum(c.values()) for c in summary['counts'].values())} images to {out}"
                + (f" (labels of {flipped} training images flipped, see {out / 'label_noise.csv'})"
                   if self.label_noise else "")]


@takes(MultiEyeSynthOptions)
def synth_multieye(
    out: Path,
    *,
    per_class: int = 20,
    size: int = 128,
    seed: int = 0,
    paired: bool = False,
    fundus_signal: float = 1.0,
    label_noise: float = 0.0,
    independent: bool = False,
    test_per_class: int = 0,
    dev_per_class: int = 0,
    unlabeled: int = 0,
    workers: int = 1,
) -> dict:
    """Write a fake MultiEYE dataset (fundus + OCT, 9 classes) under `out` in the official on-disk layout.

    `per_class` images per class per modality, split train/dev/test 60/20/20 (at least one each); with
    `test_per_class` / `dev_per_class` > 0 that split has exactly that many per class, from a case pool of
    its own that does not depend on `per_class`, and `per_class` covers the other splits (75/25).
    `fundus_signal` scales how visible the concepts are in fundus (OCT always shows them clearly);
    `label_noise` flips that share of the training labels to the eye's confusable neighbour (boundary-biased);
    `independent` renders each fundus image from a latent of its own (same class only): the negative control.
    `unlabeled` adds that many eyes per modality listed in train/unlabeled.txt only (no label).
    Output depends only on the arguments (not on `workers`). The module docstring tells the generative story.
    Returns {"root", "counts": {modality: {split: n}}, "classes", "concepts", "concept_embeddings" (path),
    "images": [{name, modality, split, clean_label, label, latent (Latent)}], "flipped": {modality: n}}.
    """
    held = 3 - (test_per_class > 0) - (dev_per_class > 0)
    if per_class < max(1, held):
        raise ValueError(f"per_class must be >= {max(1, held)} (one image per split per class), got {per_class}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")  # numpy SeedSequence rejects negative entropy
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    if not 0.0 <= label_noise < 0.5:
        raise ValueError(f"label_noise must be in [0, 0.5), got {label_noise}")
    if test_per_class < 0 or dev_per_class < 0:
        raise ValueError(f"test_per_class and dev_per_class must be >= 0, got {test_per_class}, {dev_per_class}")
    if unlabeled < 0:
        raise ValueError(f"unlabeled must be >= 0, got {unlabeled}")
    if fundus_signal < 0:
        raise ValueError(f"fundus_signal must be >= 0, got {fundus_signal}")
    out = Path(out)
    pools = {"main": per_class, **({"dev": dev_per_class} if dev_per_class else {}),
             **({"test": test_per_class} if test_per_class else {})}
    images = _plan(per_class, seed, paired, independent, label_noise, pools, unlabeled)
    jobs: list[Job] = []
    counts: dict[str, dict[str, int]] = {}
    gain = FUNDUS_GAIN * fundus_signal
    for mod in MODALITIES:
        rows = [im for im in images if im.modality == mod]
        root, folder = LAYOUT[mod]
        img_dir = out / root / "train" / "ImageData" / folder
        img_dir.mkdir(parents=True, exist_ok=True)
        counts[mod] = {}
        for si, split in enumerate(SPLITS):
            sel = [(im.name, im.label) for im in rows if im.split == split]
            order = np.random.default_rng([seed, 8, _MOD_ID[mod], si]).permutation(len(sel))
            sep = "\t" if (mod == "oct" and split == "test") else " "  # as in the real download
            _write_list(out / root / split / LIST_NAME, [sel[i] for i in order], sep)
            counts[mod][split] = len(sel)
        pool_names = [im.name for im in rows if im.split == "unlabeled"]
        if pool_names:
            (out / root / "train" / UNLABELED_LIST).write_text("\n".join(pool_names) + "\n")
            counts[mod]["unlabeled"] = len(pool_names)
        tag_id = _TAG_ID["e" if paired else mod[0]]
        jobs += [(str(img_dir / f"{im.name}.png"), mod, im.index, size,
                  (seed, _NUISANCE, _MOD_ID[mod], _POOL_ID[im.pool], tag_id, im.case),
                  tuple(float(v) for v in im.latent.activations()), im.latent.focus, gain) for im in rows]
    _write_sidecars(out, images, label_noise)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_render, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    else:
        for job in jobs:
            _render(job)
    return {
        "root": str(out), "counts": counts, "classes": list(CLASSES), "concepts": list(CONCEPTS),
        "concept_embeddings": str(out / EMBEDDINGS_NAME),
        "images": [{"name": im.name, "modality": im.modality, "split": im.split, "clean_label": im.clean_label,
                    "label": im.label, "latent": im.latent} for im in images],
        "flipped": {mod: sum(im.label != im.clean_label for im in images if im.modality == mod
                             and im.split != "unlabeled")
                    for mod in MODALITIES},
    }
