"""Write shards: one HDF5 file per job, built under a temporary name and renamed when complete.

A shard holds records of one split and one modality set, so every array is dense:
    /id            (N,) utf-8 strings, one per sample
    /record        (N,) utf-8: the record each sample came from (== id, unless a record is many samples)
    /position      (N,) int64: slice index / patch number inside the record, -1 for whole records
    /label         (N,) int64
    /<array>       (N, H, W, C) uint8 or float16, chunked one sample per chunk (random access per sample)
    attrs: kdcli_schema, count, digest (sha256 of ids, labels and pixels), records (JSON: record id -> what the
           source remembered about it, e.g. a volume's grid), complete=1 (set last)
"""

from __future__ import annotations

import hashlib
import json
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
from kdcli.sources.quality import collect

ShardRow = tuple[str, str, int, int, int]  # sample id, record id, label, index in shard, position


@dataclass(frozen=True)
class ShardJob:
    name: str
    records: tuple[Record, ...]


@dataclass
class ShardResult:
    name: str
    digest: str
    rows: list[ShardRow]
    records: dict[str, dict[str, Any]]  # record id -> the source's notes on it


def _strings(dataset: h5py.Dataset) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else v for v in dataset[:]]


def read_result(path: Path, job: ShardJob) -> ShardResult | None:
    """The finished shard's result when it holds exactly the job's records, else None (to be rewritten)."""
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as handle:
            if not handle.attrs.get("complete"):
                return None
            records = json.loads(handle.attrs.get("records", "{}"))
            ids = _strings(handle["id"])
            record_ids = _strings(handle["record"]) if "record" in handle else ids
            held = list(records) if records else list(dict.fromkeys(record_ids))  # shards of kdcli <= 0.1 lack attrs
            if held != [r.id for r in job.records]:
                return None
            positions = handle["position"][:] if "position" in handle else np.full(len(ids), -1)
            labels = handle["label"][:]
            rows = [(i, r, int(lab), n, int(p)) for n, (i, r, lab, p) in
                    enumerate(zip(ids, record_ids, labels, positions, strict=True))]
            return ShardResult(path.name, str(handle.attrs["digest"]), rows, records)
    except (OSError, KeyError, ValueError):
        return None


def shard_is_complete(path: Path, job: ShardJob) -> str | None:
    """The shard's digest when it is finished and holds exactly the job's records, else None."""
    result = read_result(path, job)
    return result.digest if result else None


class _Appender:
    """Per-array resizable datasets: a record's sample count is known only once it is read."""

    def __init__(self, handle: h5py.File, compression: str | None):
        self.handle, self.compression, self.count = handle, compression, 0
        self.datasets: dict[str, h5py.Dataset] = {}

    def add(self, arrays: dict[str, np.ndarray], hasher) -> None:
        for name in sorted(arrays):
            array = np.ascontiguousarray(arrays[name])
            dataset = self.datasets.get(name)
            if dataset is None:
                dataset = self.datasets[name] = self.handle.create_dataset(
                    name, shape=(0, *array.shape), maxshape=(None, *array.shape), dtype=array.dtype,
                    chunks=(1, *array.shape), compression=self.compression)
            if dataset.shape[1:] != array.shape:
                raise KdcliError(f"array {name!r} has shape {array.shape}, earlier samples {dataset.shape[1:]}")
            dataset.resize(self.count + 1, axis=0)
            dataset[self.count] = array
            hasher.update(array.tobytes())
        self.count += 1


def write_shard(job: ShardJob, shard_dir: Path, source: Any, size: int, compression: str | None) -> ShardResult:
    """Read the job's records with `source`, write the shard atomically, return what it holds."""
    final = shard_dir / job.name
    tmp = shard_dir / f".{job.name}.{os.getpid()}.tmp"
    hasher = hashlib.sha256()
    ids, record_ids, labels, positions = [], [], [], []
    notes: dict[str, dict[str, Any]] = {}
    try:
        with h5py.File(tmp, "w") as handle:
            appender = _Appender(handle, compression)
            for record in job.records:
                with collect() as warnings:  # data warnings met reading this record travel in its notes
                    info, samples = source.read(record, size)
                    for sample in samples:
                        appender.add(sample.arrays, hasher)
                        ids.append(sample.id)
                        record_ids.append(record.id)
                        labels.append(sample.label)
                        positions.append(sample.position)
                notes[record.id] = {**info, "warnings": warnings} if warnings else info
            label_array = np.array(labels, dtype=np.int64)
            handle.create_dataset("id", data=ids, dtype=h5py.string_dtype())
            handle.create_dataset("record", data=record_ids, dtype=h5py.string_dtype())
            handle.create_dataset("position", data=np.array(positions, dtype=np.int64))
            handle.create_dataset("label", data=label_array)
            hasher.update("\n".join(ids).encode())
            hasher.update(label_array.tobytes())
            digest = hasher.hexdigest()
            handle.attrs.update({"kdcli_schema": SCHEMA_VERSION, "count": len(ids), "digest": digest,
                                 "records": json.dumps(notes)})
            handle.attrs["complete"] = 1
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    rows = [(i, r, lab, n, p) for n, (i, r, lab, p) in enumerate(zip(ids, record_ids, labels, positions, strict=True))]
    return ShardResult(job.name, digest, rows, notes)


def _run_job(source_cls: type, options: dict, job: ShardJob, shard_dir: Path, size: int,
             compression: str | None) -> ShardResult:
    return write_shard(job, shard_dir, source_cls(**options), size, compression)


def write_all(jobs: list[ShardJob], shard_dir: Path, source_cls: type, options: dict, size: int,
              workers: int, compression: str | None, progress) -> dict[str, ShardResult]:
    """Write every job not already complete; `progress(n_records)` is called as shards finish."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, ShardResult] = {}
    todo = []
    for job in jobs:
        result = read_result(shard_dir / job.name, job)
        if result:
            results[job.name] = result
            progress(len(job.records))
        else:
            todo.append(job)
    by_name = {job.name: job for job in todo}
    if workers <= 1:
        for job in todo:
            results[job.name] = _run_job(source_cls, options, job, shard_dir, size, compression)
            progress(len(job.records))
        return results
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_run_job, source_cls, options, job, shard_dir, size, compression)
                   for job in todo]
        try:
            for future in as_completed(futures):
                result = future.result()
                results[result.name] = result
                progress(len(by_name[result.name].records))
        except KdcliError:
            for future in futures:
                future.cancel()
            raise
    return results
