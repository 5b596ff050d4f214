"""`kdcli inspect`: what a shard directory holds, and (with verify) whether its bytes still match its hash."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from kdcli.shards.integrity import record_fingerprints
from kdcli.shards.reader import ShardStore


def inspect_dataset(root: Path, verify: bool = False) -> dict[str, Any]:
    store = ShardStore(root, check=not verify)  # verify re-hashes everything below anyway
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
        "data_warnings": meta.data_warnings,  # bad data prepare kept (repaired), counted per kind
    }
    if verify:
        report["verified"] = True  # or verify_hash raised, naming what differs
        report["fingerprints_recorded"] = verify_hash(store)
    return report


def verify_hash(store: ShardStore) -> bool:
    """Re-hash every shard from its bytes and check the manifest against dataset.json's content_hash (raises
    naming the first shard that differs); then record fresh fingerprints, so that later opens of a copied
    dataset need only a stat per shard. Returns whether they could be recorded (False: a read-only folder)."""
    digests = store.verify()
    return record_fingerprints(store.root, digests, store.meta.content_hash)
