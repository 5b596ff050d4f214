"""Fundus drawing shared by the phantom generators (MultiEYE's fundus photos, the DR/AMD grading sets)."""

from __future__ import annotations

import numpy as np


def fx(v: np.ndarray | float) -> tuple[int, ...] | int:
    """cv2 fixed-point coordinate(s) for shift=4 drawing: sub-pixel placement survives small image sizes."""
    a = np.round(np.asarray(v, np.float64) * 16).astype(int)
    return int(a) if a.ndim == 0 else tuple(int(t) for t in a)


def vessel_paths(rng: np.random.Generator, disc: np.ndarray, r: float, side: int) -> list[np.ndarray]:
    # Canonical frame: disc at the origin, temporal (towards the macula) = -x; `side` mirrors it.
    paths = []
    for th0, turn, n in ((-2.0, -0.11, 13), (2.0, 0.11, 13), (-1.1, 0.09, 9), (1.1, -0.09, 9)):
        th = th0 + rng.normal(0, 0.15) + np.cumsum(turn + rng.normal(0, 0.12, n))
        steps = 0.1 * r * rng.uniform(0.8, 1.2) * np.stack([np.cos(th), np.sin(th)], 1)
        pts = np.vstack([[0.0, 0.0], np.cumsum(steps, 0)])
        j = int(rng.integers(3, n - 2))
        bth = th[j] + rng.choice([-0.8, 0.8]) + np.cumsum(rng.normal(0, 0.15, 5))
        branch = pts[j] + np.cumsum(0.09 * r * np.stack([np.cos(bth), np.sin(bth)], 1), 0)
        for p in (pts, np.vstack([pts[j], branch])):
            paths.append(disc + p * [side, 1])
    return paths
