"""`kdcli evaluate` on a segmentation checkpoint: slices restacked into each case's volume, Dice and HD95 per
region and case, the missing-sequence sweep, and predicted label volumes as NIfTI in the original grid.

Metrics are computed on the stored grid (the brain crop resized to `--size`, every brain slice kept for dev and
test); HD95 is in millimetres: the NIfTI voxel size, in-plane scaled by side / size of the crop's resize.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np

from kdcli.engine.checkpoint import load_checkpoint
from kdcli.errors import KdcliError, UsageError
from kdcli.metrics.segmentation import aggregate, region_metrics, stack_cases
from kdcli.shards.format import RECORDS_JSON
from kdcli.shards.reader import ShardStore


def subsets(modalities: list[str], spec: str) -> list[tuple[str, ...]]:
    """`all`: every non-empty subset, largest first (the 15-row table of missing-modality papers); or
    `t1ce+flair,t2`: the listed ones."""
    if spec == "all":
        return [c for k in range(len(modalities), 0, -1) for c in itertools.combinations(modalities, k)]
    chosen = []
    for item in spec.split(","):
        names = tuple(m for m in modalities if m in item.split("+"))
        unknown = set(item.split("+")) - set(modalities)
        if unknown or not names:
            raise UsageError(f"--missing {item!r}: the model takes {', '.join(modalities)}")
        chosen.append(names)
    return chosen


def _spacing(records: dict[str, Any], case: str) -> tuple[float, float, float]:
    """Voxel size in mm of the stored grid: the NIfTI voxel size, in-plane scaled by the crop's resize."""
    info = records.get(case) or {}
    x, y, z = (float(v) for v in info.get("spacing", (1.0, 1.0, 1.0)))
    if "side" in info and "size" in info:
        scale = float(info["side"]) / float(info["size"])
        return (x * scale, y * scale, z)
    return (x, y, z)


def evaluate_volumes(options: Any) -> dict[str, Any]:
    """`kdcli evaluate` on a segmentation checkpoint (EvaluateOptions; the task's evaluator, tasks/)."""
    return evaluate_segmentation(options.checkpoint, options.data, options.split, options.missing,
                                 options.predictions, options.device, workers=options.workers)


def evaluate_segmentation(checkpoint_path: Path, data: Path, split: str = "test", missing: str | None = None,
                          predictions: Path | None = None, device_name: str = "auto", batch_size: int = 32,
                          workers: int = 0) -> dict[str, Any]:
    from kdcli.data.slices import SliceView
    from kdcli.engine.device import select_device
    from kdcli.engine.loop import EngineConfig
    from kdcli.engine.segmentation import predict_maps
    from kdcli.segmentation import check_segmentation_checkpoint, load_unet

    checkpoint = load_checkpoint(Path(checkpoint_path))
    store = ShardStore(data)
    store.verify(split)  # the split scored is re-hashed from its bytes
    modalities = check_segmentation_checkpoint(checkpoint, store)
    model = load_unet(checkpoint)
    device = select_device(device_name)
    model.to(device)
    regions = checkpoint.meta.get("regions") or store.meta.extra.get("regions")
    records_path = store.root / RECORDS_JSON
    records = json.loads(records_path.read_text()) if records_path.is_file() else {}
    cfg = EngineConfig(batch_size=batch_size, workers=workers)

    def run(absent: tuple[str, ...], with_hd95: bool) -> tuple[dict, list[dict], dict, SliceView]:
        view = SliceView(store, split, modalities, absent=absent)
        if len(view) == 0:
            raise KdcliError(f"no slices in split {split!r}", path=store.root)
        maps = predict_maps(model, view, cfg, device)
        preds = stack_cases(view.records, view.positions, maps["pred"])
        truths = stack_cases(view.records, view.positions, maps["mask"])
        per_case = [{"case": case, **region_metrics(preds[case], truths[case], regions, _spacing(records, case),
                                                     with_hd95)} for case in preds]
        return aggregate(per_case, regions), per_case, maps, view

    metrics, per_case, maps, view = run((), True)
    report: dict[str, Any] = {
        "checkpoint": str(checkpoint_path), "data": str(data), "split": split, "task": "segmentation",
        "modality": ",".join(modalities), "cases": len(per_case), "slices": len(view), "metrics": metrics,
        "per_case": per_case,
        "hd95_rule": "mm on the stored grid; NaN when either mask is empty, left out of the mean (count beside it)",
    }
    if missing:
        rows = []
        for present in subsets(modalities, missing):
            absent = tuple(m for m in modalities if m not in present)
            sweep, _, _, _ = run(absent, False) if absent else (metrics, None, None, None)
            rows.append({"present": list(present), **{k: v for k, v in sweep.items() if k.startswith("dice")}})
        report["missing"] = rows
    if predictions:
        report["predictions"] = write_predictions(Path(predictions), view, maps["pred"], records)
    return report


def write_predictions(folder: Path, view, predicted: np.ndarray, records: dict[str, Any]) -> list[str]:
    """One NIfTI per case in its original grid, affine and label values (BraTS: ET back to 4, or 3 in 2023)."""
    from kdcli.sources.brats import label_volume, write_label_nifti

    folder.mkdir(parents=True, exist_ok=True)
    by_case: dict[str, dict[int, np.ndarray]] = {}
    for case, position, label_map in zip(view.records, view.positions, predicted, strict=True):
        by_case.setdefault(case, {})[int(position)] = label_map
    written = []
    for case, slices in sorted(by_case.items()):
        info = records.get(case)
        if not info or "affine" not in info:
            raise KdcliError(f"no grid recorded for case {case}", path=view.store.root / RECORDS_JSON,
                             hint="re-run `kdcli prepare brats` with this kdcli")
        path = folder / f"{case}.nii.gz"
        write_label_nifti(path, label_volume(info, slices), info)
        written.append(str(path))
    return written
