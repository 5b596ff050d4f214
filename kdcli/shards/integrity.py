"""Is a shard directory still what `prepare` wrote? Checked every time a ShardStore opens, cheaply.

Each shard's digest (sha256 of its pixels, ids and labels, see writer.py) is recorded in its attrs, and
dataset.json's content_hash is made of every shard's digest plus every manifest row. prepare also writes
`fingerprints.json`: per shard (and for the manifest) its size, mtime (ns) and digest at the time the dataset was
published. On open:
    - a shard whose size and mtime still match its fingerprint is trusted to hold its recorded digest (a stat);
    - any other shard (touched, copied without times, edited in place) is re-hashed in full, once per process;
      a digest that differs from the recorded one refuses the dataset, naming the shard;
    - the digests and the manifest rows must give dataset.json's content_hash (an edited manifest, a swapped
      shard); recomputed whenever the manifest or a shard is not as published, and always by inspect --verify.
`kdcli inspect --verify` re-hashes every shard and records fresh fingerprints (after a copy, say), and
`evaluate` re-hashes the shards of the split it scores, so `data_hash_matches` is about the bytes it read.
fingerprints.json is not content: it is not hashed and differs between two otherwise identical prepares.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import polars as pl

from kdcli.errors import KdcliError
from kdcli.shards.format import MANIFEST, MANIFEST_COLUMNS, SHARD_DIR, atomic_write_json, content_hash

FINGERPRINTS = "fingerprints.json"
NON_PIXEL = ("id", "label", "record", "position")
BLOCK_BYTES = 8 * 1024 * 1024  # samples are read in blocks of about this size while hashing
REBUILD = "re-run `kdcli prepare` to rebuild it, or restore a copy that passes `kdcli inspect --verify`"

_verified: dict[tuple[str, int, int], str] = {}  # (shard path, size, mtime_ns) -> digest re-hashed in this process
_checked: dict[tuple, dict[str, str]] = {}  # a whole dataset's stat key -> its digests, found consistent
_noted: set[str] = set()


def _stat_key(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _strings(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else v for v in values]


def recompute_digest(path: Path) -> tuple[str, str]:
    """(recomputed, recorded) digest of one shard, in the writer's order: per sample each pixel array (sorted by
    name), then the ids and labels. Shards of kdcli <= 0.1 hashed the ids and labels first; either order matches."""
    try:
        with h5py.File(path, "r") as handle:
            recorded = str(handle.attrs.get("digest", ""))
            ids = _strings(handle["id"][:])
            head = "\n".join(ids).encode() + handle["label"][:].tobytes()
            arrays = [handle[name] for name in sorted(k for k in handle if k not in NON_PIXEL)]
            current = hashlib.sha256()
            _hash_pixels(current, arrays, len(ids))
            current.update(head)
            if current.hexdigest() == recorded:
                return recorded, recorded
            older = hashlib.sha256(head)
            _hash_pixels(older, arrays, len(ids))
            return (older.hexdigest() if older.hexdigest() == recorded else current.hexdigest()), recorded
    except (OSError, KeyError, ValueError) as exc:
        raise KdcliError(f"unreadable shard ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                         path=path, hint=REBUILD) from None


def _hash_pixels(hasher, arrays: list[h5py.Dataset], count: int) -> None:
    sample_bytes = sum(a.dtype.itemsize * max(1, int(a.size // max(1, a.shape[0]))) for a in arrays) or 1
    step = max(1, BLOCK_BYTES // sample_bytes)
    for start in range(0, count, step):
        blocks = [a[start : start + step] for a in arrays]
        for index in range(len(blocks[0]) if blocks else 0):
            for block in blocks:
                hasher.update(np.ascontiguousarray(block[index]))


def verified_digest(path: Path) -> str:
    """The shard's digest re-hashed from its bytes (once per process for an unchanged file); raises, naming the
    shard, when it differs from the digest the shard records."""
    key = (str(Path(path).resolve()), *_stat_key(path))
    if key not in _verified:
        digest, recorded = recompute_digest(path)
        if digest != recorded:
            raise KdcliError("shard content differs from its recorded digest (modified or damaged since prepare)",
                             path=path, hint=REBUILD)
        _verified[key] = digest
    return _verified[key]


def write_fingerprints(folder: Path, digests: dict[str, str], dataset_hash: str) -> None:
    """Record each shard's size, mtime and digest as published (prepare, merge, append, inspect --verify)."""
    shards = {}
    for name in sorted(digests):
        size, mtime = _stat_key(folder / SHARD_DIR / name)
        shards[name] = {"bytes": size, "mtime_ns": mtime, "digest": digests[name]}
    size, mtime = _stat_key(folder / MANIFEST)
    atomic_write_json(folder / FINGERPRINTS, {"content_hash": dataset_hash,
                                              "manifest": {"bytes": size, "mtime_ns": mtime}, "shards": shards})


def read_fingerprints(root: Path, dataset_hash: str) -> dict[str, Any] | None:
    """{"shards": {name: {bytes, mtime_ns, digest}}, "manifest": {bytes, mtime_ns}}, or None when absent,
    unreadable or written for other content (then every shard is re-hashed)."""
    try:
        payload = json.loads((root / FINGERPRINTS).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(payload, dict) or payload.get("content_hash") != dataset_hash \
            or not isinstance(payload.get("shards"), dict):
        return None
    return payload


def hashed_rows(manifest: pl.DataFrame) -> list[tuple]:
    """The manifest's hashed columns (derived ones such as `labelled` are not), as every writer wrote them."""
    if "task" not in manifest.columns:
        manifest = manifest.with_columns(pl.lit("").alias("task"))
    return manifest.select(MANIFEST_COLUMNS).rows()


def check_dataset(root: Path, manifest: pl.DataFrame, dataset_hash: str, rehash: set[str] | frozenset = frozenset(),
                  full: bool = False) -> dict[str, str]:
    """Refuse a dataset whose shards or manifest are not what dataset.json describes; returns shard -> digest.
    `rehash`: shards to re-hash whatever their fingerprint says (evaluate's split, inspect --verify's all);
    `full`: recompute the content hash from the manifest rows even when manifest and shards are as published
    (otherwise skipped then: 1-2 s for a manifest of 100k rows)."""
    root = Path(root)
    shards = sorted(set(manifest["shard"].to_list()))
    stats = []
    for name in shards:
        path = root / SHARD_DIR / name
        try:
            stats.append((name, *_stat_key(path)))
        except FileNotFoundError:
            raise KdcliError(f"shard listed in {MANIFEST} is missing", path=path, hint=REBUILD) from None
    fingerprints = read_fingerprints(root, dataset_hash)
    recorded = fingerprints["shards"] if fingerprints else None
    manifest_stat = _stat_or_none(root / MANIFEST)
    key = (str(root.resolve()), dataset_hash, manifest_stat, _stat_or_none(root / FINGERPRINTS), tuple(stats))
    if key in _checked and not rehash and not full:
        return _checked[key]
    digests, changed = {}, []
    for name, size, mtime in stats:
        entry = (recorded or {}).get(name) or {}
        if name not in rehash and (entry.get("bytes"), entry.get("mtime_ns")) == (size, mtime) and entry.get("digest"):
            digests[name] = str(entry["digest"])
            continue
        path = root / SHARD_DIR / name
        digest = verified_digest(path)
        if entry.get("digest") and digest != entry["digest"]:
            raise KdcliError("shard differs from the one prepare published (another digest than fingerprints.json "
                             "records)", path=path, hint=REBUILD)
        digests[name] = digest
        if name not in rehash:
            changed.append(name)
    manifest_as_published = fingerprints is not None and manifest_stat == tuple(
        (fingerprints.get("manifest") or {}).get(k) for k in ("bytes", "mtime_ns"))
    as_published = manifest_as_published and all(digests[n] == (recorded.get(n) or {}).get("digest") for n in shards)
    if (full or not as_published) and content_hash(digests, hashed_rows(manifest)) != dataset_hash:
        raise KdcliError(f"{MANIFEST} and the shards do not give dataset.json's content_hash (edited or mixed "
                         "with another dataset's files)", path=root / "dataset.json", hint=REBUILD)
    if changed and str(root) not in _noted:
        _noted.add(str(root))
        why = "has no fingerprints.json (an older kdcli's)" if recorded is None else \
            f"has {len(changed)} shard(s) whose size or time changed (copied?)"
        print(f"note: {root} {why}; their contents were re-hashed and match. `kdcli inspect --verify {root}` "
              "records them, so later runs need not re-hash", file=sys.stderr)
    _checked[key] = digests
    return digests


def _stat_or_none(path: Path) -> tuple[int, int] | None:
    try:
        return _stat_key(path)
    except OSError:
        return None


def record_fingerprints(root: Path, digests: dict[str, str], dataset_hash: str) -> bool:
    """After a full verification: fingerprints for the shards as they are now. False when the folder is read-only."""
    try:
        write_fingerprints(Path(root), digests, dataset_hash)
    except OSError:
        return False
    return True


def clear_process_cache() -> None:
    """Forget what this process verified (tests that corrupt a file between two opens)."""
    _verified.clear()
    _checked.clear()
    _noted.clear()


