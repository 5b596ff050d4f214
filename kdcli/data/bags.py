"""Bags of patches for multiple-instance learning: one item per slide (record), with its clinical record.

Items: {"patches": uint8 (K, C, H, W), "bag_mask": bool (K,) (False = padding), "clinical": float32 (D,),
"clinical_mask": float32 (D,) (1 = observed), "clinical_present": bool, "label", "index", "teacher_index"}.
With `embeddings` (a file from `kdcli embed`), items carry "features" (K, F) float32, the cached patch
embeddings, instead of pixels ("patches" too when `with_patches`, for pictures).
In training, `bag_size` distinct patches are drawn per slide and epoch (a slide with fewer gives each of its
patches once), seeded per (seed, epoch, slide) and flipped/rotated by 90 degrees (patches have no orientation);
without `bag_size` an item is every patch in order. Evaluation (`kdcli.mil.predict_bags`) cuts each slide into
`eval_bags`: disjoint bags of at most the training bag size, seeded by the slide's id, the slide's score the mean
over its bags (BALNMP's protocol), so a model is scored on bags like those it learned from, the same bags for
every model and run; a slide of at most bag_size patches is then one bag, the very bag it trains on.
Until issue 13 training drew with replacement (16 draws from a 6-patch slide: random duplicates, each doubling a
patch's attention weight, a reweighting evaluation never made) and evaluation pooled every patch at once.
`collate_bags` pads bags to the batch's largest.
Unlabeled slides (label -1: `prepare camelyon` rows without an ALN status, train split only) are left out unless
`unlabeled=True` (distill with a method that reads them, e.g. bidirectional's distillation terms).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch.utils.data import Dataset, default_collate

from kdcli.data.epoch import SharedEpoch
from kdcli.errors import KdcliError
from kdcli.shards.reader import ShardStore
from kdcli.sources.splits import stable_seed


class BagView(SharedEpoch, Dataset):
    @staticmethod
    def collate(items: list[dict]) -> dict:
        return collate_bags(items)

    def __init__(self, store: ShardStore, split: str, bag_size: int | None = None, augment: bool = False,
                 seed: int = 0, hide_clinical: set[str] | None = None, embeddings: str | Path | None = None,
                 with_patches: bool = False, unlabeled: bool = False):
        store.require_modality("wsi")
        self.store, self.split, self.bag_size, self.augment = store, split, bag_size, augment
        self.seed, self.epoch = seed, 0
        self.has_clinical = "clinical" in store.meta.targets
        self.hide_clinical = hide_clinical or set()  # slides whose clinical record is withheld (missing-rate sweep)
        rows = store.rows(split, "wsi").sort(["record", "position"])
        if not unlabeled:  # teach, dev, test and evaluate: labelled slides only
            rows = rows.filter(pl.col("labelled"))
        if rows.height == 0:
            raise KdcliError(f"no slides in split {split!r}", path=store.root)
        self.embeddings = Path(embeddings) if embeddings else None
        self.with_patches = with_patches or self.embeddings is None
        self._features = None  # opened lazily, once per process
        row_of = embedding_rows(self.embeddings) if self.embeddings else {}
        self.records: list[str] = []
        self.members: list[tuple[list[str], np.ndarray]] = []
        self.feature_rows: list[np.ndarray] = []
        labels = []
        for (record,), frame in rows.group_by(["record"], maintain_order=True):
            self.records.append(record)
            self.members.append((frame["shard"].to_list(), frame["index"].to_numpy()))
            if self.embeddings:
                missing = [i for i in frame["id"] if i not in row_of]
                if missing:
                    raise KdcliError(f"no embedding for patch {missing[0]}", path=self.embeddings,
                                     hint="rerun `kdcli embed` on this shard directory")
                self.feature_rows.append(np.array([row_of[i] for i in frame["id"]], dtype=np.int64))
            labels.append(int(frame["label"][0]))
        self.labels = np.array(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.records)

    def patch_indices(self, i: int) -> np.ndarray:
        count = len(self.members[i][1])
        if not self.bag_size:
            return np.arange(count)
        rng = np.random.default_rng((self.seed, self.epoch, i))
        return rng.choice(count, size=min(count, self.bag_size), replace=False)

    def features(self, i: int, chosen: np.ndarray) -> np.ndarray:
        import h5py

        if self._features is None or self._features[0] != os.getpid():
            self._features = (os.getpid(), h5py.File(self.embeddings, "r")["features"])
        rows = self.feature_rows[i][chosen]
        unique, inverse = np.unique(rows, return_inverse=True)  # h5py reads increasing rows
        return self._features[1][unique].astype(np.float32)[inverse]

    def __getitem__(self, i: int) -> dict:
        shards, indices = self.members[i]
        chosen = self.patch_indices(i)
        extra = {"features": torch.from_numpy(self.features(i, chosen))} if self.embeddings else {}
        if not self.with_patches:
            return {**extra, **self._clinical(i, len(chosen))}
        patches = np.stack([self.store.read(shards[k], int(indices[k]), "wsi") for k in chosen])
        if self.augment:
            rng = np.random.default_rng((self.seed + 7, self.epoch, i))
            for k in range(len(patches)):
                patches[k] = np.rot90(patches[k], int(rng.integers(4)))
                if rng.random() < 0.5:
                    patches[k] = patches[k][:, ::-1]
        return {"patches": torch.from_numpy(np.ascontiguousarray(patches.transpose(0, 3, 1, 2))), **extra,
                **self._clinical(i, len(chosen))}

    def _clinical(self, i: int, count: int) -> dict:
        shards, indices = self.members[i]
        first_shard, first_index = shards[0], int(indices[0])
        dims = self.store.meta.targets["clinical"]["shape"][0] if self.has_clinical else 1
        clinical, observed = np.zeros(dims, np.float32), np.zeros(dims, np.float32)
        present = self.has_clinical and self.records[i] not in self.hide_clinical
        if present:
            clinical = self.store.read(first_shard, first_index, "clinical").astype(np.float32)
            observed = self.store.read(first_shard, first_index, "clinical_mask").astype(np.float32)
            clinical = np.nan_to_num(clinical) * observed
        return {"bag_mask": torch.ones(count, dtype=torch.bool),
                "clinical": torch.from_numpy(clinical), "clinical_mask": torch.from_numpy(observed),
                "clinical_present": bool(present), "label": int(self.labels[i]), "index": i, "teacher_index": i}


def collate_bags(items: list[dict]) -> dict:
    """Pad every bag to the batch's largest; padded patches are masked out of the attention."""
    longest = max(item["bag_mask"].shape[0] for item in items)
    for item in items:
        missing = longest - item["bag_mask"].shape[0]
        if missing:
            for key in ("patches", "features", "bag_mask"):
                if key in item:
                    value = item[key]
                    item[key] = torch.cat([value, value.new_zeros((missing, *value.shape[1:]))])
    return default_collate(items)


def eval_bags(count: int, bag_size: int, record: str) -> list[np.ndarray]:
    """A slide's `count` patches cut into ceil(count / bag_size) disjoint bags of near-equal size (at most
    bag_size), in an order seeded by the slide's id alone: every model, epoch and run scores the same bags."""
    order = np.random.default_rng(stable_seed("eval-bags", record)).permutation(count)
    return [np.sort(part) for part in np.array_split(order, max(1, -(-count // bag_size)))]


def embedding_rows(path: Path) -> dict[str, int]:
    """Patch id -> row of the embeddings file."""
    import h5py

    if not Path(path).is_file():
        raise KdcliError("embeddings file not found", path=path, hint="run `kdcli embed --data SHARDS` first")
    with h5py.File(path, "r") as handle:
        return {(i.decode() if isinstance(i, bytes) else i): n for n, i in enumerate(handle["id"][:])}
