"""What every dataset source provides: records found in a raw folder, and one record read into arrays."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np


@dataclass(frozen=True)
class Record:
    """One sample: the unit a shard stores and a manifest row describes."""

    id: str
    group: str  # patient or eye: splits and pairing never cut through a group
    split: str
    label: int
    files: dict[str, str]  # modality -> raw file
    task: str = ""  # which label space `label` belongs to, for datasets with several (e.g. DR and AMD grades)


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


class Source:
    """Subclass per dataset: set `name`, implement `scan` and `load`; register one line in __init__."""

    name: ClassVar[str] = ""

    def __init__(self, **options: Any):
        self.options = options

    def scan(self, raw: Path) -> Scan:
        raise NotImplementedError

    def load(self, record: Record, size: int) -> dict[str, np.ndarray]:
        """Decode and preprocess a record: modality -> uint8 array (size, size, channels)."""
        raise NotImplementedError
