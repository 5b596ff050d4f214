"""What a checkpoint records about how its data were preprocessed, so `kdcli predict` (and `kdcli export`'s
contract) can treat raw files exactly as `prepare` did, without the shards.

Training stores `preprocessing_record(dataset)` (kdcli.sources.preprocessing) in the checkpoint's meta under
"preprocess": the source, the stored side, the source options that change pixels (CLAHE, median filter,
magnification and patch geometry), the modalities' stored shapes and dtypes, and for slides the clinical
encoding (vocabularies, train statistics) that turns a sheet row into the model's clinical vector. Everything
else each source does (pad to square, DICOM windowing, z-scoring in the brain mask, the brain crop, tissue
detection) is fixed in the source's code and runs as is.
Checkpoints written before that record existed fall back on the dataset they were trained on (dataset.json),
when it is still there unchanged, or on `--data SHARDS`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdcli.errors import KdcliError
from kdcli.sources.preprocessing import preprocessing_record


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
