"""Teacher outputs computed once and stored beside the shards, so distillation stops paying for the teacher.

`distill --cache-teacher` runs the frozen teacher(s) once over the un-augmented training images they see and
writes `<shards>/cache/teacher-<key>.h5`, keyed by the teachers' checkpoint hashes and the input modality;
later runs read it. A cache written for other shard contents is refused. The price: the teacher answers for
the plain image, not for each augmented view (methods that need the latter run without --cache-teacher).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kdcli.errors import KdcliError
from kdcli.storage import new_h5

OUTPUTS = ("logits", "sims")


def cache_path(store_root: Path, teacher_hashes: list[str], modality: str) -> Path:
    key = hashlib.sha256("|".join([*teacher_hashes, modality]).encode()).hexdigest()[:16]
    return Path(store_root) / "cache" / f"teacher-{key}.h5"


@torch.no_grad()
def build(teachers: dict[str, torch.nn.Module], view: Dataset, path: Path, data_hash: str, device: torch.device,
          batch_size: int = 64) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    outputs: dict[str, dict[str, list[np.ndarray]]] = {name: {} for name in teachers}
    from kdcli.data.views import collate

    for batch in DataLoader(view, batch_size=batch_size, collate_fn=collate):
        images = batch["image"].to(device).contiguous()  # the layout training batches reach the model in
        for name, teacher in teachers.items():
            out = teacher(images)
            for key in OUTPUTS:
                if key in out:
                    outputs[name].setdefault(key, []).append(out[key].float().cpu().numpy())
    try:
        with new_h5(tmp, path) as handle:
            for name, arrays in outputs.items():
                for key, parts in arrays.items():
                    handle.create_dataset(f"{name}/{key}", data=np.concatenate(parts))
            handle.attrs.update({"data_hash": data_hash, "count": len(view), "complete": 1})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: Path, data_hash: str, count: int) -> dict[str, dict[str, np.ndarray]]:
    with h5py.File(path, "r") as handle:
        if not handle.attrs.get("complete") or handle.attrs.get("data_hash") != data_hash:
            raise KdcliError("teacher cache was written for other shard contents", path=path,
                             hint="delete it; the next --cache-teacher run rebuilds it")
        if int(handle.attrs["count"]) != count:
            raise KdcliError(f"teacher cache holds {int(handle.attrs['count'])} samples, the data {count}",
                             path=path, hint="delete it; the next --cache-teacher run rebuilds it")
        return {name: {key: group[key][:] for key in group} for name, group in handle.items()}


class CachedTeacherView(Dataset):
    """Adds the cached outputs of the item's teacher input (`teacher_index`) under `cached`."""

    def __init__(self, base: Dataset, cache: dict[str, dict[str, np.ndarray]]):
        self.base, self.cache = base, cache

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def _with_cached(self, item: dict) -> dict:
        j = item["teacher_index"]  # an int, or a batch's index tensor
        j = j.numpy() if isinstance(j, torch.Tensor) else j
        item["cached"] = {name: {key: torch.from_numpy(np.ascontiguousarray(array[j]))
                                 for key, array in outputs.items()} for name, outputs in self.cache.items()}
        return item

    def __getitem__(self, i: int) -> dict:
        return self._with_cached(self.base[i])

    def __getitems__(self, indices: list[int]) -> list[dict] | dict:
        if hasattr(self.base, "__getitems__"):
            fetched = self.base.__getitems__(indices)
        else:
            fetched = [self.base[i] for i in indices]
        if isinstance(fetched, dict):
            return self._with_cached(fetched)
        return [self._with_cached(item) for item in fetched]
