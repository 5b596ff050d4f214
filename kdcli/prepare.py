"""`kdcli prepare`: raw download -> shard directory (scan, plan, write shards, manifest, dataset.json).

The work happens in `<out>.partial/` and is renamed to `<out>` only when complete, so a crash or a bad
file never leaves something that looks finished, and `--overwrite` replaces an old dataset only on success.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from kdcli import __version__
from kdcli.errors import KdcliError
from kdcli.shards.format import (
    DATASET_JSON,
    MANIFEST,
    PLAN_JSON,
    SHARD_DIR,
    SPLITS,
    DatasetMeta,
    atomic_write_bytes,
    atomic_write_json,
    content_hash,
    modality_key,
    shard_name,
)
from kdcli.shards.writer import ShardJob, write_all
from kdcli.sources import SOURCES
from kdcli.sources.base import Record


@dataclass
class PrepareOptions:
    source: str
    raw: Path
    out: Path
    size: int = 224
    workers: int = 1
    shard_size: int = 512
    compression: str | None = None
    resume: bool = False
    overwrite: bool = False
    source_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class PrepareResult:
    out: Path
    meta: DatasetMeta
    written: int
    reused: int
    notes: list[str]
    seconds: float


def plan_jobs(records: list[Record], shard_size: int) -> list[ShardJob]:
    groups: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for record in sorted(records, key=lambda r: r.id):
        groups[(record.split, modality_key(list(record.files)))].append(record)
    jobs = []
    for (split, key), members in sorted(groups.items()):
        for number, start in enumerate(range(0, len(members), shard_size)):
            jobs.append(ShardJob(shard_name(split, key.split("+"), number),
                                 tuple(members[start : start + shard_size])))
    return jobs


def _check_out(options: PrepareOptions) -> Path:
    out, staging = options.out, Path(str(options.out) + ".partial")
    if options.resume and options.overwrite:
        raise KdcliError("--resume and --overwrite exclude each other", hint="pick one")
    if out.exists() and not (options.overwrite or options.resume):
        raise KdcliError("output directory exists", path=out,
                         hint="pass --overwrite to replace it or --resume to finish it")
    if out.exists() and not (out / DATASET_JSON).is_file() and any(out.iterdir()):
        raise KdcliError("exists and is not a kdcli shard directory; refusing to replace it", path=out,
                         hint="choose another --out")
    if staging.exists() and not options.resume:
        shutil.rmtree(staging)
    return staging


def prepare(options: PrepareOptions, progress_factory=None) -> PrepareResult:
    started = time.perf_counter()
    staging = _check_out(options)
    if options.resume and (options.out / DATASET_JSON).is_file() and not staging.exists():
        meta = DatasetMeta.load(options.out)
        return PrepareResult(options.out, meta, 0, 0, ["already complete; nothing to do"], 0.0)
    source_cls = SOURCES.get(options.source)
    scan = source_cls(**options.source_options).scan(Path(options.raw))
    if not scan.records:
        raise KdcliError("no records found", path=options.raw)
    arguments = {
        "source": options.source, "raw": str(Path(options.raw).resolve()), "size": options.size,
        "shard_size": options.shard_size, "compression": options.compression,
        "source_options": options.source_options,
    }
    staging.mkdir(parents=True, exist_ok=True)
    plan_path = staging / PLAN_JSON
    if plan_path.is_file() and json.loads(plan_path.read_text()) != arguments:
        raise KdcliError("--resume with other arguments than the interrupted run", path=plan_path,
                         hint="rerun with the same arguments, or drop --resume to start over")
    atomic_write_json(plan_path, arguments)

    jobs = plan_jobs(scan.records, options.shard_size)
    shard_dir = staging / SHARD_DIR
    before = {p.name for p in shard_dir.glob("*.h5")} if shard_dir.is_dir() else set()
    progress = progress_factory(len(scan.records)) if progress_factory else (lambda n: None)
    digests = write_all(jobs, shard_dir, source_cls, options.source_options, options.size,
                        options.workers, options.compression, progress)
    reused = sum(1 for job in jobs if job.name in before)

    meta = _finish(staging, scan, jobs, digests, arguments)
    _swap_in(staging, options.out)
    return PrepareResult(options.out, meta, len(jobs) - reused, reused, scan.notes,
                         time.perf_counter() - started)


def _finish(staging: Path, scan, jobs: list[ShardJob], digests: dict[str, str], arguments: dict) -> DatasetMeta:
    rows = [
        (r.id, r.group, r.split, modality_key(list(r.files)), r.label, job.name, index)
        for job in jobs
        for index, r in enumerate(job.records)
    ]
    manifest = pl.DataFrame(rows, schema=[("id", pl.Utf8), ("group", pl.Utf8), ("split", pl.Utf8),
                                          ("modality", pl.Utf8), ("label", pl.Int64), ("shard", pl.Utf8),
                                          ("index", pl.Int64)], orient="row")
    tmp = staging / f".{MANIFEST}.tmp"
    manifest.write_parquet(tmp)
    atomic_write_bytes(staging / MANIFEST, tmp.read_bytes())
    tmp.unlink()

    counts: dict[str, dict[str, int]] = {}
    for record in scan.records:
        for modality in record.files:
            counts.setdefault(modality, Counter())[record.split] += 1
    size = arguments["size"]
    meta = DatasetMeta(
        source=arguments["source"],
        task=scan.task,
        classes=scan.classes,
        modalities={m: {"shape": [size, size, c], "dtype": "uint8"} for m, c in scan.modalities.items()},
        pairing=scan.pairing,
        counts={m: {s: int(c.get(s, 0)) for s in SPLITS} for m, c in counts.items()},
        prepare=arguments,
        extra=scan.extra,
        content_hash=content_hash(digests, rows),
        kdcli_version=__version__,
    )
    atomic_write_json(staging / DATASET_JSON, meta.to_json())
    (staging / PLAN_JSON).unlink(missing_ok=True)
    return meta


def _swap_in(staging: Path, out: Path) -> None:
    """Replace `out` by the finished staging folder; the old dataset goes only after the new one is in place."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{int(time.time())}")
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
