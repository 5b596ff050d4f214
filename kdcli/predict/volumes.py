"""`kdcli predict` for segmentation checkpoints: BraTS-style cases (a folder of four NIfTI sequences) or single
NIfTI sequences -> a NIfTI label volume per case in the input's grid (shape, affine, the release's label values).

The case goes through `prepare brats`'s own steps (kdcli.sources.brats): the brain is the voxels non-zero in any
given sequence, each sequence is z-scored inside it, every axial slice with brain is cropped to the brain's
bounding box, padded to a square and resized to the stored side; the predicted slices are put back with
`label_volume`, as `kdcli evaluate --predictions` does. Given a single sequence, its own non-zero voxels are the
brain: identical to the case folder's when the sequences share one skull-stripping mask, as BraTS's do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcli.errors import KdcliError
from kdcli.predict.images import one_line
from kdcli.predict.inputs import Failure, Item, case_items, progress

NAMING_ET = {"2018-2021": 4, "2023": 3}


def et_value(case: str, namings: dict[str, str], record: dict[str, Any]) -> int:
    """The enhancing-tumour value to write: the case's file naming, else the one naming the training data had."""
    if case in namings:
        return NAMING_ET[namings[case]]
    recorded = list((record.get("label_values") or {}).keys())
    return NAMING_ET.get(recorded[0], 4) if len(recorded) == 1 else 4


def read_case(item: Item) -> tuple[dict[str, np.ndarray], Any]:
    """The case's sequences as float32 volumes (as prepare reads them) and the grid's NIfTI image (header)."""
    from kdcli.sources.brats import AFFINE_TOLERANCE, _voxels, nibabel_module

    nib = nibabel_module()

    volumes = {name: _voxels(item.id, path, np.float32) for name, path in item.files.items()}
    first = next(iter(item.files))
    grid = nib.load(item.files[first])
    for name, volume in volumes.items():
        if volume.ndim != 3:
            raise KdcliError(f"{Path(item.files[name]).name} is {volume.ndim}-D; BraTS volumes are 3-D")
        if volume.shape != volumes[first].shape:
            raise KdcliError(f"{Path(item.files[name]).name} has shape {volume.shape}, "
                             f"{Path(item.files[first]).name} {volumes[first].shape}")
        if not np.allclose(nib.load(item.files[name]).affine, grid.affine, atol=AFFINE_TOLERANCE):
            raise KdcliError(f"{Path(item.files[name]).name} has another affine than {Path(item.files[first]).name}; "
                             "the sequences must be co-registered")
    return volumes, grid


def predict_case(model: torch.nn.Module, item: Item, sequences: list[str], size: int, et: int,
                 device: torch.device, batch_size: int) -> tuple[np.ndarray, dict[str, Any], dict[int, np.ndarray],
                                                                 Any]:
    """(label volume in the input grid, the grid info, predicted stored-size maps by slice, a function z -> the
    first sequence's stored slice, for pictures)."""
    from kdcli.sources.brats import brain_mask, crop_square, label_volume, stored_slice, zscore_in_brain

    missing = [s for s in sequences if s not in item.files]
    if missing:
        raise KdcliError(f"no {', '.join(missing)} sequence (the model takes {', '.join(sequences)})",
                         hint="give the case folder or name the files <case>_<sequence>.nii.gz")
    volumes, grid = read_case(item)
    brain = brain_mask(volumes)
    if not brain.any():
        raise KdcliError("every sequence is zero everywhere (no brain)")
    zscore_in_brain(volumes, brain)
    crop, pad, side = crop_square(brain)

    def stored(name: str, z: int) -> np.ndarray:
        return stored_slice(volumes[name], z, crop, pad, side, size)[..., 0].astype(np.float32)

    slices = [int(z) for z in np.flatnonzero(brain.any(axis=(0, 1)))]
    maps: dict[int, np.ndarray] = {}
    for start in range(0, len(slices), batch_size):
        chunk = slices[start:start + batch_size]
        stack = np.stack([np.stack([stored(s, z) for s in sequences]) for z in chunk])
        with torch.no_grad():
            logits = model(torch.from_numpy(stack).to(device))["logits"].float()
        for z, plane in zip(chunk, logits.argmax(1).to(torch.uint8).cpu().numpy(), strict=True):
            maps[z] = plane
    info = {"shape": [int(s) for s in volumes[sequences[0]].shape],
            "affine": np.asarray(grid.affine, dtype=float).tolist(),
            "spacing": [float(z) for z in grid.header.get_zooms()[:3]],
            "crop": crop, "pad": pad, "side": int(side), "size": int(size), "et_value": et}
    return label_volume(info, maps), info, maps, lambda z: stored(sequences[0], z)


def predict_volumes(checkpoint, record: dict[str, Any], options: Any, device: torch.device,
                    folder: Path) -> tuple[list[dict[str, Any]], list[Failure]]:
    from kdcli.metrics.segmentation import DEFAULT_REGIONS
    from kdcli.models.loading import load_model
    from kdcli.sources.brats import nibabel_module, write_label_nifti

    inputs, batch_size, strict, explain = options.inputs, options.batch_size, options.strict, options.explain
    nibabel_module()  # before any case: one line for the missing package, not one per case
    meta = checkpoint.meta
    sequences = list(meta["model"]["modalities"])
    size = int(record["size"])
    regions = meta.get("regions") or DEFAULT_REGIONS
    items, failures, namings = case_items(inputs, sequences)
    if strict and failures:
        raise KdcliError(failures[0].reason, path=failures[0].input)
    model = load_model(checkpoint).to(device).eval()
    rows = []
    bar = progress(len(items), "case")
    for item in items:
        bar.update(1)
        try:
            et = et_value(item.id, namings, record)
            volume, info, maps, plane_at = predict_case(model, item, sequences, size, et, device, batch_size)
        except Exception as exc:  # noqa: BLE001  (nibabel and zlib raise many types; one line per case)
            if strict:
                raise KdcliError(one_line(exc, item.path), path=item.path) from None
            failures.append(Failure(item.path, one_line(exc, item.path)))
            continue
        path = folder / f"{item.id}.nii.gz"
        write_label_nifti(path, volume, info)
        voxel_ml = float(np.prod(info["spacing"])) / 1000.0
        lookup = np.array([0, 1, 2, info["et_value"]])
        row: dict[str, Any] = {"id": item.id, "path": item.path, "labels": str(path), "slices": len(maps)}
        for region, members in regions.items():
            count = int(np.isin(volume, lookup[members]).sum())
            row[f"voxels_{region}"] = count
            row[f"ml_{region}"] = round(count * voxel_ml, 3)
        if explain:
            row["explanation"] = str(write_overlay(folder, item.id, maps, plane_at))
        rows.append(row)
    bar.close()
    return rows, failures


def write_overlay(folder: Path, case: str, maps: dict[int, np.ndarray], plane_at) -> Path:
    """The slice with the most predicted tumour: the model's first sequence, plain and with the labels painted
    as `kdcli explain` colours them (necrotic core red, oedema green, enhancing tumour yellow)."""
    import cv2

    from kdcli.explain.common import GAP, MIN_SIDE, safe_name, write_png
    from kdcli.explain.segmentation import grey, label_overlay

    z = max(maps, key=lambda k: int((maps[k] > 0).sum()))
    base = grey(plane_at(z))
    scale = max(1, -(-MIN_SIDE // base.shape[0]))
    big = cv2.resize(base, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    labels = cv2.resize(maps[z], None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    gap = np.full((big.shape[0], GAP, 3), 255, np.uint8)
    path = folder / f"{safe_name(case)}.overlay.png"
    write_png(path, np.concatenate([big, gap, label_overlay(big, labels)], axis=1))
    return path
