"""Write shards: one HDF5 file per job, built under a temporary name and renamed when complete.

A shard holds records of one split and one modality set, so every array is dense:
    /id            (N,) utf-8 strings
    /label         (N,) int64
    /<modality>    (N, H, W, C) uint8, chunked one sample per chunk (random access per sample)
    attrs: kdcli_schema, count, digest (sha256 of ids, labels and pixels), complete=1 (set last)
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from kdcli.errors import KdcliError
from kdcli.shards.format import SCHEMA_VERSION
from kdcli.sources.base import Record


@dataclass(frozen=True)
class ShardJob:
    name: str
    records: tuple[Record, ...]


def shard_is_complete(path: Path, job: ShardJob) -> str | None:
    """The shard's digest when it is finished and holds exactly the job's records, else None."""
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as handle:
            if not handle.attrs.get("complete") or int(handle.attrs["count"]) != len(job.records):
                return None
            ids = [i.decode() if isinstance(i, bytes) else i for i in handle["id"][:]]
            if ids != [r.id for r in job.records]:
                return None
            return str(handle.attrs["digest"])
    except (OSError, KeyError):
        return None


def write_shard(job: ShardJob, shard_dir: Path, source: Any, size: int, compression: str | None) -> str:
    """Decode the job's records with `source`, write the shard atomically, return its digest."""
    final = shard_dir / job.name
    tmp = shard_dir / f".{job.name}.{os.getpid()}.tmp"
    hasher = hashlib.sha256()
    try:
        with h5py.File(tmp, "w") as handle:
            count = len(job.records)
            handle.create_dataset("id", data=[r.id for r in job.records], dtype=h5py.string_dtype())
            labels = np.array([r.label for r in job.records], dtype=np.int64)
            handle.create_dataset("label", data=labels)
            hasher.update("\n".join(r.id for r in job.records).encode())
            hasher.update(labels.tobytes())
            datasets: dict[str, h5py.Dataset] = {}
            for index, record in enumerate(job.records):
                arrays = source.load(record, size)
                for modality in sorted(arrays):
                    array = np.ascontiguousarray(arrays[modality])
                    if modality not in datasets:
                        datasets[modality] = handle.create_dataset(
                            modality, shape=(count, *array.shape), dtype=array.dtype,
                            chunks=(1, *array.shape), compression=compression,
                        )
                    datasets[modality][index] = array
                    hasher.update(array.tobytes())
            digest = hasher.hexdigest()
            handle.attrs.update({"kdcli_schema": SCHEMA_VERSION, "count": count, "digest": digest})
            handle.attrs["complete"] = 1
        os.replace(tmp, final)
        return digest
    finally:
        tmp.unlink(missing_ok=True)


def _run_job(source_cls: type, options: dict, job: ShardJob, shard_dir: Path, size: int,
             compression: str | None) -> tuple[str, str]:
    return job.name, write_shard(job, shard_dir, source_cls(**options), size, compression)


def write_all(jobs: list[ShardJob], shard_dir: Path, source_cls: type, options: dict, size: int,
              workers: int, compression: str | None, progress) -> dict[str, str]:
    """Write every job not already complete; `progress(n_records)` is called as shards finish."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    digests: dict[str, str] = {}
    todo = []
    for job in jobs:
        digest = shard_is_complete(shard_dir / job.name, job)
        if digest:
            digests[job.name] = digest
            progress(len(job.records))
        else:
            todo.append(job)
    by_name = {job.name: job for job in todo}
    if workers <= 1:
        for job in todo:
            name, digest = _run_job(source_cls, options, job, shard_dir, size, compression)
            digests[name] = digest
            progress(len(job.records))
        return digests
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_run_job, source_cls, options, job, shard_dir, size, compression)
                   for job in todo]
        try:
            for future in as_completed(futures):
                name, digest = future.result()
                digests[name] = digest
                progress(len(by_name[name].records))
        except KdcliError:
            for future in futures:
                future.cancel()
            raise
    return digests
