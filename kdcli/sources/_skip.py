"""--skip-bad: a record whose error names it (KdcliError.subject) is left out with a note instead of stopping the
run; the note comes from the error's fields, never from parsing its text."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from kdcli.errors import KdcliError


def read_or_skip(read: Callable[[], tuple[dict[str, Any], Iterator]], skip_bad: bool
                 ) -> tuple[dict[str, Any], Iterator]:
    """A record read by `read`, or with skip_bad, when it fails, {"skipped": reason} and no samples (prepare's
    note names the record already)."""
    try:
        return read()
    except KdcliError as exc:
        if not skip_bad:
            raise
        return {"skipped": exc.fault}, iter([])


def skip_or_raise(exc: KdcliError, skip_bad: bool, notes: list[str]) -> None:
    """At scan time: with skip_bad, an error about one record becomes a note (the hint on how to skip is moot);
    any other error, or without skip_bad, stops the run."""
    if not skip_bad or exc.subject is None:
        raise exc
    notes.append(f"skipped {exc.problem}")
