"""Chest X-ray phantom drawing for `kdcli.synth.cxr`: anatomy, lesions, look-alike distractors, gaze. Pure
numpy/cv2, no file I/O.

Geometry lives in normalised image coordinates (x right, y down, both in [0, 1]); every shape is an analytic,
vectorised function of (x, y), so the planner (main process) can place lesions, compute their boxes and sample
gaze inside the lungs without rendering, and the renderer (worker) evaluates the same functions at full
resolution. Rendering works in "attenuation" units (bright = dense, as on film) and maps to [0, 1] at the end.

Severity s in [0, 1] is a lesion's place on its continuum (cxr.py's case latent); a finding is labelled present
when s > THRESHOLD. The image renders s with a weak, linear gain (`image_gain`: faint at the threshold), the gaze
with a strong, concave one (`gaze_weight`: a radiologist dwells on a lesion whatever its grade).
"""

from __future__ import annotations

import cv2
import numpy as np

FINDINGS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Effusion", "Mass", "Nodule", "Pneumothorax")
THRESHOLD = 0.5  # severity above which a finding is labelled present

# Peak added attenuation of each finding at image_gain 1 (severity 0.75), times U(0.9, 1.1) per lesion (the lung
# field sits ~0.33 below the soft tissue, noise std 0.015-0.025, ribs +0.04, vessels up to +0.07). Below the
# anatomy's contrast but well above what the 128 -> 64 px reduction blurs away: see the calibration note in cxr.py.
AMP = {
    "Nodule": 0.22,
    "Mass": 0.11,
    "Consolidation": 0.16,
    "Atelectasis": 0.17,
    "Effusion": 0.24,
    "Pneumothorax": -0.055,  # darker: air without lung tissue
}
CARDIO_GAIN = 0.32  # heart width factor 1 + 0.32 s (1.16 at the threshold; height: half as much); normal +-5%
GAZE_KNEE = 0.15  # gaze_weight(s) = (1 + k) s / (s + k): s = 0.15 already draws 0.58 of a certain lesion's gaze
ON_LESIONS = 0.7  # share of the fixations on the lesions when one is certain (gaze_weight 1)
# Look-alike distractors, label-independent: expected number per image of each kind (Poisson)
DISTRACTORS = ("nipple", "crossing", "overlap")
DISTRACTOR_RATE = {"nipple": 0.45, "crossing": 0.45, "overlap": 0.3}
AVOID = 0.03  # roaming fixations keep this far (normalised) beyond a distractor's edge


def image_gain(severity: float) -> float:
    """How strongly the X-ray shows a lesion: linear and weak (0.7 at the threshold, 1.3 at s = 1)."""
    return 0.1 + 1.2 * severity


def gaze_weight(severity: float) -> float:
    """How strongly the radiologist's gaze is drawn to a lesion: concave, strong even for faint ones."""
    return (1 + GAZE_KNEE) * severity / (severity + GAZE_KNEE) if severity > 0 else 0.0


Anat = dict  # normalised anatomy parameters, plain floats (picklable)
Finding = dict  # {"name", "cx", "cy", "box": (x0, y0, x1, y1), ... shape parameters}


# ---------------------------------------------------------------- anatomy


def anatomy(rng: np.random.Generator) -> Anat:
    """Patient anatomy; call with a per-patient generator so follow-ups share a chest."""
    cx0 = 0.5 + rng.normal(0, 0.01)
    a: Anat = {"cx0": cx0, "lungs": []}
    for side in (-1, 1):  # -1: image left = patient's right lung
        a["lungs"].append(
            {
                "side": side,
                "cx": cx0 + side * rng.uniform(0.19, 0.215),
                "cy": rng.uniform(0.46, 0.49),
                "ax": rng.uniform(0.165, 0.19),
                "ay": rng.uniform(0.35, 0.39),
                # the right hemidiaphragm sits a little higher (liver)
                "dome": rng.uniform(0.67, 0.69) - (0.02 if side < 0 else 0.0),
                "dome_h": rng.uniform(0.055, 0.07),
            }
        )
    a["heart"] = {"cx": cx0 + rng.uniform(0.025, 0.045), "cy": rng.uniform(0.6, 0.63), "hw": rng.uniform(0.155, 0.17),
                  "hh": rng.uniform(0.11, 0.13)}
    a["med_w"] = rng.uniform(0.055, 0.07)
    a["rib_y0"] = rng.uniform(0.1, 0.13)
    a["rib_dy"] = rng.uniform(0.06, 0.07)
    a["vessel_seed"] = int(rng.integers(2**31))
    return a


def jitter(rng: np.random.Generator, a: Anat) -> Anat:
    """A follow-up of the same patient: slightly different positioning and inspiration."""
    dx, dy = rng.normal(0, 0.008, 2)
    b = {**a, "cx0": a["cx0"] + dx, "rib_y0": a["rib_y0"] + dy, "vessel_seed": int(rng.integers(2**31))}
    b["lungs"] = [{**lu, "cx": lu["cx"] + dx, "cy": lu["cy"] + dy, "dome": lu["dome"] + dy + rng.normal(0, 0.005)}
                  for lu in a["lungs"]]
    b["heart"] = {**a["heart"], "cx": a["heart"]["cx"] + dx, "cy": a["heart"]["cy"] + dy}
    return b


def _dome(lu: dict, x: np.ndarray) -> np.ndarray:
    u = (x - lu["cx"] + lu["side"] * 0.2 * lu["ax"]) / lu["ax"]  # dome peak a bit medial of the lung centre
    return lu["dome"] - lu["dome_h"] * np.clip(1 - u**2, 0, 1)


def heart_mask(a: Anat, x: np.ndarray, y: np.ndarray, scale: float = 1.0) -> np.ndarray:
    h = a["heart"]
    # wider towards the image right (left ventricle), flat-ish top under the hila
    hw = h["hw"] * scale * np.where(x > h["cx"], 1.0, 0.75)
    hh = h["hh"] * (1 + 0.5 * (scale - 1))  # an enlarged heart grows mostly sideways
    return ((x - h["cx"]) / hw) ** 2 + ((y - h["cy"]) / hh) ** 2 < 1


def lung_mask(a: Anat, x: np.ndarray, y: np.ndarray, heart_scale: float = 1.0, side: int = 0) -> np.ndarray:
    """Boolean lung field (both lungs, or one with side=-1/1) at normalised points."""
    m = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y)), bool)
    for lu in a["lungs"]:
        if side and lu["side"] != side:
            continue
        ell = ((x - lu["cx"]) / lu["ax"]) ** 2 + ((y - lu["cy"]) / lu["ay"]) ** 2 < 1
        m |= ell & (y < _dome(lu, x)) & (lu["side"] * (x - a["cx0"]) > a["med_w"])
    return m & ~heart_mask(a, x, y, heart_scale)


def lung_points(rng: np.random.Generator, a: Anat, n: int, side: int = 0, zone: tuple[float, float] = (0, 1),
                margin: float = 0.0) -> np.ndarray:
    """n points uniform over the lung field (optionally one side, a vertical band, away from the edge)."""
    out = np.zeros((0, 2))
    for _ in range(200):
        p = rng.uniform([0.1, 0.08], [0.9, 0.8], (max(4 * n, 16), 2))
        ok = lung_mask(a, p[:, 0], p[:, 1], side=side)
        for ang in np.linspace(0, 2 * np.pi, 8, endpoint=False) if margin else ():
            ok &= lung_mask(a, p[:, 0] + margin * np.cos(ang), p[:, 1] + margin * np.sin(ang), side=side)
        top, bot = min(lu["cy"] - lu["ay"] for lu in a["lungs"]), max(lu["dome"] for lu in a["lungs"])
        t = (p[:, 1] - top) / (bot - top)
        ok &= (t >= zone[0]) & (t <= zone[1])
        out = np.concatenate([out, p[ok]])
        if len(out) >= n:
            return out[:n]
    raise RuntimeError("could not place points in the lung field")  # pragma: no cover - anatomy always has lungs


def chest_box(a: Anat) -> tuple[float, float, float, float]:
    l0, l1 = a["lungs"]
    return (l0["cx"] - l0["ax"], min(lu["cy"] - lu["ay"] for lu in a["lungs"]), l1["cx"] + l1["ax"],
            max(lu["dome"] for lu in a["lungs"]))


# ---------------------------------------------------------------- findings: planning


def place_findings(rng: np.random.Generator, a: Anat, severity: dict[str, float]) -> list[Finding]:
    """Shape parameters, severity and a normalised box (x0, y0, x1, y1) of each lesion, in FINDINGS order.
    The severity sets how strongly the image shows it (amplitude; the heart's, the effusion's and the air rim's
    extent); where it lies and its exact shape come from `rng`."""
    out: list[Finding] = []
    grid = (np.arange(160) + 0.5) / 160
    gx, gy = np.meshgrid(grid, grid)
    for name in (n for n in FINDINGS if severity.get(n, 0.0) > 0):
        s = float(severity[name])
        side = int(rng.choice([-1, 1]))
        f: Finding = {"name": name, "side": side, "amp": 0.0, "severity": s}
        if name == "Cardiomegaly":
            f["scale"] = 1.0 + CARDIO_GAIN * s
        elif name in ("Nodule", "Mass"):
            r = rng.uniform(0.028, 0.038) if name == "Nodule" else rng.uniform(0.05, 0.07)
            c = lung_points(rng, a, 1, side, (0.1, 0.85), margin=r)[0]
            n_lobe = 1 if name == "Nodule" else int(rng.integers(2, 4))
            off = rng.normal(0, 0.35 * r, (n_lobe, 2)) * (np.arange(n_lobe) > 0)[:, None]
            f["blobs"] = [(float(c[0] + o[0]), float(c[1] + o[1]), float(r * rng.uniform(0.75, 1.0)), 0.0)
                          for o in off]
        elif name == "Consolidation":
            c = lung_points(rng, a, 1, side, (0.35, 0.9), margin=0.03)[0]
            n = int(rng.integers(5, 9))
            pts = c + rng.normal(0, 0.03, (n, 2))
            f["blobs"] = [(float(p[0]), float(p[1]), float(rng.uniform(0.022, 0.035)), 0.0) for p in pts]
        elif name == "Atelectasis":  # plate-like band in the lower zone
            c = lung_points(rng, a, 1, side, (0.55, 0.85), margin=0.02)[0]
            f["band"] = (float(c[0]), float(c[1]), float(rng.uniform(0.06, 0.09)), float(rng.uniform(0.009, 0.014)),
                         float(rng.uniform(-0.35, 0.35)))
        elif name == "Effusion":
            f["height"] = 0.03 + 0.07 * s * float(rng.uniform(0.9, 1.1))
        elif name == "Pneumothorax":
            f["shrink"] = 0.96 - 0.16 * s * float(rng.uniform(0.9, 1.1))
        else:
            raise ValueError(f"unknown finding {name!r}")
        if name in AMP:
            f["amp"] = AMP[name] * image_gain(s) * float(rng.uniform(0.9, 1.1))
        m = finding_mask(a, f, gx, gy) > 0.25
        if name == "Cardiomegaly":
            m = heart_mask(a, gx, gy, f["scale"])
        elif name == "Pneumothorax":  # the box holds the air rim and the pleural line
            m = sum(_pneumo_regions(a, f, gx, gy)) > 0.25
        if not m.any() and name == "Pneumothorax":  # a minimal rim below the grid's resolution: its pleural line
            m = _pneumo_regions(a, f, gx, gy)[1] > 0.05
        ys, xs = np.nonzero(m)
        if not len(xs):  # pragma: no cover - every finding covers some grid cells
            raise RuntimeError(f"{name} landed outside the lungs")
        x0, x1, y0, y1 = grid[xs.min()], grid[xs.max()], grid[ys.min()], grid[ys.max()]
        pad = 0.5 / 160
        f["box"] = (float(x0 - pad), float(y0 - pad), float(x1 + pad), float(y1 + pad))
        f["cx"], f["cy"] = float(gx[m].mean()), float(gy[m].mean())
        out.append(f)
    return out


# ---------------------------------------------------------------- distractors


def _rib_crossings(a: Anat, side: int) -> np.ndarray:
    """Where posterior and anterior ribs of one side cross (normalised points), as drawn by `_bones`."""
    d = np.linspace(0.08, 0.38, 301)
    points = []
    for i in range(9):
        post = a["rib_y0"] + i * a["rib_dy"] - 0.08 * d + 0.75 * d**2
        for j in range(5):
            ant = a["rib_y0"] + 0.12 + j * 0.085 + 0.25 * (0.38 - d)
            gap = post - ant
            for k in np.flatnonzero(np.sign(gap[:-1]) != np.sign(gap[1:])):
                points.append((a["cx0"] + side * d[k], float(post[k])))
    return np.array(points).reshape(-1, 2)


def place_distractors(rng: np.random.Generator, a: Anat, counts: dict[str, int]) -> list[dict]:
    """Label-independent look-alikes in the lung field: nipple shadows (small flat discs low in the lung, often
    in both), rib crossings (a nodule-like density where a posterior and an anterior rib cross) and soft-tissue
    overlap (a broad patchy opacity low and lateral, like consolidation). Each: {"kind", "blobs" [(x, y, r)],
    "amp"}."""
    out: list[dict] = []
    for kind in DISTRACTORS:
        for _ in range(int(counts.get(kind, 0))):
            side = int(rng.choice([-1, 1]))
            if kind == "nipple":
                r = float(rng.uniform(0.022, 0.03))
                c = lung_points(rng, a, 1, side, (0.6, 0.88), margin=r)[0]
                blobs = [(float(c[0]), float(c[1]), r)]
                mirror = (2 * a["cx0"] - c[0], c[1] + rng.normal(0, 0.008))
                if rng.random() < 0.6 and lung_mask(a, np.array(mirror[0]), np.array(mirror[1])):
                    blobs.append((float(mirror[0]), float(mirror[1]), r * float(rng.uniform(0.9, 1.1))))
                amp = AMP["Nodule"] * float(rng.uniform(0.55, 0.95))
            elif kind == "crossing":
                r = float(rng.uniform(0.018, 0.026))
                cands = _rib_crossings(a, side)
                inside = cands[lung_mask(a, cands[:, 0], cands[:, 1], side=side)] if len(cands) else cands
                c = inside[int(rng.integers(len(inside)))] if len(inside) else lung_points(rng, a, 1, side)[0]
                blobs = [(float(c[0]), float(c[1]), r)]
                amp = AMP["Nodule"] * float(rng.uniform(0.5, 0.9))
            else:  # overlap
                c = lung_points(rng, a, 1, side, (0.6, 0.95), margin=0.03)[0]
                pts = c + rng.normal(0, 0.03, (int(rng.integers(4, 8)), 2))
                blobs = [(float(p[0]), float(p[1]), float(rng.uniform(0.03, 0.045))) for p in pts]
                amp = AMP["Consolidation"] * float(rng.uniform(0.45, 0.8))
            out.append({"kind": kind, "blobs": blobs, "amp": amp})
    return out


def distractor_mask(a: Anat, d: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Opacity profile in [0, 1] of one distractor."""
    m = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y)), np.float32)
    for cx, cy, r in d["blobs"]:
        dist = np.hypot(x - cx, y - cy) / r
        if d["kind"] == "nipple":  # flat with a sharp margin
            prof = np.clip((1 - dist) / 0.25, 0, 1)
        elif d["kind"] == "crossing":  # as round as a nodule
            prof = np.clip(1 - dist**2, 0, 1) ** 0.7
        else:
            prof = np.exp(-(dist**2) * 1.5)
        m = np.maximum(m, prof)
    return m * lung_mask(a, x, y) if d["kind"] == "overlap" else m


def _pneumo_regions(a: Anat, f: Finding, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lu = a["lungs"][0 if f["side"] < 0 else 1]
    k = f["shrink"]
    # the collapsed lung shrinks towards the hilum, leaving an apical-lateral rim of pleural air
    hx, hy = lu["cx"] - lu["side"] * 0.3 * lu["ax"], lu["cy"] + 0.35 * lu["ay"]
    d = np.sqrt(((x - hx) / (k * lu["ax"] * 1.3)) ** 2 + ((y - hy) / (k * lu["ay"] * 1.35)) ** 2)
    upper = np.clip((lu["cy"] + 0.1 - y) / 0.05, 0, 1)
    lung = lung_mask(a, x, y, side=lu["side"])
    air = lung * np.clip((d - 1) / 0.02, 0, 1) * upper
    line = lung * np.exp(-(((d - 1) / 0.012) ** 2)) * upper
    return air.astype(np.float32), line.astype(np.float32)


def finding_mask(a: Anat, f: Finding, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Opacity profile in [0, 1] of one finding (Cardiomegaly: none here; it scales the heart)."""
    name = f["name"]
    if name in ("Nodule", "Mass", "Consolidation"):
        m = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y)), np.float32)
        for cx, cy, r, _ in f["blobs"]:
            d = np.hypot(x - cx, y - cy) / r
            prof = np.clip(1 - d**2, 0, 1) ** 0.7 if name != "Consolidation" else np.exp(-(d**2) * 1.5)
            m = np.maximum(m, prof)
        return m * (lung_mask(a, x, y) if name == "Consolidation" else 1.0)
    if name == "Atelectasis":
        cx, cy, rx, ry, th = f["band"]
        u = (x - cx) * np.cos(th) + (y - cy) * np.sin(th)
        v = -(x - cx) * np.sin(th) + (y - cy) * np.cos(th)
        return np.exp(-((u / rx) ** 4) - (v / ry) ** 2) * lung_mask(a, x, y)
    if name == "Effusion":
        lu = a["lungs"][0 if f["side"] < 0 else 1]
        lat = np.clip(lu["side"] * (x - lu["cx"]) / lu["ax"] + 0.3, 0, 1.3)  # 0 medially -> 1.3 at the wall
        level = _dome(lu, x) - f["height"] * (0.35 + 0.65 * lat**2)  # meniscus: climbs the lateral wall
        return np.clip((y - level) / 0.015, 0, 1) * lung_mask(a, x, y, side=lu["side"])
    if name == "Pneumothorax":
        return _pneumo_regions(a, f, x, y)[0]
    return np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y)), np.float32)


# ---------------------------------------------------------------- rendering


def _soft(m: np.ndarray, s: int, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(m.astype(np.float32), (0, 0), max(sigma * s, 0.5))


def _vessels(a: Anat, s: int) -> np.ndarray:
    rng = np.random.default_rng(a["vessel_seed"])
    m = np.zeros((s, s), np.float32)
    for lu in a["lungs"]:
        hx, hy = a["cx0"] + lu["side"] * (a["med_w"] + 0.03), lu["cy"] - 0.02
        for _ in range(16):
            th = rng.uniform(-0.2, 0.85) * np.pi if lu["side"] > 0 else np.pi - rng.uniform(-0.2, 0.85) * np.pi
            th = th + np.pi * rng.uniform(-0.4, 0.4) * (rng.random() < 0.5)
            pts, p, w = [], np.array([hx, hy]), rng.uniform(0.6, 1.0)
            for _ in range(12):
                pts.append(p.copy())
                th += rng.normal(0, 0.25)
                p = p + 0.025 * np.array([np.cos(th), np.sin(th)])
            pts = np.round(np.array(pts) * s * 16).astype(np.int32)
            for j in range(len(pts) - 1):  # taper towards the periphery
                cv2.line(m, tuple(pts[j]), tuple(pts[j + 1]), w * (1 - j / 12), max(1, round(0.006 * s)),
                         cv2.LINE_AA, 4)
    return cv2.GaussianBlur(m, (0, 0), max(0.004 * s, 0.5))


def _bones(a: Anat, s: int) -> np.ndarray:
    m = np.zeros((s, s), np.float32)
    t = max(1, round(0.014 * s))
    for side in (-1, 1):
        for i in range(9):  # posterior ribs: rise from the spine, arc down laterally
            d = np.linspace(0.03, 0.42, 24)
            y = a["rib_y0"] + i * a["rib_dy"] - 0.08 * d + 0.75 * d**2
            pts = np.round(np.stack([a["cx0"] + side * d, y], 1) * s * 16).astype(np.int32)
            cv2.polylines(m, [pts], False, 0.7, t, cv2.LINE_AA, 4)
        for i in range(5):  # fainter anterior ribs, sloping down medially
            d = np.linspace(0.08, 0.38, 16)
            y = a["rib_y0"] + 0.12 + i * 0.085 + 0.25 * (0.38 - d)
            pts = np.round(np.stack([a["cx0"] + side * d, y], 1) * s * 16).astype(np.int32)
            cv2.polylines(m, [pts], False, 0.35, t, cv2.LINE_AA, 4)
        cl = np.array([[a["cx0"] + side * 0.04, 0.17], [a["cx0"] + side * 0.18, 0.12], [a["cx0"] + side * 0.33, 0.1]])
        cv2.polylines(m, [np.round(cl * s * 16).astype(np.int32)], False, 1.2, max(1, round(0.022 * s)),
                      cv2.LINE_AA, 4)
    return cv2.GaussianBlur(m, (0, 0), max(0.003 * s, 0.5))


def render(a: Anat, findings: list[Finding], s: int, rng: np.random.Generator, draw: bool = True,
           distractors: list[dict] = ()) -> np.ndarray:
    """Float32 image in [0, 1], bright = dense. draw=False: the same chest, distractors, exposure and noise,
    no lesions."""
    yy, xx = ((np.mgrid[:s, :s].astype(np.float32) + 0.5) / s)
    scale = next((f["scale"] for f in findings if f["name"] == "Cardiomegaly"), 1.0) if draw else 1.0
    torso = _soft((((xx - a["cx0"]) / 0.47) ** 2 + ((yy - 0.62) / 0.62) ** 2 < 1) | (np.abs(xx - a["cx0"]) < 0.09),
                  s, 0.02)
    lung = _soft(lung_mask(a, xx, yy, heart_scale=scale), s, 0.006)
    heart = _soft(heart_mask(a, xx, yy, scale), s, 0.006)
    med = _soft((np.abs(xx - a["cx0"]) < a["med_w"]) & (yy < 0.7), s, 0.01)
    spine = _soft(np.abs(xx - a["cx0"]) < 0.035, s, 0.006)
    vessels = _vessels(a, s)
    att = 0.55 * torso - 0.33 * lung + 0.12 * med + 0.1 * heart * (1 - med) + 0.06 * spine * torso
    att += 0.06 * _bones(a, s) * torso
    if draw:
        for f in findings:
            if f["name"] == "Pneumothorax":
                air, line = _pneumo_regions(a, f, xx, yy)
                air = _soft(air, s, 0.003)
                vessels *= 1 - air
                att += f["amp"] * air + 0.6 * abs(f["amp"]) * _soft(line, s, 0.002)
            elif f["name"] != "Cardiomegaly":
                att += f["amp"] * _soft(finding_mask(a, f, xx, yy), s, 0.004)
    for d in distractors:
        att += d["amp"] * _soft(distractor_mask(a, d, xx, yy), s, 0.004)
    att += 0.07 * vessels * lung
    # exposure: gain, offset, a gentle gradient (heel effect) and a film-like gamma
    g = rng.normal(0, 0.06, 2)
    img = rng.uniform(0.06, 0.12) + rng.uniform(0.95, 1.15) * att * (1 + g[0] * (xx - 0.5) + g[1] * (yy - 0.5))
    img = np.clip(img, 0, 1) ** rng.uniform(0.85, 1.15)
    img += rng.normal(0, 1, (s, s)).astype(np.float32) * rng.uniform(0.015, 0.025)
    img = cv2.GaussianBlur(img.astype(np.float32), (3, 3), rng.uniform(0.4, 0.8))
    return np.clip(img, 0, 1).astype(np.float32)


# ---------------------------------------------------------------- gaze


def fixations(rng: np.random.Generator, a: Anat, findings: list[Finding], distractors: list[dict] = (),
              on_findings: float = ON_LESIONS, outside: float = 0.02) -> np.ndarray:
    """(n, 3) normalised x, y and duration (s). A share on_findings x max gaze_weight of the fixations gathers on
    the lesions (each drawn in proportion to its gaze_weight, so faint ones too); the rest roam the lungs and
    keep clear of the distractors (the reader recognises a nipple shadow or a rib crossing and does not dwell)."""
    n = int(rng.integers(25, 55))
    pts = lung_points(rng, a, 4 * n)
    for d in distractors:
        for cx, cy, r in d["blobs"]:
            pts = pts[np.hypot(pts[:, 0] - cx, pts[:, 1] - cy) > r + AVOID]
    if len(pts) < n:  # pragma: no cover - distractors never cover most of the lungs
        pts = np.concatenate([pts, lung_points(rng, a, n - len(pts))])
    pts = pts[:n]
    weights = np.array([gaze_weight(f.get("severity", 1.0)) for f in findings])
    if findings and weights.max() > 0:
        hit = rng.random(n) < on_findings * weights.max()
        which = rng.choice(len(findings), n, p=weights / weights.sum())
        for i in np.flatnonzero(hit):
            f = findings[which[i]]
            x0, y0, x1, y1 = f["box"]
            pts[i] = (f["cx"], f["cy"]) + rng.normal(0, 1, 2) * (0.3 * np.array([x1 - x0, y1 - y0]) + 0.008)
    out = rng.random(n) < outside  # a glance off the image edge: readers must clip or skip these
    edge = rng.integers(0, 4, n)
    for i in np.flatnonzero(out):
        off = rng.uniform(0.01, 0.06)
        pts[i] = [(-off, rng.uniform(0, 1)), (1 + off, rng.uniform(0, 1)), (rng.uniform(0, 1), -off),
                  (rng.uniform(0, 1), 1 + off)][edge[i]]
    dur = rng.gamma(4.0, 0.06, n) + 0.05
    return np.column_stack([pts, dur])
