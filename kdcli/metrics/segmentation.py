"""Volume segmentation metrics on tumour regions (BraTS: whole tumour, tumour core, enhancing tumour).

Dice follows medpy's `dc` as ProtoKD's evaluation uses it, except that two empty masks count as 1 (the paper's
rule). HD95 follows medpy's `hd95`: the 95th percentile of the pooled surface distances in both directions, in
millimetres given the voxel spacing; it is undefined (NaN) when either mask is empty, and means over cases skip
those (`nanmean`, as ProtoKD) while the number of undefined cases is reported beside them.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

DEFAULT_REGIONS = {"wt": [1, 2, 3], "tc": [1, 3], "et": [3]}


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    pred, truth = pred.astype(bool), truth.astype(bool)
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(pred, truth).sum() / total)


def _surface_distances(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Distances from each surface voxel of `a` to the nearest surface voxel of `b`."""
    structure = ndimage.generate_binary_structure(a.ndim, 1)
    a_surface = a ^ ndimage.binary_erosion(a, structure=structure, border_value=0)
    b_surface = b ^ ndimage.binary_erosion(b, structure=structure, border_value=0)
    distance_to_b = ndimage.distance_transform_edt(~b_surface, sampling=spacing)
    return distance_to_b[a_surface]


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...] | None = None) -> float:
    pred, truth = pred.astype(bool), truth.astype(bool)
    if not pred.any() or not truth.any():
        return math.nan
    spacing = spacing or (1.0,) * pred.ndim
    both = np.concatenate([_surface_distances(pred, truth, spacing), _surface_distances(truth, pred, spacing)])
    return float(np.percentile(both, 95))


def region_metrics(pred: np.ndarray, truth: np.ndarray, regions: dict[str, list[int]] | None = None,
                   spacing: tuple[float, ...] | None = None, with_hd95: bool = True) -> dict[str, float]:
    """Dice (and HD95) of each region of two label volumes in the same label indices."""
    metrics = {}
    for name, labels in (regions or DEFAULT_REGIONS).items():
        p, t = np.isin(pred, labels), np.isin(truth, labels)
        metrics[f"dice_{name}"] = dice(p, t)
        if with_hd95:
            metrics[f"hd95_{name}"] = hd95(p, t, spacing)
    return metrics


def aggregate(per_case: list[dict[str, float]], regions: dict[str, list[int]] | None = None) -> dict[str, float]:
    """Mean Dice over cases, nan-mean HD95 over the cases where it is defined, and `dice_mean` over regions."""
    names = list(regions or DEFAULT_REGIONS)
    out: dict[str, float] = {}
    for name in names:
        out[f"dice_{name}"] = float(np.mean([case[f"dice_{name}"] for case in per_case]))
        if per_case and f"hd95_{name}" in per_case[0]:
            values = np.array([case[f"hd95_{name}"] for case in per_case], dtype=float)
            defined = ~np.isnan(values)
            out[f"hd95_{name}"] = float(values[defined].mean()) if defined.any() else math.nan
            out[f"hd95_{name}_undefined"] = int((~defined).sum())
    out["dice_mean"] = float(np.mean([out[f"dice_{name}"] for name in names]))
    return out


def stack_cases(records: list[str], positions: np.ndarray, maps: np.ndarray) -> dict[str, np.ndarray]:
    """Per case, its slices' maps stacked along the last axis in slice order (absent slices are left out:
    dev/test keep every slice with brain, and slices without brain hold no tumour)."""
    cases: dict[str, list[tuple[int, np.ndarray]]] = {}
    for record, position, label_map in zip(records, positions, maps, strict=True):
        cases.setdefault(record, []).append((int(position), label_map))
    return {case: np.stack([m for _, m in sorted(items, key=lambda t: t[0])], axis=-1)
            for case, items in cases.items()}
