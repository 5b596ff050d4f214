"""What sources share for splitting records: `--ratios` parsing and seeds that agree across processes."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kdcli.errors import UsageError


def stable_seed(*parts: object) -> int:
    """A seed that is the same in every process (Python's hash() is salted)."""
    return int.from_bytes(hashlib.sha256("\0".join(map(str, parts)).encode()).digest()[:8], "little")


RATIO_TOLERANCE = 1e-6


def parse_ratios(value: Any, example: str = "0.7,0.1,0.2") -> tuple[float, float, float]:
    """`train,dev,test` fractions that sum to 1. Another sum is refused, not normalised: 0.7,0.1,0.1 is more
    likely a typo than a wish for 78/11/11 (the error shows what normalising would give)."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        ratios = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise UsageError(f"--ratios {value!r}: expected three numbers train,dev,test like {example}") from None
    if len(ratios) != 3 or not all(math.isfinite(r) and r >= 0 for r in ratios) or sum(ratios) <= 0:
        raise UsageError(f"--ratios {value!r}: expected three non-negative numbers train,dev,test like {example}")
    total = sum(ratios)
    if abs(total - 1.0) > RATIO_TOLERANCE:
        scaled = ",".join(f"{r / total:.4g}" for r in ratios)
        raise UsageError(f"--ratios {value!r} sums to {total:g}, not 1: give fractions of the whole, e.g. {scaled}")
    return ratios[0] / total, ratios[1] / total, ratios[2] / total


SPLIT_ALIASES = {"train": "train", "training": "train", "dev": "dev", "val": "dev", "valid": "dev",
                 "validation": "dev", "test": "test", "testing": "test"}


def read_split_file(path: Path, noun: str, id_columns: tuple[str, ...],
                    key: Callable[[str], str] = str.strip) -> dict[str, str]:
    """A user's or a phantom's fixed split: id -> train | dev | test, from a JSON {"train": [ids], "dev": [...],
    "test": [...]} or a CSV with a `split` column and the first of `id_columns` present (case-insensitive).
    val/validation mean dev. `noun` names an id in the messages ("case", "image", "slide"); `key` is how the
    source compares ids. One line, naming the file and the row or list, for anything else."""
    from kdcli.errors import KdcliError

    path = Path(path)
    if not path.is_file():
        raise KdcliError("splits file not found", path=path, hint="pass --splits with a CSV or JSON file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise KdcliError(f"cannot read ({exc.strerror or exc})", path=path) from None
    except UnicodeDecodeError:
        from kdcli.sources.text import decode_error

        raise decode_error(path) from None
    entries: list[tuple[str, str, str]] = []  # id, split as written, where
    if path.suffix.lower() == ".json":
        try:
            payload = json.loads(text)
        except ValueError as exc:
            raise KdcliError(f"not valid JSON ({exc})", path=path) from None
        if not isinstance(payload, dict) or not all(isinstance(v, list) for v in payload.values()):
            raise KdcliError(f'expected {{"train": [{noun}s], "dev": [{noun}s], "test": [{noun}s]}}', path=path)
        entries = [(str(i), str(split), f"{split!r} list") for split, ids in payload.items() for i in ids]
    else:
        rows = list(csv.reader(text.splitlines()))
        fold = lambda text: "".join(text.split()).lower()  # noqa: E731 ("Patient ID" = "patientid")
        header = [fold(h) for h in (rows[0] if rows else [])]
        id_at = next((header.index(fold(c)) for c in id_columns if fold(c) in header), None)
        if "split" not in header or id_at is None:
            wanted = (f"columns {id_columns[0]},split" if len(id_columns) == 1 else
                      f"a split column and a {noun} id column ({', '.join(id_columns)})")
            raise KdcliError(f"expected a header with {wanted} (found: {','.join(rows[0]) if rows else 'nothing'})",
                             path=path)
        split_at = header.index("split")
        for number, row in enumerate(rows[1:], start=2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) <= max(id_at, split_at):
                raise KdcliError(f"row {number} has too few columns", path=path)
            entries.append((row[id_at], row[split_at], f"row {number}"))
    listed: dict[str, str] = {}
    for name, split, where in entries:
        canonical = SPLIT_ALIASES.get(split.strip().lower())
        if canonical is None:
            raise KdcliError(f"{where}: unknown split {split!r}", path=path,
                             hint="splits are train, dev (or val/validation) and test")
        name = name.strip()
        ident = key(name) or name
        if listed.get(ident, canonical) != canonical:
            raise KdcliError(f"{where}: {noun} {name} is listed in {listed[ident]} and {canonical}", path=path,
                             hint=f"a {noun} belongs to one split only")
        listed[ident] = canonical
    if not listed:
        raise KdcliError(f"lists no {noun}s", path=path)
    return listed


def split_groups(groups: list[str], ratios: tuple[float, float, float], seed: int, tag: str) -> dict[str, str]:
    """Seeded patient-level split (`tag` keeps each source's draw its own). With 3+ patients every split with a
    non-zero ratio gets at least one, so dev and test are never silently empty on small sets; train keeps the
    rest."""
    members = sorted(set(groups))
    count = len(members)
    order = np.random.default_rng(stable_seed(tag, seed)).permutation(count)
    n_dev, n_test = (round(ratios[1] * count), round(ratios[2] * count))
    if count >= 3:
        n_dev = max(n_dev, 1 if ratios[1] > 0 else 0)
        n_test = max(n_test, 1 if ratios[2] > 0 else 0)
        while n_dev + n_test > count - (1 if ratios[0] > 0 else 0):  # train keeps one patient when it should
            if n_test >= n_dev and n_test > 0:
                n_test -= 1
            else:
                n_dev -= 1
    else:
        n_dev = n_test = 0  # one or two patients: nothing sensible to hold out
    assignment = {}
    for rank, index in enumerate(order):
        assignment[members[index]] = "dev" if rank < n_dev else "test" if rank < n_dev + n_test else "train"
    return assignment


def stratified_split(first_labels: dict[str, int], ratios: tuple[float, float, float], seed: int,
                     tag: str) -> dict[str, str]:
    """Patients (patient -> the label that stratifies them) split by `split_groups` within each label, so a small
    set's dev and test still see every class."""
    strata: dict[int, list[str]] = {}
    for patient, label in sorted(first_labels.items()):
        strata.setdefault(label, []).append(patient)
    assignment: dict[str, str] = {}
    for label, patients in sorted(strata.items()):
        assignment |= split_groups(patients, ratios, seed, f"{tag}-{label}")
    return assignment
