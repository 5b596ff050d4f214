"""`kdcli inspect`: what a shard directory holds, and (with verify) whether its bytes still match its hash."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import h5py
import polars as pl

from kdcli.errors import KdcliError
from kdcli.shards.format import MANIFEST_COLUMNS, SHARD_DIR, content_hash
from kdcli.shards.reader import ShardStore


def inspect_dataset(root: Path, verify: bool = False) -> dict[str, Any]:
    store = ShardStore(root)
    meta = store.meta
    manifest = store.manifest.with_columns(pl.col("modality").str.split("+").alias("modalities"))
    per_class: dict[str, dict[str, dict[str, int]]] = {}
    exploded = manifest.explode("modalities")
    keys = ["modalities", "split", "task", "label"]
    # what the manifest's `label` means: the class for classification, a coarse flag where the real targets are
    # maps or vectors (a slice with tumour, an X-ray with any finding), named by the source
    label_names = meta.extra.get("label_names") or meta.classes
    for modality, split, task, label, count in exploded.group_by(keys).len().sort(keys).iter_rows():
        if label < 0:
            name = "unlabeled"
        else:
            name = f"{task}:{meta.classes_for(task)[label]}" if task else label_names[label]
        per_class.setdefault(modality, {}).setdefault(split, {})[name] = int(count)
    report: dict[str, Any] = {
        "path": str(root), "source": meta.source, "task": meta.task, "pairing": meta.pairing,
        "classes": meta.classes, "label_names": label_names if not meta.tasks else [], "tasks": meta.tasks,
        "modalities": meta.modalities, "counts": meta.counts, "unlabeled": meta.unlabeled,
        "per_class": per_class, "samples": manifest.height,
        "shards": manifest["shard"].n_unique(), "content_hash": meta.content_hash,
        "kdcli_version": meta.kdcli_version, "prepare": meta.prepare,
    }
    if verify:
        report["verified"] = verify_hash(store)
    return report


def verify_hash(store: ShardStore) -> bool:
    """Recompute every shard's digest from its pixels; raise naming the first shard that differs."""
    digests = {}
    rows = store.manifest.select(MANIFEST_COLUMNS).rows()  # the hashed columns (not derived ones: labelled)
    for shard in sorted(store.manifest["shard"].unique().to_list()):
        path = store.root / SHARD_DIR / shard
        with h5py.File(path, "r") as handle:
            ids = [i.decode() if isinstance(i, bytes) else i for i in handle["id"][:]]
            head = "\n".join(ids).encode() + handle["label"][:].tobytes()
            current, older = hashlib.sha256(), hashlib.sha256(head)  # pixels then ids; kdcli <= 0.1: ids first
            arrays = sorted(k for k in handle if k not in ("id", "label", "record", "position"))
            for index in range(len(ids)):
                for name in arrays:
                    pixels = handle[name][index].tobytes()
                    current.update(pixels)
                    older.update(pixels)
            current.update(head)
            digest = next((h.hexdigest() for h in (current, older) if h.hexdigest() == handle.attrs["digest"]), None)
            if digest is None:
                raise KdcliError("shard content differs from its recorded digest", path=path,
                                 hint="the file was modified or damaged; re-run `kdcli prepare`")
            digests[shard] = digest
    if content_hash(digests, rows) != store.meta.content_hash:
        raise KdcliError("manifest or shards differ from dataset.json's content_hash", path=store.root,
                         hint="re-run `kdcli prepare`")
    return True
