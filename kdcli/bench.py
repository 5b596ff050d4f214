"""`kdcli bench`: measured comparisons against the naive way, in the same run, on the user's machine.

bench loader SHARDS   samples/s of kdcli's shard loader vs a folder of PNG files read with PIL (the same
                      augmentation, the same DataLoader settings), with 0, 1 and N workers, and vs plain h5py
                      reads without augmentation (the storage limit).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


@dataclass
class LoaderBenchOptions:
    data: Path
    modality: str | None = None
    split: str = "train"
    batch_size: int = 64
    workers: tuple[int, ...] = ()
    repeats: int = 2
    augment: str = "light"


class PngFolder(Dataset):
    """The naive way: one PNG per sample, decoded with PIL, then the same augmentation as kdcli."""

    def __init__(self, paths: list[Path], labels: np.ndarray, augment):
        self.paths, self.labels, self.augment = paths, labels, augment

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        array = np.asarray(Image.open(self.paths[i]))
        array = array[:, :, None] if array.ndim == 2 else array
        if self.augment is not None:
            array = self.augment(image=array)["image"]
            array = array[:, :, None] if array.ndim == 2 else array
        return {"image": torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))),
                "label": int(self.labels[i])}


def _rate(dataset: Dataset, batch_size: int, workers: int, repeats: int) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        persistent_workers=workers > 0)
    for _ in loader:  # warm-up pass: worker start-up, file handles, page cache
        break
    started, seen = time.perf_counter(), 0
    for _ in range(repeats):
        for batch in loader:
            seen += len(batch["label"])
    return seen / (time.perf_counter() - started)


def _h5py_rate(view, repeats: int) -> float:
    import h5py

    handles: dict[str, Any] = {}
    arrays: dict[str, Any] = {}
    started = time.perf_counter()
    for _ in range(repeats):
        for shard, index in zip(view.shards, view.indices, strict=True):
            if shard not in arrays:
                handles[shard] = h5py.File(view.store.root / "shards" / shard, "r")
                arrays[shard] = handles[shard][view.modality]
            arrays[shard][int(index)]
    rate = repeats * len(view) / (time.perf_counter() - started)
    for handle in handles.values():
        handle.close()
    return rate


def bench_loader(options: LoaderBenchOptions, log=print) -> dict[str, Any]:
    import cv2

    from kdcli.data.transforms import train_augmentation
    from kdcli.data.views import ModalityView
    from kdcli.shards.reader import ShardStore

    store = ShardStore(options.data)
    modality = options.modality or next(iter(store.meta.modalities))
    size = store.meta.modalities[modality]["shape"][0]
    augment = train_augmentation(size, options.augment)
    view = ModalityView(store, options.split, modality, augment)
    plain_view = ModalityView(store, options.split, modality)
    workers = options.workers or tuple(sorted({0, 1, os.cpu_count() or 1}))
    results: dict[str, Any] = {"samples": len(view), "modality": modality, "size": size, "rows": []}
    with tempfile.TemporaryDirectory(prefix="kdcli-bench-") as folder:
        paths = []
        for i in range(len(plain_view)):  # export once, untimed: the naive way's starting point
            array = plain_view.image(i)
            path = Path(folder) / f"{i:06d}.png"
            cv2.imwrite(str(path), array[:, :, ::-1] if array.shape[2] == 3 else array)
            paths.append(path)
        naive = PngFolder(paths, plain_view.labels, augment)
        for count in workers:
            kdcli_rate = _rate(view, options.batch_size, count, options.repeats)
            naive_rate = _rate(naive, options.batch_size, count, options.repeats)
            row = {"workers": count, "kdcli": kdcli_rate, "png_pil": naive_rate, "ratio": kdcli_rate / naive_rate}
            results["rows"].append(row)
            log(f"workers {count}: kdcli {kdcli_rate:,.0f}/s  png+PIL {naive_rate:,.0f}/s  x{row['ratio']:.2f}")
    h5 = _h5py_rate(plain_view, options.repeats)
    unaugmented = _rate(plain_view, options.batch_size, 0, options.repeats)
    results["plain_h5py"] = h5
    results["kdcli_no_augmentation"] = unaugmented
    results["fraction_of_h5py"] = unaugmented / h5
    log(f"no augmentation, 0 workers: kdcli {unaugmented:,.0f}/s vs plain h5py {h5:,.0f}/s "
        f"({100 * unaugmented / h5:.0f}%)")
    return results
