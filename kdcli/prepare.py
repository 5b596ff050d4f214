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
from kdcli.errors import DiskFull, KdcliError, UsageError
from kdcli.locks import output_lock
from kdcli.shards.format import (
    DATASET_JSON,
    MANIFEST,
    MANIFEST_COLUMNS,
    PLAN_JSON,
    RECORDS_JSON,
    SHARD_DIR,
    SPLITS,
    DatasetMeta,
    atomic_write_json,
    content_hash,
    modality_key,
    shard_name,
)
from kdcli.shards.integrity import write_fingerprints
from kdcli.shards.quality import add, collect, warn
from kdcli.shards.writer import ShardJob, check_folder_arguments, write_all
from kdcli.sources import SOURCES
from kdcli.sources.base import Record
from kdcli.storage import atomic_write, remove_leftovers, replace_folder


@dataclass
class PrepareOptions:
    source: str
    raw: Path
    out: Path
    size: int = 224
    workers: int = 1
    shard_size: int = 0  # records per shard; 0: the source's default (a volume or slide is many samples)
    compression: str | None = None
    resume: bool = False
    overwrite: bool = False
    append: bool = False  # add to an existing dataset of the same source (a new task's set)
    part: tuple[int, int] | None = None  # (I, N): write only the I-th of N disjoint shares, for array jobs
    allow_leakage: bool = False  # keep patients with records in several splits (a data warning), not refuse
    source_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:  # before the raw folder is read or anything is written
        if isinstance(self.size, bool) or not isinstance(self.size, int) or not 8 <= self.size <= 8192:
            raise UsageError(f"--size {self.size}: the stored image side in pixels, 8 to 8192")
        if self.workers < 1:
            raise UsageError(f"--workers {self.workers}: at least 1 process")
        if self.shard_size < 0:
            raise UsageError(f"--shard-size {self.shard_size}: 0 (the source's default) or more records")


@dataclass
class PrepareResult:
    out: Path
    meta: DatasetMeta
    written: int
    reused: int
    notes: list[str]
    seconds: float
    warnings: dict[str, dict[str, Any]] = field(default_factory=dict)  # data warnings, as dataset.json holds them


def record_key(record: Record, modalities: dict | None = None) -> str:
    """The manifest's `modality` of a record: its image modalities (files holding targets, e.g. a label
    volume, are not modalities a model takes)."""
    return modality_key([m for m in record.files if modalities is None or m in modalities])


def plan_jobs(records: list[Record], shard_size: int, modalities: dict | None = None) -> list[ShardJob]:
    """Shards of one task, split and modality set each; unlabeled records (label -1) in shards of their own, as
    every sample of a shard has the same arrays and theirs may lack the label maps (BraTS). Datasets without
    unlabeled records get the very jobs, names and hence hashes they always had."""
    from kdcli.sources.base import UNLABELED

    groups: dict[tuple[str, str, str, bool], list[Record]] = defaultdict(list)
    for record in sorted(records, key=lambda r: r.id):
        groups[(record.task, record.split, record_key(record, modalities), record.label == UNLABELED)].append(record)
    jobs = []
    for (_, split, key, unlabeled), members in sorted(groups.items()):
        prefix = f"{members[0].task}-" if members[0].task else ""  # sets appended later never collide
        for number, start in enumerate(range(0, len(members), shard_size)):
            jobs.append(ShardJob(prefix + shard_name(split, key.split("+"), number, unlabeled),
                                 tuple(members[start : start + shard_size])))
    return jobs


def _final_path(value: Any, staging: Path, out: Path) -> Any:
    """Source options pointing into the staging folder (camelyon's thumbnails) are recorded where they end up."""
    if isinstance(value, str) and value.startswith(str(staging)):
        return str(out) + value[len(str(staging)) :]
    return value


def _check_out(options: PrepareOptions, appending: bool = False) -> Path:
    out, staging = options.out, Path(str(options.out) + ".partial")
    if options.resume and options.overwrite:
        raise KdcliError("--resume and --overwrite exclude each other", hint="pick one")
    if out.exists() and not out.is_dir():
        raise KdcliError("is a file, not a folder", path=out, hint="choose another --out")
    if out.exists() and not (options.overwrite or options.resume or appending):
        raise KdcliError("output directory exists", path=out,
                         hint="pass --overwrite to replace it or --resume to finish it")
    if out.exists() and not (out / DATASET_JSON).is_file() and any(out.iterdir()):
        raise KdcliError("exists and is not a kdcli shard directory; refusing to replace it", path=out,
                         hint="choose another --out")
    if options.part:
        index, count = options.part
        if not 1 <= index <= count:
            raise KdcliError(f"--part {index}/{count}: I must be between 1 and N")
        return staging  # other parts may be writing into the same staging folder right now
    # the lock is ours and no part is live: whatever killed runs left (their staging folder, half-written files)
    # belongs to no one
    if staging.exists() and not options.resume:
        shutil.rmtree(staging)
    for folder in (staging, out if appending else None):
        if folder is not None:
            remove_temporaries(folder)
    return staging


DISK_FULL_HINT = "free some space, then rerun with --resume (finished shards are kept)"


def output_lock_for(options: PrepareOptions):
    """The lock of --out: a plain run excludes every other run and the `--part` runs writing its staging
    folder; a part excludes the same part elsewhere and a plain run (or merge)."""
    command = f"kdcli prepare {options.source} --out {options.out} --size {options.size}"
    if options.part:
        index, count = options.part
        return output_lock(options.out, f"{command} --part {index}/{count}", tag=f"part-{index}-of-{count}",
                           exclusive_of=("",))
    return output_lock(options.out, command, exclusive_of=("part-*",))


def remove_temporaries(folder: Path) -> None:
    """`.*.tmp` files killed runs left in a dataset or staging folder (manifest, JSON, shards, parts)."""
    for sub in (folder, folder / SHARD_DIR, folder / PARTS):
        if sub.is_dir():
            for tmp in sub.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)


def prepare(options: PrepareOptions, progress_factory=None) -> PrepareResult:
    """Hold --out's lock for the whole run: two runs into one --out would mix their shards."""
    with output_lock_for(options):
        try:
            return _prepare(options, progress_factory)
        except DiskFull as exc:
            raise DiskFull(exc.path, DISK_FULL_HINT) from None


def _prepare(options: PrepareOptions, progress_factory=None) -> PrepareResult:
    started = time.perf_counter()
    if not options.part:  # a dataset replaced by a killed run: deleted, or put back if the run died mid-swap
        remove_leftovers(options.out, ("old",))
    appending = options.append and (options.out / DATASET_JSON).is_file()
    if options.part and appending:
        raise KdcliError("--part cannot add to an existing dataset", path=options.out,
                         hint="prepare the new set without --part, or into a new --out")
    staging = _check_out(options, appending)
    if options.resume and not appending and (options.out / DATASET_JSON).is_file() and not staging.exists():
        meta = DatasetMeta.load(options.out)
        return PrepareResult(options.out, meta, 0, 0, ["already complete; nothing to do"], 0.0)
    source_cls = SOURCES.get(options.source)
    options.shard_size = options.shard_size or source_cls.records_per_shard
    with collect() as scan_warnings:
        scan = source_cls(**options.source_options).scan(Path(options.raw))
        if not scan.records:
            raise KdcliError("no records found", path=options.raw)
        check_unlabeled(scan.records, options.raw)
        check_leakage(scan.records, options.raw, options.allow_leakage)
    add(scan.warnings, scan_warnings)
    arguments = {
        "source": options.source, "raw": str(Path(options.raw).resolve()), "size": options.size,
        "shard_size": options.shard_size, "compression": options.compression,
        "source_options": {k: _final_path(v, staging, options.out) for k, v in options.source_options.items()
                           if k != "grades"},
        **({"allow_leakage": True} if options.allow_leakage else {}),
    }
    kept = _existing_rows(options, scan) if appending else []
    staging.mkdir(parents=True, exist_ok=True)
    plan_path = staging / PLAN_JSON
    stamp = json.dumps(arguments, sort_keys=True)  # recorded in every shard too, for a folder that lost its plan
    if plan_path.is_file() and json.loads(plan_path.read_text()) != arguments:
        raise KdcliError("other arguments than the run that started this folder", path=plan_path,
                         hint="rerun with the same arguments, or drop --resume to start over")
    if not plan_path.is_file():
        check_folder_arguments(staging / SHARD_DIR, stamp)
    atomic_write_json(plan_path, arguments)

    jobs = plan_jobs(scan.records, options.shard_size, scan.modalities)
    if options.part:
        index, count = options.part
        jobs = jobs[index - 1 :: count]
    shard_dir = staging / SHARD_DIR
    before = {p.name for p in shard_dir.glob("*.h5")} if shard_dir.is_dir() else set()
    progress = progress_factory(len(scan.records)) if progress_factory else (lambda n: None)
    results = write_all(jobs, shard_dir, source_cls, options.source_options, options.size,
                        options.workers, options.compression, progress, stamp)
    reused = sum(1 for job in jobs if job.name in before)
    by_id = {r.id: r for r in scan.records}
    rows = [
        (sample, by_id[record].group, by_id[record].split, record_key(by_id[record], scan.modalities), label, job.name,
         index, by_id[record].task, record, position)
        for job in jobs
        for sample, record, label, index, position in results[job.name].rows
    ]
    digests = {name: result.digest for name, result in results.items()}
    infos = {record: info for result in results.values() for record, info in result.records.items() if info}
    skipped = {record: info["skipped"] for record, info in infos.items() if "skipped" in info}
    scan.notes.extend(f"skipped {record}: {reason}" for record, reason in sorted(skipped.items()))
    scan_only = json.loads(json.dumps(scan.warnings))  # a part records these apart from its records' own
    scan.warnings = record_warnings(scan.warnings, infos)
    if not rows:
        raise KdcliError("every record was skipped; nothing to write", path=options.raw)
    if options.part:
        _write_part(staging, options.part, scan, rows, digests, infos, scan_only)
        return PrepareResult(options.out, None, len(jobs) - reused, reused, scan.notes,
                             time.perf_counter() - started, scan.warnings)
    if appending:
        meta = _append(staging, options.out, scan, rows, kept, digests, arguments)
    else:
        meta = _finish(staging, scan, rows, digests, arguments, scan.tasks, records=infos)
        _swap_in(staging, options.out)
    return PrepareResult(options.out, meta, len(jobs) - reused, reused, scan.notes,
                         time.perf_counter() - started, scan.warnings)


PARTS = "parts"


def record_warnings(scan_warnings: dict, infos: dict[str, dict]) -> dict:
    """The scan's data warnings plus those met reading each record (kept in its notes), in record order."""
    found = json.loads(json.dumps(scan_warnings))
    for record in sorted(infos):
        add(found, infos[record].get("warnings"))
    return found


def check_leakage(records: list, raw: Path, allow: bool) -> None:
    """A patient (a record's group) with labelled records in two splits leaks what the model is judged on into
    what it learns from: refused, unless --allow-leakage keeps it as a counted data warning."""
    from kdcli.sources.base import UNLABELED

    splits_of: dict[str, set[str]] = defaultdict(set)
    for record in records:
        if record.label != UNLABELED:  # unlabeled records have their own rule (check_unlabeled)
            splits_of[record.group].add(record.split)
    leaked = sorted(group for group, splits in splits_of.items() if len(splits) > 1)
    if not leaked:
        return
    first = f"patient {leaked[0]!r} has records in {' and '.join(s for s in SPLITS if s in splits_of[leaked[0]])}"
    if not allow:
        more = f" (and {len(leaked) - 1} more patient(s))" if len(leaked) > 1 else ""
        raise KdcliError(f"patient leakage across splits: {first}{more}", path=raw,
                         hint="fix the split lists so each patient sits in one split, or pass --allow-leakage to "
                              "keep them (recorded in dataset.json)")
    for group in leaked:
        warn("patient_leakage", "patients with records in several splits, kept (--allow-leakage)",
             f"{group} ({'+'.join(s for s in SPLITS if s in splits_of[group])})")


def check_unlabeled(records: list, raw: Path) -> None:
    """Unlabeled records only train, and never belong to a patient of dev or test (that patient's other records
    would leak into what the student is judged on)."""
    from kdcli.sources.base import UNLABELED

    held_out = {r.group: r.split for r in records if r.split != "train"}
    for record in records:
        if record.label != UNLABELED:
            continue
        if record.split != "train":
            raise KdcliError(f"unlabeled record {record.id!r} is in split {record.split!r}", path=raw,
                             hint="unlabeled cases can only train; list them with the training data")
        if record.group in held_out:
            raise KdcliError(f"unlabeled record {record.id!r} belongs to patient {record.group!r} of split "
                             f"{held_out[record.group]!r}", path=raw,
                             hint="drop it, or move that patient's labelled records to train")


def _write_part(staging: Path, part: tuple[int, int], scan, rows: list[tuple], digests: dict[str, str],
                infos: dict[str, dict], scan_warnings: dict) -> None:
    """A finished part leaves its manifest rows, digests and the scan's metadata for `prepare merge`."""
    index, count = part
    atomic_write_json(staging / PARTS / f"part-{index}-of-{count}.json", {
        "part": index, "of": count, "rows": rows, "digests": digests, "records": infos,
        "scan": {"task": scan.task, "classes": scan.classes, "modalities": scan.modalities, "pairing": scan.pairing,
                 "tasks": scan.tasks, "extra": scan.extra, "arrays": scan.arrays, "warnings": scan_warnings},
    })


def merge_parts(out: Path, overwrite: bool = False) -> DatasetMeta:
    """Join the parts written by `prepare ... --part I/N` into one dataset with one manifest and hash (under
    --out's lock, refused while a part still runs)."""
    with output_lock(out, f"kdcli prepare merge {out}", exclusive_of=("part-*",)):
        try:
            return _merge_parts(out, overwrite)
        except DiskFull as exc:
            raise DiskFull(exc.path, "free some space, then rerun the merge (the parts are kept)") from None


def _merge_parts(out: Path, overwrite: bool = False) -> DatasetMeta:
    from kdcli.sources.base import Scan

    remove_leftovers(out, ("old",))
    staging = Path(str(out) + ".partial")
    found = sorted((staging / PARTS).glob("part-*-of-*.json")) if (staging / PARTS).is_dir() else []
    if not found:
        raise KdcliError("no finished parts to merge", path=staging, hint="run `kdcli prepare ... --part I/N` first")
    parts = [json.loads(path.read_text()) for path in found]
    count = parts[0]["of"]
    missing = sorted(set(range(1, count + 1)) - {p["part"] for p in parts if p["of"] == count})
    if missing or any(p["of"] != count for p in parts):
        raise KdcliError(f"parts {', '.join(map(str, missing)) or '(of another N)'} of {count} are missing or differ",
                         path=staging / PARTS, hint="finish every part with the same N, then merge")
    if out.exists() and not overwrite:
        raise KdcliError("output directory exists", path=out, hint="pass --overwrite to replace it")
    rows = [tuple(row) for part in parts for row in part["rows"]]
    digests = {name: digest for part in parts for name, digest in part["digests"].items()}
    arguments = json.loads((staging / PLAN_JSON).read_text())
    infos = {record: info for part in parts for record, info in part.get("records", {}).items()}
    scan = Scan(records=[], **parts[0]["scan"])
    scan.warnings = record_warnings(scan.warnings, infos)
    meta = _finish(staging, scan, rows, digests, arguments, parts[0]["scan"]["tasks"], records=infos)
    shutil.rmtree(staging / PARTS)
    remove_temporaries(staging)
    _swap_in(staging, out)
    return meta


def _existing_rows(options: PrepareOptions, scan) -> list[tuple]:
    """Rows of the dataset being appended to that stay; refuses a task already there (unless --overwrite) and
    images that would sit in two sets."""
    existing = DatasetMeta.load(options.out)
    if existing.source != options.source:
        raise KdcliError(f"holds a {existing.source!r} dataset; cannot add {options.source!r} data", path=options.out,
                         hint="choose another --out")
    if existing.modalities and any(existing.modalities[m]["shape"][0] != options.size for m in existing.modalities):
        raise KdcliError("holds images of another --size", path=options.out,
                         hint=f"prepare with --size {next(iter(existing.modalities.values()))['shape'][0]}")
    manifest = pl.read_parquet(options.out / MANIFEST)
    new_tasks = set(scan.tasks)
    clash = new_tasks & set(existing.tasks)
    if clash and not options.overwrite:
        raise KdcliError(f"already holds task {', '.join(sorted(clash))}", path=options.out,
                         hint="pass --overwrite to replace that task's samples")
    kept = manifest.filter(~pl.col("task").is_in(list(new_tasks)))
    names = {i.split(":", 1)[-1]: t for i, t in zip(kept["id"], kept["task"], strict=True)}
    for record in scan.records:
        name = record.id.split(":", 1)[-1]
        if name in names:
            raise KdcliError(f"image {name!r} is already in the {names[name]!r} set", path=options.raw,
                             hint="an image may belong to one set only; remove it from one of the label files")
    return _full_rows(kept)


def _full_rows(manifest: pl.DataFrame) -> list[tuple]:
    """Manifest rows with every column of this schema (manifests of kdcli <= 0.1 lack record and position)."""
    if "record" not in manifest.columns:
        manifest = manifest.with_columns(pl.col("id").alias("record"), pl.lit(-1, pl.Int64).alias("position"))
    return manifest.select(MANIFEST_COLUMNS).rows()


def _append(staging: Path, out: Path, scan, rows: list[tuple], kept: list[tuple], digests: dict[str, str],
            arguments: dict) -> DatasetMeta:
    """Move the new shards in, then swap manifest and dataset.json (each atomic); old shards of a replaced task go
    last, so a crash at any point leaves the previous dataset readable."""
    import h5py

    existing = DatasetMeta.load(out)
    kept_shards = {row[5] for row in kept}
    for name in kept_shards:
        with h5py.File(out / SHARD_DIR / name, "r") as handle:
            digests[name] = str(handle.attrs["digest"])
    tasks = {k: v for k, v in existing.tasks.items() if k not in scan.tasks} | scan.tasks
    for shard in sorted((staging / SHARD_DIR).glob("*.h5")):
        shard.replace(out / SHARD_DIR / shard.name)
    extra = {**existing.extra, "prepare_runs": [*existing.extra.get("prepare_runs", [existing.prepare]), arguments]}
    scan.warnings = add(json.loads(json.dumps(existing.data_warnings)), scan.warnings)  # the earlier sets' too
    meta = _finish(out, scan, kept + rows, digests, existing.prepare, tasks, extra)
    referenced = {row[5] for row in kept + rows}
    for shard in (out / SHARD_DIR).glob("*.h5"):
        if shard.name not in referenced:
            shard.unlink()
    shutil.rmtree(staging, ignore_errors=True)
    return meta


def _finish(folder: Path, scan, rows: list[tuple], digests: dict[str, str], arguments: dict, tasks: dict,
            extra: dict | None = None, records: dict[str, dict] | None = None) -> DatasetMeta:
    manifest = pl.DataFrame(rows, schema=[("id", pl.Utf8), ("group", pl.Utf8), ("split", pl.Utf8),
                                          ("modality", pl.Utf8), ("label", pl.Int64), ("shard", pl.Utf8),
                                          ("index", pl.Int64), ("task", pl.Utf8), ("record", pl.Utf8),
                                          ("position", pl.Int64)], orient="row")
    manifest = manifest.with_columns((pl.col("label") >= 0).alias("labelled"))  # derived: not hashed
    atomic_write(folder / MANIFEST, manifest.write_parquet)
    if records:
        atomic_write_json(folder / RECORDS_JSON, records)
    counts: dict[str, Counter] = {}
    unlabeled: dict[str, Counter] = {}
    for _, _, split, modality, label, *_ in rows:
        for name in modality.split("+"):
            counts.setdefault(name, Counter())[split] += 1
            if label < 0:
                unlabeled.setdefault(name, Counter())[split] += 1
    size = arguments["size"]
    shard_digests = {r[5]: digests[r[5]] for r in rows}
    meta = DatasetMeta(
        source=arguments["source"],
        task=scan.task,
        classes=scan.classes,
        modalities={m: {"shape": [size, size, c], "dtype": scan.arrays.get(m, {}).get("dtype", "uint8")}
                    for m, c in scan.modalities.items()},
        targets={name: {"shape": spec.get("shape") or [size, size, spec["channels"]],
                        "dtype": spec.get("dtype", "uint8"),
                        **{k: v for k, v in spec.items() if k not in ("channels", "dtype", "shape")}}
                 for name, spec in scan.arrays.items() if name not in scan.modalities},
        pairing=scan.pairing,
        tasks=tasks,
        counts={m: {s: int(c.get(s, 0)) for s in SPLITS} for m, c in counts.items()},
        unlabeled={m: {s: int(c.get(s, 0)) for s in SPLITS} for m, c in unlabeled.items()},
        prepare=arguments,
        extra=extra if extra is not None else scan.extra,
        data_warnings=scan.warnings,
        content_hash=content_hash(shard_digests, rows),
        kdcli_version=__version__,
    )
    write_fingerprints(folder, shard_digests, meta.content_hash)  # before dataset.json, which publishes the set
    atomic_write_json(folder / DATASET_JSON, meta.to_json())
    (folder / PLAN_JSON).unlink(missing_ok=True)
    return meta


def _swap_in(staging: Path, out: Path) -> None:
    """Replace `out` by the finished staging folder; the old dataset goes only after the new one is in place."""
    replace_folder(staging, out)
