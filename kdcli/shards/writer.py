"""Write shards: one HDF5 file per job, built under a temporary name and renamed when complete.

A shard holds records of one split and one modality set, so every array is dense:
    /id            (N,) utf-8 strings, one per sample
    /record        (N,) utf-8: the record each sample came from (== id, unless a record is many samples)
    /position      (N,) int64: slice index / patch number inside the record, -1 for whole records
    /label         (N,) int64
    /<array>       (N, H, W, C) uint8 or float16, chunked one sample per chunk (random access per sample)
    attrs: kdcli_schema, count, digest (sha256 of ids, labels and pixels), records (JSON: record id -> what the
           source remembered about it, e.g. a volume's grid), arguments (JSON: the prepare arguments it was
           written with; `--resume` refuses a shard of other arguments), complete=1 (set last)
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from kdcli.errors import KdcliError
from kdcli.shards.format import SCHEMA_VERSION
from kdcli.shards.quality import collect
from kdcli.shards.record import Record
from kdcli.storage import new_h5

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


class OtherArguments(KdcliError):
    """A finished shard of a `.partial` folder was written by a run with other arguments."""


def _differences(recorded: dict, wanted: dict) -> str:
    keys = sorted(set(recorded) | set(wanted), key=str)
    return ", ".join(f"{key} {recorded.get(key)!r} there, {wanted.get(key)!r} now"
                     for key in keys if recorded.get(key) != wanted.get(key))


def check_arguments(handle: h5py.File, stamp: str | None, path: Path) -> bool:
    """True when the shard was written with the run's arguments `stamp` (JSON), False when it records none
    (kdcli <= 0.2: rewritten, never trusted); a shard of other arguments is refused."""
    recorded = handle.attrs.get("arguments")
    if stamp is None:
        return True
    if recorded is None:
        return False
    if json.loads(recorded) != json.loads(stamp):
        raise OtherArguments(f"written with other arguments ({_differences(json.loads(recorded), json.loads(stamp))})",
                             path=path, hint="rerun with the arguments that started this folder, or drop --resume "
                                             "to start over")
    return True


def check_folder_arguments(shard_dir: Path, stamp: str) -> None:
    """Refuse a folder holding finished shards of other arguments (before this run records its plan there)."""
    for path in sorted(shard_dir.glob("*.h5")) if shard_dir.is_dir() else []:
        try:
            with h5py.File(path, "r") as handle:
                if handle.attrs.get("complete"):
                    check_arguments(handle, stamp, path)
        except OSError:  # unreadable: rewritten like any unfinished shard
            continue


def read_result(path: Path, job: ShardJob, stamp: str | None = None) -> ShardResult | None:
    """The finished shard's result when it holds exactly the job's records and was written with the run's
    arguments (`stamp`, JSON), else None (to be rewritten); a shard of other arguments is refused."""
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as handle:
            if not handle.attrs.get("complete") or not check_arguments(handle, stamp, path):
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


def shard_is_complete(path: Path, job: ShardJob, stamp: str | None = None) -> str | None:
    """The shard's digest when it is finished and holds exactly the job's records, else None."""
    result = read_result(path, job, stamp)
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


def temporary_name(shard_dir: Path, name: str) -> Path:
    return shard_dir / f".{name}.{os.getpid()}.tmp"


def remove_shard_temporaries(shard_dir: Path, names: list[str]) -> None:
    """Half-written shards of killed runs (`.<name>.<pid>.tmp`). Only for shards this run owns, under its lock:
    the jobs of other `--part` runs may be being written right now."""
    for name in names:
        for tmp in shard_dir.glob(f".{glob.escape(name)}.*.tmp"):
            tmp.unlink(missing_ok=True)


def write_shard(job: ShardJob, shard_dir: Path, source: Any, size: int, compression: str | None,
                stamp: str | None = None) -> ShardResult:
    """Read the job's records with `source`, write the shard atomically, return what it holds. `stamp`: the
    run's arguments (JSON), recorded so that a later `--resume` can tell whose shard it is."""
    final = shard_dir / job.name
    tmp = temporary_name(shard_dir, job.name)
    hasher = hashlib.sha256()
    ids, record_ids, labels, positions = [], [], [], []
    notes: dict[str, dict[str, Any]] = {}
    try:
        with new_h5(tmp, final) as handle:
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
                                 "records": json.dumps(notes), **({"arguments": stamp} if stamp else {})})
            handle.attrs["complete"] = 1
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    rows = [(i, r, lab, n, p) for n, (i, r, lab, p) in enumerate(zip(ids, record_ids, labels, positions, strict=True))]
    return ShardResult(job.name, digest, rows, notes)


def _run_job(source_cls: type, options: dict, job: ShardJob, shard_dir: Path, size: int,
             compression: str | None, stamp: str | None = None) -> ShardResult:
    return write_shard(job, shard_dir, source_cls(**options), size, compression, stamp)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int) -> None:
    """Worker initializer: a worker exits when the prepare process that started it dies, however it dies
    (kill -9 included: the pool's own shutdown never runs then, and its workers would write on forever).

    Linux: prctl(PR_SET_PDEATHSIG, SIGKILL) has the kernel kill the worker the moment its parent exits, with no
    polling and no thread. Elsewhere (or where prctl fails) a daemon thread checks once a second that the parent
    is still there. Either way a worker whose parent is already gone exits at once."""
    if not _kill_me_with_parent():
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="kdcli-parent-watch", daemon=True).start()
    if os.getppid() != parent:  # it died before the signal was armed (we were reparented)
        os._exit(1)


def _kill_me_with_parent() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        import signal

        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def write_all(jobs: list[ShardJob], shard_dir: Path, source_cls: type, options: dict, size: int,
              workers: int, compression: str | None, progress, stamp: str | None = None) -> dict[str, ShardResult]:
    """Write every job not already complete; `progress(n_records)` is called as shards finish. `stamp`: the run's
    arguments (JSON): recorded in each shard, and a finished shard of other arguments is refused."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    remove_shard_temporaries(shard_dir, [job.name for job in jobs])
    results: dict[str, ShardResult] = {}
    todo = []
    for job in jobs:
        result = read_result(shard_dir / job.name, job, stamp)
        if result:
            results[job.name] = result
            progress(len(job.records))
        else:
            todo.append(job)
    by_name = {job.name: job for job in todo}
    if workers <= 1:
        for job in todo:
            results[job.name] = _run_job(source_cls, options, job, shard_dir, size, compression, stamp)
            progress(len(job.records))
        return results
    try:
        with ProcessPoolExecutor(max_workers=workers, initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
            futures = [pool.submit(_run_job, source_cls, options, job, shard_dir, size, compression, stamp)
                       for job in todo]
            try:
                for future in as_completed(futures):
                    result = future.result()
                    results[result.name] = result
                    progress(len(by_name[result.name].records))
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    except BaseException:
        # the pool is shut down: no worker writes any more, and one that died mid-shard left its temporary file
        remove_shard_temporaries(shard_dir, list(by_name))
        raise
    return results
