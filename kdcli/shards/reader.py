"""Read a shard directory. HDF5 files open lazily, once per process, so DataLoader workers each get
their own handles (h5py handles must not cross a fork)."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import polars as pl

from kdcli.errors import KdcliError
from kdcli.shards.format import MANIFEST, SHARD_DIR, DatasetMeta
from kdcli.shards.integrity import check_dataset

SLICE_BYTES = 2 * 1024 * 1024  # contiguous runs up to this size are read as one h5py slice (measured faster)


class ShardStore:
    def __init__(self, root: str | Path, check: bool = True):
        """`check`: refuse shards or a manifest that are not what dataset.json describes (integrity.py); off only
        for `inspect`, which reports instead."""
        self.root = Path(root)
        self.meta = DatasetMeta.load(self.root)
        manifest_path = self.root / MANIFEST
        try:
            self.manifest = pl.read_parquet(manifest_path)
        except Exception as exc:  # polars raises several types for a missing or damaged file
            raise KdcliError(f"unreadable manifest ({type(exc).__name__})", path=manifest_path,
                             hint="re-run `kdcli prepare`") from None
        if "record" not in self.manifest.columns:  # written by kdcli <= 0.1: one sample per record
            self.manifest = self.manifest.with_columns(pl.col("id").alias("record"),
                                                       pl.lit(-1, pl.Int64).alias("position"))
        if "labelled" not in self.manifest.columns:  # written before unlabeled samples existed
            self.manifest = self.manifest.with_columns((pl.col("label") >= 0).alias("labelled"))
        if check:
            check_dataset(self.root, self.manifest, self.meta.content_hash)
        self._handles: dict[str, h5py.File] = {}
        self._arrays: dict[tuple[str, str], h5py.Dataset] = {}
        self._raw: dict[tuple[str, str], tuple] = {}  # (raw chunks?, sample shape, dtype, offsets, bytes)
        self._pid = os.getpid()

    @property
    def classes(self) -> list[str]:
        return self.meta.classes

    def rows(self, split: str | None = None, modality: str | None = None, task: str | None = None) -> pl.DataFrame:
        """Manifest rows of a split whose records carry `modality` (alone or with others) and, when given,
        are labelled for `task`."""
        frame = self.manifest
        if split is not None:
            frame = frame.filter(pl.col("split") == split)
        if modality is not None:
            frame = frame.filter(pl.col("modality").str.split("+").list.contains(modality))
        if task:
            frame = frame.filter(pl.col("task") == task)
        return frame

    def verify(self, split: str | None = None) -> dict[str, str]:
        """Re-hash the shards of `split` (all when None) from their bytes, once per process; raises naming a shard
        that differs. Returns shard -> digest of every shard."""
        shards = set(self.rows(split)["shard"].to_list())
        return check_dataset(self.root, self.manifest, self.meta.content_hash, rehash=shards, full=split is None)

    def require_modality(self, modality: str) -> None:
        if modality not in self.meta.modalities:
            raise KdcliError(f"dataset has no modality {modality!r}; it has {', '.join(self.meta.modalities)}",
                             path=self.root, hint="pick one of those with --modality/--student")

    def _handle(self, shard: str) -> h5py.File:
        if os.getpid() != self._pid:  # forked into a worker: never reuse the parent's handles
            self._handles, self._arrays, self._raw, self._pid = {}, {}, {}, os.getpid()
        handle = self._handles.get(shard)
        if handle is None:
            path = self.root / SHARD_DIR / shard
            try:
                handle = h5py.File(path, "r", rdcc_nbytes=4 * 1024 * 1024)
            except OSError as exc:
                raise KdcliError(f"cannot open shard ({exc})", path=path, hint="re-run `kdcli prepare`") from None
            self._handles[shard] = handle
        return handle

    def _dataset(self, shard: str, modality: str) -> h5py.Dataset:
        array = self._arrays.get((shard, modality)) if os.getpid() == self._pid else None
        if array is None:  # h5py's name lookup costs as much as a small read: do it once per shard
            array = self._arrays[(shard, modality)] = self._handle(shard)[modality]
            # Uncompressed one-sample chunks can be read as raw bytes (HDF5's direct chunk read): a third of the
            # cost of h5py's selection machinery for 224 px images. Shape and dtype are looked up once: h5py's
            # properties cost more than the read itself for small images.
            raw = (not array.compression and array.chunks is not None and array.chunks[0] == 1
                   and tuple(array.chunks[1:]) == array.shape[1:])
            self._raw[(shard, modality)] = (raw, array.shape[1:], array.dtype, (0,) * (array.ndim - 1),
                                            array.dtype.itemsize * int(np.prod(array.shape[1:])))
        return array

    def read(self, shard: str, index: int, modality: str) -> np.ndarray:
        array = self._dataset(shard, modality)
        raw, shape, dtype, zeros, _ = self._raw[(shard, modality)]
        if raw:
            out = np.empty(shape, dtype=dtype)  # writable, as h5py's reads are
            array.id.read_direct_chunk((index, *zeros), out=out.reshape(-1).view(np.uint8))
            return out
        return array[index]

    def read_many(self, shard: str, indices: np.ndarray, modality: str, out: np.ndarray | None = None) -> np.ndarray:
        """Samples at `indices` of one shard (any order, repeats allowed), read in one call, in that order, into
        `out` when given (a caller's reused buffer of the right shape)."""
        array = self._dataset(shard, modality)
        raw, shape, dtype, zeros, sample_bytes = self._raw[(shard, modality)]
        indices = np.asarray(indices)
        if out is None:
            out = np.empty((len(indices), *shape), dtype=dtype)
        first = int(indices[0])
        run = len(indices) > 1 and np.array_equal(indices, np.arange(first, first + len(indices)))
        if run and len(indices) * sample_bytes <= SLICE_BYTES:  # a short contiguous run: one slice beats chunks
            array.read_direct(out, np.s_[first : first + len(indices)])
            return out
        if raw:
            rows = out.reshape(len(indices), -1).view(np.uint8)  # each sample's bytes, written in place
            read_chunk = array.id.read_direct_chunk
            for position, index in enumerate(indices.tolist()):
                read_chunk((index, *zeros), out=rows[position])
            return out
        unique, inverse = np.unique(indices, return_inverse=True)  # h5py wants increasing indices
        if len(unique) > 1 and unique[-1] - unique[0] == len(unique) - 1:
            block = array[int(unique[0]) : int(unique[-1]) + 1]  # a contiguous run: one slice
        else:
            block = array[unique]
        out[...] = block if len(unique) == len(inverse) and np.all(np.diff(inverse) == 1) else block[inverse]
        return out

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles, self._arrays, self._raw = {}, {}, {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"], state["_arrays"], state["_raw"] = {}, {}, {}
        return state
