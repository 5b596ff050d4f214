"""What every dataset source provides: records found in a raw folder, and one record read into arrays."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from kdcli.shards.record import UNLABELED, Record, Sample

__all__ = ["UNLABELED", "Record", "Sample", "Scan", "Source"]  # Record and Sample are the sources' vocabulary


@dataclass
class Scan:
    records: list[Record]
    classes: list[str]
    modalities: dict[str, int]  # modality -> channels stored
    pairing: str  # "unpaired" (independent pools per modality) or "paired" (records carry several)
    task: str = "classification"
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"classes": [...], "ordinal": bool}
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # quirks met while scanning, shown to the user
    # bad data kept (see sources/quality.py): filled by prepare from the scan's and the records' `warn` calls
    warnings: dict[str, dict[str, Any]] = field(default_factory=dict)
    # array name -> {"channels": C, "dtype": "uint8"|"float16", "role": "input"|"target", optional "shape" for
    # arrays that are not (size, size, C) images, e.g. a label vector [14]}; names not listed here
    # are uint8 inputs with the channels given in `modalities`. Targets (masks, heatmaps) are stored like
    # inputs but are not modalities a model can take.
    arrays: dict[str, dict[str, Any]] = field(default_factory=dict)


class Source:
    """Subclass per dataset: set `name` and `Options`, implement `scan` and `load`; register one line in
    __init__. `kdcli prepare <name>` is generated from `Options` (kdcli/cli_from_options.py)."""

    name: ClassVar[str] = ""
    #: the source's own options: a dataclass whose docstring is the command's help and whose fields carry
    #: metadata={"help": ...} (optional "flag", "metavar", "hidden"); a field without default is required
    Options: ClassVar[type]
    raw_help: ClassVar[str] = "Raw dataset folder."  # the RAW argument's help
    default_size: ClassVar[int] = 224  # --size when not given
    #: a second run adds to an existing --out (one set per label space) instead of refusing it; no --part
    appends: ClassVar[bool] = False

    def __init__(self, **options: Any):
        self.options = options

    @classmethod
    def command_options(cls, options: dict[str, Any], out: Path) -> dict[str, Any]:
        """The source options of a `prepare` run from its Options values (None left out), e.g. a flag that names
        a folder under --out; recorded in dataset.json."""
        return options

    def scan(self, raw: Path) -> Scan:
        raise NotImplementedError

    #: records per shard when `prepare --shard-size` is not given (a volume or slide is many samples)
    records_per_shard: ClassVar[int] = 512

    def load(self, record: Record, size: int) -> dict[str, np.ndarray]:
        """Decode and preprocess a record: modality -> uint8 array (size, size, channels)."""
        raise NotImplementedError

    # --- what `kdcli predict` and `kdcli export` repeat on raw files (the checkpoint's meta["preprocess"])
    #: the prepare options that change what a stored sample looks like (paths, splits, seeds of the split and
    #: label policies do not): recorded in every checkpoint trained on this source's data
    pixel_options: ClassVar[tuple[str, ...]] = ()
    #: the raw files `kdcli predict` takes for an image model of this source, and what to call them
    raw_suffixes: ClassVar[tuple[str, ...]] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
    raw_kind: ClassVar[str] = "images"

    @classmethod
    def record_extras(cls, dataset: Any) -> dict[str, Any]:
        """What else the checkpoint must remember of the prepared data (DatasetMeta) to treat raw files alike."""
        return {}

    @classmethod
    def raw_image_reader(cls, record: dict[str, Any], modality: str) -> Callable[[str], np.ndarray] | None:
        """path -> (size, size, C) uint8, exactly as `prepare` stored one image of `modality`; None: predict cannot
        read this source's raw files (its records are not single images, or nobody wrote it yet)."""
        return None

    @classmethod
    def preprocessing_steps(cls, record: dict[str, Any], meta: dict[str, Any]) -> list[str]:
        """The same in words, for whoever reimplements it (`kdcli export`'s contract)."""
        return []

    def read(self, record: Record, size: int) -> tuple[dict[str, Any], Iterator[Sample]]:
        """The record's samples, streamed, and what must be remembered about the record (JSON-able: a volume's
        grid and crop, to rebuild it). Sources whose records are single images only implement `load`.
        A source that skips a bad record (--skip-bad) returns {"skipped": reason} and no samples."""
        return {}, iter([Sample(record.id, record.label, self.load(record, size))])


class PhotoSource(Source):
    """A source whose records are single RGB photos, stored padded to square and resized (graded fundus sets,
    dermoscopy): `kdcli predict` reads raw photos with the same function."""

    @classmethod
    def raw_image_reader(cls, record: dict[str, Any], modality: str) -> Callable[[str], np.ndarray]:
        import functools

        from kdcli.sources.imaging import preprocess_photo

        return functools.partial(preprocess_photo, size=int(record["size"]))

    @classmethod
    def preprocessing_steps(cls, record: dict[str, Any], meta: dict[str, Any]) -> list[str]:
        from kdcli.sources.imaging import resize_square_step

        return ["decode to RGB uint8 (16-bit / 257)", resize_square_step(int(record["size"]))]
