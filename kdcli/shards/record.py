"""The unit a shard stores and a manifest row describes: a Record found in a raw folder, and the Samples it is
read into. Defined beside the shards (not in sources) because the writer stores them and sources sit above."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

UNLABELED = -1  # the label of a record nobody graded: it may only train, and only distillation terms read it


@dataclass(frozen=True)
class Record:
    """One sample: the unit a shard stores and a manifest row describes."""

    id: str
    group: str  # patient or eye: splits and pairing never cut through a group
    split: str
    label: int  # the class index; UNLABELED (-1) for a record without a label (train split only)
    files: dict[str, str]  # modality -> raw file
    task: str = ""  # which label space `label` belongs to, for datasets with several (e.g. DR and AMD grades)


@dataclass
class Sample:
    """One stored sample. Most records are one sample; a volume is many slices, a slide many patches."""

    id: str
    label: int
    arrays: dict[str, np.ndarray]
    position: int = -1  # where in its record it came from (slice index, patch number); -1: the record itself
