"""Torch datasets over a ShardStore. Items are dicts of uint8 CHW tensors and ints."""

from __future__ import annotations

import random
import sys

import numpy as np
import polars as pl
import torch
from torch.utils.data import Dataset, Sampler, WeightedRandomSampler, default_collate

from kdcli.data.epoch import SharedEpoch
from kdcli.data.transforms import FusedAugment
from kdcli.shards.reader import ShardStore


def to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _reference_counts(arrays: list[np.ndarray]) -> list[int]:
    return [sys.getrefcount(array) for array in arrays]


class BufferPool:
    """Batch buffers reused once nobody holds them any more (no tensor made from them is alive).

    A fresh multi-megabyte buffer per batch is page-faulted in on first touch, because glibc hands large blocks
    back to the OS on free: at 224 px that halved the loader's rate and made it swing between runs."""

    def __init__(self, keep: int = 4):
        self.keep, self.buffers = keep, []
        # The count an array held by this pool alone shows, taken through the same code path as the real check,
        # so the interpreter's own references cancel out whatever the Python version.
        self._unheld = _reference_counts([np.empty(0)])[0]

    def take(self, shape: tuple[int, ...], dtype=np.uint8) -> np.ndarray:
        for buffer, count in zip(self.buffers, _reference_counts(self.buffers), strict=True):
            if count == self._unheld and buffer.shape == shape and buffer.dtype == dtype:
                return buffer
        buffer = np.empty(shape, dtype)
        if len(self.buffers) >= self.keep:
            self.buffers.pop(0)
        self.buffers.append(buffer)
        return buffer

    def __getstate__(self) -> dict:  # workers start with their own buffers
        return {"keep": self.keep, "buffers": [], "_unheld": self._unheld}


class ModalityView(SharedEpoch, Dataset):
    """One modality of one split: {"image", "label", "index"}. DataLoaders over it take `collate_fn=collate`
    (batches come assembled by `__getitems__`).

    Augmentation is seeded per (seed, epoch, item), so a run gives the same batches with 0 or N workers."""

    def __init__(self, store: ShardStore, split: str, modality: str, augment=None, seed: int = 0,
                 tasks: list[str] | None = None, targets: tuple[str, ...] = (), unlabeled: bool = False):
        store.require_modality(modality)
        self.store, self.split, self.modality, self.augment = store, split, modality, augment
        self.unlabeled = unlabeled  # False: labelled samples only (teach, dev, test); True: label -1 ones too
        # Target arrays carried along (multi-label vectors, gaze heat maps, box masks): maps of the image's
        # size follow its augmentation, so a heat map stays on the pixels it marks.
        self.targets = tuple(targets)
        self.seed, self.epoch = seed, 0
        rows = store.rows(split, modality)
        if not unlabeled:
            rows = rows.filter(pl.col("labelled"))
        if tasks:  # datasets with several label spaces: keep these tasks' samples, remember which is which
            rows = rows.filter(rows["task"].is_in(tasks))
        self.tasks = np.array([tasks.index(t) for t in rows["task"]] if tasks else np.zeros(len(rows)), dtype=np.int64)
        self.ids = rows["id"].to_list()
        self.labels = rows["label"].to_numpy()
        self.shards = rows["shard"].to_list()
        self.indices = rows["index"].to_numpy()
        # whose augmentation draws each row takes: its own, unless a pairing view lends it its partner's
        self.draw_keys = np.arange(len(self.ids), dtype=np.uint64)
        self.buffers = BufferPool()

    def __len__(self) -> int:
        return len(self.ids)

    def item_seeds(self, items) -> np.ndarray:
        """Augmentation seed of each item this epoch (uint64, wrapping)."""
        base = ((self.seed * 1_000_003 + self.epoch) * 10_000_019) & ((1 << 64) - 1)
        with np.errstate(over="ignore"):
            return np.uint64(base) + self.draw_keys[np.asarray(items, dtype=np.int64)]

    def _augment(self, i: int, image: np.ndarray, masks: list[np.ndarray] | None = None) -> dict:
        seed = int(self.item_seeds([i])[0])
        if isinstance(self.augment, FusedAugment):
            return self.augment(image=image, masks=masks or [], seed=seed)
        # any albumentations-style pipeline: one generator (pair) per item and epoch
        python_random = random.Random(seed) if getattr(self.augment, "needs_python_random", True) else None
        self.augment.set_random_state(np.random.default_rng(seed), python_random)
        return self.augment(image=image, masks=masks) if masks else self.augment(image=image)

    def image(self, i: int, modality: str | None = None) -> np.ndarray:
        array = self.store.read(self.shards[i], int(self.indices[i]), modality or self.modality)
        if self.augment is not None:
            array = self._augment(i, array)["image"]
            if array.ndim == 2:
                array = array[:, :, None]
        return array

    def with_targets(self, i: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The (augmented) image and its target arrays, spatial ones transformed with it."""
        shard, index = self.shards[i], int(self.indices[i])
        arrays = {name: self._target(i, name) for name in self.targets}
        if self.augment is None:
            return self.store.read(shard, index, self.modality), arrays
        image = self.store.read(shard, index, self.modality)
        spatial = [name for name, a in arrays.items() if a.ndim == 3 and a.shape[:2] == image.shape[:2]]
        result = self._augment(i, image, [arrays[name] for name in spatial])
        for name, mask in zip(spatial, result["masks"], strict=True):
            arrays[name] = mask if mask.ndim == 3 else mask[:, :, None]
        image = result["image"]
        return (image if image.ndim == 3 else image[:, :, None]), arrays

    def _target(self, i: int, name: str) -> np.ndarray:
        """A target array of row i. An unlabeled sample's shard holds no label vector (prepare cxr): it reads as
        the dataset's ignore value (masked losses leave it out), so that a batch mixing both still collates."""
        if self.labels[i] < 0 and name == "labels":
            spec = self.store.meta.targets[name]
            return np.full(spec["shape"], self.store.meta.extra.get("ignore_value", 255), spec.get("dtype", "uint8"))
        return self.store.read(self.shards[i], int(self.indices[i]), name)

    def __getitem__(self, i: int) -> dict:
        if self.targets:
            image, arrays = self.with_targets(i)
            extra = {name: to_tensor(a) if a.ndim == 3 else torch.from_numpy(np.ascontiguousarray(a))
                     for name, a in arrays.items()}
        else:
            image, extra = self.image(i), {}
        return {"image": to_tensor(image), "label": int(self.labels[i]), "index": i,
                "task": int(self.tasks[i]), "teacher_index": i, **extra}

    @property
    def batched(self) -> bool:
        """Whether `__getitems__` assembles whole batches (else it returns one item dict per index)."""
        return not self.targets and (self.augment is None or isinstance(self.augment, FusedAugment))

    def __getitems__(self, indices: list[int]) -> list[dict] | dict:
        """DataLoader's batched fetch: one read per shard into a reused buffer, the whole batch augmented at once
        (FusedAugment.batch), assembled here already collated (see `collate`) instead of one dict and tensor per
        sample. Items with target arrays, or another augmentation, go one by one."""
        if not self.batched:
            return [self[i] for i in indices]
        meta = self.store.meta.modalities[self.modality]
        shape = tuple(meta["shape"])
        # the raw batch is handed out only when nothing transforms it; otherwise it is private to this view
        raw = self.buffers.take((len(indices), *shape), np.dtype(meta.get("dtype", "uint8")))
        by_shard: dict[str, list[int]] = {}
        for position, i in enumerate(indices):
            by_shard.setdefault(self.shards[i], []).append(position)
        for shard, positions in by_shard.items():
            rows = self.indices[[indices[p] for p in positions]]
            if len(by_shard) == 1:  # the common case: straight into the buffer
                self.store.read_many(shard, rows, self.modality, out=raw)
            else:
                raw[positions] = self.store.read_many(shard, rows, self.modality)
        chosen = np.asarray(indices)
        channels_last = raw
        if self.augment is not None:
            size = self.augment.size
            channels_last = self.buffers.take((len(indices), size, size, shape[2]), raw.dtype)
            self.augment.batch(raw, self.item_seeds(chosen), channels_last)
        # NHWC memory seen as NCHW is exactly torch's channels_last layout: no transposing copy (the copy cost
        # more than the read at 224 px); convolutions take channels_last directly.
        # The small per-item fields share one storage: a worker then passes the batch as two shared-memory
        # segments, not five (each costs a file descriptor and a mapping).
        fields = torch.from_numpy(np.stack([self.labels[chosen].astype(np.int64), chosen, self.tasks[chosen]]))
        return {"image": torch.from_numpy(channels_last).permute(0, 3, 1, 2),
                "label": fields[0], "index": fields[1], "task": fields[2], "teacher_index": fields[1]}


def collate(batch: list[dict] | dict):
    """default_collate, except for batches a view already assembled (ModalityView.__getitems__)."""
    return batch if isinstance(batch, dict) else default_collate(batch)


class UnpairedPartnerView(SharedEpoch, Dataset):
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

    def __getitems__(self, indices: list[int]) -> list[dict] | dict:
        if not (self.student.batched and self.partner.batched):
            return [self[i] for i in indices]
        partners = [self.partner_index(i) for i in indices]
        batch, partner = self.student.__getitems__(indices), self.partner.__getitems__(partners)
        batch.update(teacher_image=partner["image"], teacher_label=partner["label"],
                     teacher_index=torch.tensor(partners))
        return batch


class PairedView(Dataset):
    """Records that carry both modalities: the student's image and the teacher's image of the same record.

    Pairs are matched by record id, not by row position (a teacher modality with an extra record would shift
    every later pair), and the teacher's row takes the student item's augmentation draws: both images of a pair
    get the same crop, flip and rotation (and the same colour draw; their intensities differ anyway)."""

    def __init__(self, store: ShardStore, split: str, student: str, teacher: str, augment=None,
                 teacher_augment=None, seed: int = 0, unlabeled: bool = False):
        from kdcli.errors import KdcliError

        self.student = ModalityView(store, split, student, augment, seed, unlabeled=unlabeled)
        # every teacher row, labelled or not: the rows the teacher cache is built over
        self.teacher = ModalityView(store, split, teacher, teacher_augment, seed, unlabeled=True)
        row_of = {record: j for j, record in enumerate(self.teacher.ids)}
        if len(row_of) != len(self.teacher.ids):
            raise KdcliError(f"{teacher} ids repeat in split {split!r}: records cannot be paired", path=store.root,
                             hint="re-run `kdcli prepare`; every record id must be unique")
        unpaired = [i for i, record in enumerate(self.student.ids) if record not in row_of]
        labelled_unpaired = [i for i in unpaired if self.student.labels[i] >= 0]
        if labelled_unpaired:
            raise KdcliError(f"{len(labelled_unpaired)} {student} records of split {split!r} have no {teacher} "
                             f"image (first: {self.student.ids[labelled_unpaired[0]]})", path=store.root,
                             hint="paired methods (kd) need paired data; use --method coda")
        # unlabeled images of the student's modality alone cannot be labelled through the teacher: left out
        self.notes = [f"{len(unpaired)} unlabeled {student} images have no {teacher} partner: not used"] if unpaired \
            else []
        self.rows = np.array([i for i in range(len(self.student)) if self.student.ids[i] in row_of], dtype=np.int64)
        self.partner = np.array([row_of[self.student.ids[i]] for i in self.rows], dtype=np.int64)
        self.teacher.draw_keys[self.partner] = self.student.draw_keys[self.rows]
        self.labels = self.student.labels[self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.student.set_epoch(epoch)
        self.teacher.set_epoch(epoch)

    def __getitem__(self, i: int) -> dict:
        item = self.student[int(self.rows[i])]
        item["index"] = i  # this view's index (the student's row differs when unpartnered rows were left out)
        j = int(self.partner[i])
        item["teacher_image"] = self.teacher[j]["image"]
        item["teacher_label"] = item["label"]
        item["teacher_index"] = j  # the teacher modality's row: what the teacher cache is indexed by
        return item

    def __getitems__(self, indices: list[int]) -> list[dict] | dict:
        if not (self.student.batched and self.teacher.batched):
            return [self[i] for i in indices]
        batch = self.student.__getitems__(self.rows[np.asarray(indices)].tolist())
        if len(self.rows) != len(self.student):
            batch["index"] = torch.as_tensor(indices)
        partners = self.partner[np.asarray(indices)]
        batch.update(teacher_image=self.teacher.__getitems__(partners.tolist())["image"],
                     teacher_label=batch["label"], teacher_index=torch.from_numpy(partners))
        return batch


def class_balanced_sampler(labels: np.ndarray, num_samples: int, seed: int, unlabeled_ratio: float = 1.0,
                           balanced: bool = True) -> Sampler:
    """Weights 1/class count, with replacement (as MultiEYE trains); unlabeled samples (label -1) as one more
    pool drawn `unlabeled_ratio` times as often as all labelled ones together. `balanced=False`: labelled
    samples uniformly (the pool share still holds)."""
    labels = np.asarray(labels)
    labelled = labels >= 0
    weights = np.zeros(len(labels))
    if balanced:
        counts = np.bincount(labels[labelled])
        weights[labelled] = 1.0 / counts[labels[labelled]]
    else:
        weights[labelled] = 1.0
    if not labelled.all():
        # the pool's total weight is unlabeled_ratio x the labelled total, spread evenly over its samples
        weights[~labelled] = unlabeled_ratio * weights[labelled].sum() / (~labelled).sum()
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), num_samples,
                                 replacement=True, generator=generator)
