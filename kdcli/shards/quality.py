"""Data warnings: bad data a source keeps, repaired, instead of refusing it, counted so nobody has to read logs.

A source calls `warn(kind, message, example)` wherever it meets such data, while scanning or while reading a
record (in a worker process). `prepare` collects them (`collect()` around the scan and around each record's
read, see writer.py), prints one `warning:` line per kind and stores the same counts in dataset.json's
`data_warnings`: {kind: {"message", "count", "examples" (the first few)}}. Bad data that cannot be repaired
without guessing is an error instead (a KdcliError naming the file and line), never a warning.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

EXAMPLES = 3  # examples kept per kind
_collectors: list[dict[str, dict[str, Any]]] = []  # innermost last; one process each, so no locking


def warn(kind: str, message: str, example: str, count: int = 1) -> None:
    """Count `count` occurrences of `kind` (a stable key, e.g. "duplicate_row"); `message` says what was done
    with them (the first message of a kind is kept), `example` names one (file, line, record)."""
    if not _collectors:  # a source used on its own, outside prepare: Python's warnings still say it
        warnings.warn(f"{message}: {example}", stacklevel=2)
        return
    add(_collectors[-1], {kind: {"message": message, "count": count, "examples": [example]}})


@contextlib.contextmanager
def collect() -> Iterator[dict[str, dict[str, Any]]]:
    """The warnings raised inside the block, as dataset.json stores them."""
    found: dict[str, dict[str, Any]] = {}
    _collectors.append(found)
    try:
        yield found
    finally:
        _collectors.remove(found)


def add(into: dict[str, dict[str, Any]], more: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Merge warnings `more` into `into` (counts added, examples kept up to EXAMPLES); returns `into`."""
    for kind, entry in (more or {}).items():
        mine = into.setdefault(kind, {"message": entry["message"], "count": 0, "examples": []})
        mine["count"] += int(entry["count"])
        mine["examples"] = (mine["examples"] + [e for e in entry["examples"] if e not in mine["examples"]])[:EXAMPLES]
    return into


def lines(found: dict[str, dict[str, Any]]) -> list[str]:
    """One line per kind, sorted: `3 x <message> (e.g. a, b, c)`."""
    return [f"{entry['count']} x {entry['message']} (e.g. {', '.join(entry['examples'])})"
            for _, entry in sorted(found.items())]
