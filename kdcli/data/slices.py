"""Slices of volumes for segmentation: several sequences stacked as channels, and the label map.

Items: {"image": float32 (C, H, W), "mask": int64 (H, W), "label": 1 if the slice has tumour (0 if not, -1 if
unlabeled), "index", "teacher_index", "position": the slice's index in its volume} and, for paired distillation,
"teacher_image" (the teacher's sequences of the same slice, flipped the same way, so pixels and mask stay
aligned).
Sequences in `absent` are zero-filled (z-scored data: zero is the brain's mean), the missing-modality setting.
Unlabeled slices (cases of `prepare brats --unlabeled`, label -1) are left out unless `unlabeled=True` (distill
with a method that learns from them); theirs is a mask of -1 everywhere (no label map is stored), which
segmentation_loss leaves out and ProtoKD replaces by the teacher's prediction.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch
from torch.utils.data import Dataset

from kdcli.data.epoch import SharedEpoch
from kdcli.errors import KdcliError
from kdcli.shards.reader import ShardStore


class SliceView(SharedEpoch, Dataset):
    def __init__(self, store: ShardStore, split: str, modalities: list[str],
                 teacher_modalities: list[str] | None = None, augment: bool = False, seed: int = 0,
                 absent: tuple[str, ...] = (), target: str = "seg", unlabeled: bool = False):
        for modality in {*modalities, *(teacher_modalities or [])}:
            store.require_modality(modality)
        if target not in store.meta.targets:
            raise KdcliError(f"dataset has no {target!r} label maps", path=store.root,
                             hint="segmentation needs a dataset prepared by `kdcli prepare brats`")
        self.store, self.split, self.modalities = store, split, list(modalities)
        self.teacher_modalities = list(teacher_modalities or [])
        self.augment, self.seed, self.epoch, self.absent, self.target = augment, seed, 0, set(absent), target
        self.unlabeled = unlabeled  # False: labelled slices only (teach, dev, test, evaluate); True: label -1 too
        rows = store.rows(split, modalities[0])
        if not unlabeled:
            rows = rows.filter(pl.col("labelled"))
        rows = rows.sort(["record", "position"])
        self.ids = rows["id"].to_list()
        self.records = rows["record"].to_list()
        self.positions = rows["position"].to_numpy()
        self.labels = rows["label"].to_numpy()
        self.shards = rows["shard"].to_list()
        self.indices = rows["index"].to_numpy()

    def __len__(self) -> int:
        return len(self.ids)

    def _stack(self, i: int, modalities: list[str], scales: dict[str, float]) -> np.ndarray:
        shard, index = self.shards[i], int(self.indices[i])
        planes = [np.zeros(self.store.meta.modalities[m]["shape"][:2], np.float32) if m in self.absent
                  else self.store.read(shard, index, m)[..., 0].astype(np.float32) * scales.get(m, 1.0)
                  for m in modalities]
        return np.stack(planes)

    def __getitem__(self, i: int) -> dict:
        scales, flips = {}, (False, False)
        if self.augment:
            # ProtoKD's augmentation in 2D: flip each in-plane axis (p=.5), scale each sequence by U(0.9, 1.1)
            # (p=.5); seeded per (seed, epoch, item) so runs repeat whatever the number of workers.
            rng = np.random.default_rng((self.seed, self.epoch, i))
            flips = tuple(bool(f) for f in rng.random(2) < 0.5)
            for m in sorted({*self.modalities, *self.teacher_modalities}):
                scale = rng.uniform(0.9, 1.1)
                scales[m] = scale if rng.random() < 0.5 else 1.0
        if self.labels[i] < 0:  # an unlabeled slice: its shard holds no label map
            mask = np.full(self.store.meta.targets[self.target]["shape"][:2], -1, np.int64)
        else:
            mask = self.store.read(self.shards[i], int(self.indices[i]), self.target)[..., 0].astype(np.int64)
        item = {"image": self._stack(i, self.modalities, scales), "mask": mask}
        if self.teacher_modalities:
            item["teacher_image"] = self._stack(i, self.teacher_modalities, scales)
        for axis, flip in enumerate(flips):
            if flip:
                for key in item:
                    item[key] = np.flip(item[key], axis=axis - 2)
        out = {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in item.items()}
        out.update(label=int(self.labels[i]), index=i, teacher_index=i, position=int(self.positions[i]))
        return out
