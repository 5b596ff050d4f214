"""What a dataset's preprocessing was, in the form a checkpoint records it (meta["preprocess"]), so that
`kdcli predict` and `kdcli export` can treat raw files exactly as `prepare` did (see kdcli.predict.contract).
Each source says what belongs in it (Source.pixel_options, Source.record_extras); every trainer writes it."""

from __future__ import annotations

from typing import Any


def preprocessing_record(dataset: Any) -> dict[str, Any]:
    """The "preprocess" entry of a checkpoint's meta, from the DatasetMeta it is trained on."""
    from kdcli.sources import SOURCES

    source = SOURCES.get(dataset.source) if dataset.source in SOURCES else None
    prepare = dataset.prepare or {}
    options = prepare.get("source_options") or {}
    record: dict[str, Any] = {
        "source": dataset.source, "size": prepare.get("size"),
        "options": {key: options[key] for key in (source.pixel_options if source else ()) if key in options},
        "modalities": {name: dict(info) for name, info in dataset.modalities.items()},
    }
    return {**record, **(source.record_extras(dataset) if source else {})}
