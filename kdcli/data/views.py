"""Torch datasets over a ShardStore. Items are dicts of uint8 CHW tensors and ints."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, WeightedRandomSampler, default_collate

from kdcli.shards.reader import ShardStore


def to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


class ModalityView(Dataset):
    """One modality of one split: {"image", "label", "index"}.

    Augmentation is seeded per (seed, epoch, item), so a run gives the same batches with 0 or N workers."""

    def __init__(self, store: ShardStore, split: str, modality: str, augment=None, seed: int = 0,
                 tasks: list[str] | None = None, targets: tuple[str, ...] = ()):
        store.require_modality(modality)
        self.store, self.split, self.modality, self.augment = store, split, modality, augment
        # Target arrays carried along (multi-label vectors, gaze heat maps, box masks): maps of the image's
        # size follow its augmentation, so a heat map stays on the pixels it marks.
        self.targets = tuple(targets)
        self.seed, self.epoch = seed, 0
        rows = store.rows(split, modality)
        if tasks:  # datasets with several label spaces: keep these tasks' samples, remember which is which
            rows = rows.filter(rows["task"].is_in(tasks))
        self.tasks = np.array([tasks.index(t) for t in rows["task"]] if tasks else np.zeros(len(rows)), dtype=np.int64)
        self.ids = rows["id"].to_list()
        self.labels = rows["label"].to_numpy()
        self.shards = rows["shard"].to_list()
        self.indices = rows["index"].to_numpy()

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _seed_augment(self, seed: int) -> None:
        """One generator (pair, for albumentations) per item and epoch: a third of the cost of set_random_seed."""
        python_random = random.Random(seed) if getattr(self.augment, "needs_python_random", True) else None
        self.augment.set_random_state(np.random.default_rng(seed), python_random)

    def image(self, i: int, modality: str | None = None) -> np.ndarray:
        array = self.store.read(self.shards[i], int(self.indices[i]), modality or self.modality)
        if self.augment is not None:
            seed = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + i
            self._seed_augment(seed)
            array = self.augment(image=array)["image"]
            if array.ndim == 2:
                array = array[:, :, None]
        return array

    def with_targets(self, i: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The (augmented) image and its target arrays, spatial ones transformed with it."""
        shard, index = self.shards[i], int(self.indices[i])
        arrays = {name: self.store.read(shard, index, name) for name in self.targets}
        if self.augment is None:
            return self.store.read(shard, index, self.modality), arrays
        image = self.store.read(shard, index, self.modality)
        spatial = [name for name, a in arrays.items() if a.ndim == 3 and a.shape[:2] == image.shape[:2]]
        self._seed_augment((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i)
        result = self.augment(image=image, masks=[arrays[name] for name in spatial])
        for name, mask in zip(spatial, result["masks"], strict=True):
            arrays[name] = mask if mask.ndim == 3 else mask[:, :, None]
        image = result["image"]
        return (image if image.ndim == 3 else image[:, :, None]), arrays

    def __getitem__(self, i: int) -> dict:
        if self.targets:
            image, arrays = self.with_targets(i)
            extra = {name: to_tensor(a) if a.ndim == 3 else torch.from_numpy(np.ascontiguousarray(a))
                     for name, a in arrays.items()}
        else:
            image, extra = self.image(i), {}
        return {"image": to_tensor(image), "label": int(self.labels[i]), "index": i,
                "task": int(self.tasks[i]), "teacher_index": i, **extra}

    def __getitems__(self, indices: list[int]) -> list[dict] | dict:
        """DataLoader's batched fetch. Without augmentation: one h5py read per shard and the batch assembled
        here, already collated (see `collate`), instead of one dict and tensor per sample."""
        if self.augment is not None or self.targets:
            return [self[i] for i in indices]
        by_shard: dict[str, list[int]] = {}
        for position, i in enumerate(indices):
            by_shard.setdefault(self.shards[i], []).append(position)
        if len(by_shard) == 1:  # the common case: no gather copy
            channels_last = self.store.read_many(self.shards[indices[0]], self.indices[indices], self.modality)
        else:
            channels_last = np.empty((len(indices), *self.store.meta.modalities[self.modality]["shape"]), np.uint8)
            for shard, positions in by_shard.items():
                rows = self.indices[[indices[p] for p in positions]]
                channels_last[positions] = self.store.read_many(shard, rows, self.modality)
        chosen = np.asarray(indices)
        # NHWC memory seen as NCHW is exactly torch's channels_last layout: no transposing copy (the copy cost
        # more than the read at 224 px); convolutions take channels_last directly.
        return {"image": torch.from_numpy(channels_last).permute(0, 3, 1, 2),
                "label": torch.from_numpy(self.labels[chosen].astype(np.int64)), "index": torch.from_numpy(chosen),
                "task": torch.from_numpy(self.tasks[chosen]), "teacher_index": torch.from_numpy(chosen)}


def collate(batch: list[dict] | dict):
    """default_collate, except for batches a view already assembled (ModalityView.__getitems__)."""
    return batch if isinstance(batch, dict) else default_collate(batch)


class UnpairedPartnerView(Dataset):
    """Each student item gets a teacher-modality item of the same class drawn from the other pool
    (MultiEYE's unpaired sampling); a random one when the class has none. Deterministic per (seed, epoch)."""

    def __init__(self, student: ModalityView, partner: ModalityView, seed: int = 0):
        self.student, self.partner, self.seed, self.epoch = student, partner, seed, 0
        self.by_class: dict[int, np.ndarray] = {
            int(c): np.flatnonzero(partner.labels == c) for c in np.unique(partner.labels)
        }

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.student.set_epoch(epoch)
        self.partner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.student)

    def partner_index(self, i: int) -> int:
        rng = np.random.default_rng((self.seed, self.epoch, i))
        pool = self.by_class.get(int(self.student.labels[i]))
        if pool is None or len(pool) == 0:
            return int(rng.integers(len(self.partner)))
        return int(pool[rng.integers(len(pool))])

    def __getitem__(self, i: int) -> dict:
        item = self.student[i]
        j = self.partner_index(i)
        partner = self.partner[j]
        item["teacher_image"], item["teacher_label"] = partner["image"], partner["label"]
        item["teacher_index"] = j
        return item


class PairedView(Dataset):
    """Records that carry both modalities: the student's image and the teacher's, same augmentation seed."""

    def __init__(self, store: ShardStore, split: str, student: str, teacher: str, augment=None,
                 teacher_augment=None, seed: int = 0):
        self.student = ModalityView(store, split, student, augment, seed)
        self.teacher = ModalityView(store, split, teacher, teacher_augment, seed + 1)
        keep = set(self.student.ids) & set(self.teacher.ids)
        if len(keep) != len(self.student.ids):
            from kdcli.errors import KdcliError

            raise KdcliError(f"{len(self.student.ids) - len(keep)} {student} records have no {teacher} image",
                             path=store.root, hint="paired methods (kd) need paired data; use --method coda")

    def __len__(self) -> int:
        return len(self.student)

    def set_epoch(self, epoch: int) -> None:
        self.student.set_epoch(epoch)
        self.teacher.set_epoch(epoch)

    def __getitem__(self, i: int) -> dict:
        item = self.student[i]
        item["teacher_image"] = self.teacher[i]["image"]
        item["teacher_label"] = item["label"]
        item["teacher_index"] = i
        return item


def class_balanced_sampler(labels: np.ndarray, num_samples: int, seed: int) -> Sampler:
    """Weights 1/class count, with replacement (as MultiEYE trains)."""
    counts = np.bincount(labels)
    weights = 1.0 / counts[labels]
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), num_samples,
                                 replacement=True, generator=generator)
