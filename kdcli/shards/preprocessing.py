"""What a dataset's preprocessing was, in the form a checkpoint records it (meta["preprocess"]), so that
`kdcli predict` and `kdcli export` can treat raw files exactly as `prepare` did (see kdcli.predict.contract).
It lives beside the shards, not in predict: every trainer writes it, and trainers sit below predict."""

from __future__ import annotations

from typing import Any

# source -> the prepare options that change what a stored sample looks like (paths, splits, seeds of the split
# and label policies do not); camelyon's seed picks the patches of a slide, so it belongs here
PIXEL_OPTIONS: dict[str, tuple[str, ...]] = {
    "multieye": ("clahe", "median"),
    "fundus-grading": (),
    "cxr": (),
    "brats": (),
    "table": (),  # each modality's channels are in its stored shape
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
        clinical = dataset.extra.get("clinical") or {}
        record["clinical_features"] = list(clinical.get("features") or [])
        if clinical.get("encoding"):  # how a sheet row becomes the vector: `predict --clinical` encodes as prepare
            record["clinical"] = {key: clinical.get(key) for key in ("features", "encoding", "id_column",
                                                                     "label_column")}
    return record
