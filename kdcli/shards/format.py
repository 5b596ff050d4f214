"""Names, metadata and hashing of the shard format (v1). No torch here: readable by plain h5py users too."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcli.errors import KdcliError
from kdcli.storage import atomic_write, write_bytes_synced

SCHEMA_VERSION = 1
DATASET_JSON = "dataset.json"
MANIFEST = "manifest.parquet"
SHARD_DIR = "shards"
PLAN_JSON = "plan.json"
RECORDS_JSON = "records.json"  # record id -> what its source remembered (a volume's grid and crop, a slide's size)
SPLITS = ("train", "dev", "test")
MANIFEST_COLUMNS = ("id", "group", "split", "modality", "label", "shard", "index", "task", "record", "position")
DERIVED_COLUMNS = ("labelled",)  # written for readers' convenience, computed from the hashed columns (label >= 0)


def modality_key(modalities: list[str] | tuple[str, ...]) -> str:
    """The manifest's `modality` value: the record's modalities, sorted, joined by '+'."""
    return "+".join(sorted(modalities))


def shard_name(split: str, modalities: list[str] | tuple[str, ...], number: int, unlabeled: bool = False) -> str:
    """`unlabeled`: a shard of unlabeled records, which may lack arrays their labelled peers have (a label map)."""
    return f"{split}-{modality_key(modalities)}-{'unlabeled-' if unlabeled else ''}{number:05d}.h5"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, then rename: readers never see half a file (and a full
    disk is one line naming `path`; see kdcli.storage)."""
    atomic_write(Path(path), lambda tmp: write_bytes_synced(tmp, data))


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode())


def content_hash(shard_digests: dict[str, str], manifest_rows: list[tuple]) -> str:
    """One hash for the whole dataset: every shard's pixel digest plus every manifest row."""
    hasher = hashlib.sha256()
    for name in sorted(shard_digests):
        hasher.update(f"{name}={shard_digests[name]}\n".encode())
    for row in sorted(manifest_rows, key=lambda r: (str(r[5]), int(r[6]))):
        if len(row) > 8 and row[8] == row[0] and int(row[9]) == -1:
            row = row[:8]  # one sample per record: hashes as before record/position existed
        row = row[:7] if len(row) == 8 and row[7] == "" else row  # single-task datasets hash as before
        hasher.update(("\t".join(map(str, row)) + "\n").encode())
    return "sha256:" + hasher.hexdigest()


@dataclass
class DatasetMeta:
    """dataset.json: what a shard directory holds and how it was made (the nnU-Net fingerprint habit)."""

    source: str
    task: str
    classes: list[str]
    modalities: dict[str, dict[str, Any]]
    pairing: str
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    # stored arrays besides the image modalities, with their role: "target" (label maps, label vectors, heat
    # maps) or "input" (e.g. a clinical vector beside the slide patches)
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    # of those, samples without a label (label -1, train only): modality -> split -> count; {} when none
    unlabeled: dict[str, dict[str, int]] = field(default_factory=dict)
    prepare: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    # bad data kept, repaired (duplicate rows, NaN voxels, leakage allowed...): kind -> {message, count, examples}
    data_warnings: dict[str, dict[str, Any]] = field(default_factory=dict)
    content_hash: str = ""
    kdcli_version: str = ""
    schema_version: int = SCHEMA_VERSION

    def classes_for(self, task: str | None) -> list[str]:
        """The label names of `task` (datasets with several label spaces), else the dataset's classes."""
        if not self.tasks:
            return self.classes
        if not task or task not in self.tasks:
            raise KdcliError(f"choose a task with --task: this dataset has {', '.join(self.tasks)}")
        return self.tasks[task]["classes"]

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "kdcli_version": self.kdcli_version,
            "source": self.source,
            "task": self.task,
            "classes": self.classes,
            "modalities": self.modalities,
            "pairing": self.pairing,
            "tasks": self.tasks,
            "targets": self.targets,
            "counts": self.counts,
            "unlabeled": self.unlabeled,
            "prepare": self.prepare,
            "extra": self.extra,
            "data_warnings": self.data_warnings,
            "content_hash": self.content_hash,
        }

    @classmethod
    def load(cls, root: Path) -> DatasetMeta:
        path = Path(root) / DATASET_JSON
        if not path.is_file():
            hint = "run `kdcli prepare` first, or point --data at a prepared shard directory"
            partial = Path(str(root) + ".partial")
            if partial.is_dir():
                hint = f"{partial} holds an unfinished prepare; rerun it with --resume"
            raise KdcliError("not a kdcli shard directory (no dataset.json)", path=root, hint=hint)
        try:
            payload = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise KdcliError(f"unreadable JSON ({exc.msg})", path=path, hint="re-run `kdcli prepare`") from None
        version = payload.get("schema_version")
        if version != SCHEMA_VERSION:
            raise KdcliError(
                f"shard schema version {version}, this kdcli reads {SCHEMA_VERSION}",
                path=path,
                hint="re-run `kdcli prepare` with this kdcli",
            )
        return cls(**{k: payload[k] for k in cls.__dataclass_fields__ if k in payload})
