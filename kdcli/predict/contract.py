"""What a checkpoint records about how its data were preprocessed, so `kdcli predict` (and `kdcli export`'s
contract) can treat raw files exactly as `prepare` did, without the shards.

Training stores `preprocessing_record(dataset)` in the checkpoint's meta under "preprocess": the source, the
stored side, the source options that change pixels (CLAHE, median filter, magnification and patch geometry),
the modalities' stored shapes and dtypes. Everything else each source does (pad to square, DICOM windowing,
z-scoring in the brain mask, the brain crop, tissue detection) is fixed in the source's code and runs as is.
Checkpoints written before that record existed fall back on the dataset they were trained on (dataset.json),
when it is still there unchanged, or on `--data SHARDS`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdcli.errors import KdcliError

# source -> the prepare options that change what a stored sample looks like (paths, splits, seeds of the split
# and label policies do not); camelyon's seed picks the patches of a slide, so it belongs here
PIXEL_OPTIONS: dict[str, tuple[str, ...]] = {
    "multieye": ("clahe", "median"),
    "fundus-grading": (),
    "cxr": (),
    "brats": (),
    "camelyon": ("mag", "native_mag", "patch_size", "max_patches", "tissue_threshold", "min_tissue", "seed",
                 "annotated_only"),
}


def preprocessing_record(dataset: Any) -> dict[str, Any]:
    """The "preprocess" entry of a checkpoint's meta, from the DatasetMeta it is trained on."""
    prepare = dataset.prepare or {}
    options = prepare.get("source_options") or {}
    record: dict[str, Any] = {
        "source": dataset.source, "size": prepare.get("size"),
        "options": {key: options[key] for key in PIXEL_OPTIONS.get(dataset.source, ()) if key in options},
        "modalities": {name: dict(info) for name, info in dataset.modalities.items()},
    }
    if dataset.source == "brats":  # the label values to write back (ET 4, or 3 for BraTS 2023 naming)
        record["label_values"] = dataset.extra.get("label_values")
    if dataset.source == "camelyon":
        record["clinical_features"] = list((dataset.extra.get("clinical") or {}).get("features") or [])
    return record


def checkpoint_preprocessing(meta: dict[str, Any], checkpoint: Path, data: Path | None = None) -> dict[str, Any]:
    """The checkpoint's record; for older checkpoints, the one rebuilt from `data` or the recorded dataset."""
    if meta.get("preprocess") and data is None:
        return meta["preprocess"]
    from kdcli.defaults import recorded_dataset
    from kdcli.shards.format import DatasetMeta

    if data is None:
        try:
            data = recorded_dataset(meta, checkpoint)
        except KdcliError:
            raise KdcliError("the checkpoint predates the preprocessing record and the dataset it was trained on "
                             "is gone or changed", path=checkpoint,
                             hint="pass --data with the shard directory it was trained on") from None
    dataset = DatasetMeta.load(Path(data))
    recorded = (meta.get("data") or {}).get("source")
    if recorded and dataset.source != recorded:
        raise KdcliError(f"--data is a {dataset.source!r} dataset; the checkpoint was trained on {recorded!r} data",
                         path=data, hint="pass the shard directory it was trained on")
    return preprocessing_record(dataset)
