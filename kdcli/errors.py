"""The one exception users see: a single line that names the file and the fix."""

from __future__ import annotations

from pathlib import Path


class KdcliError(Exception):
    """A user-facing failure. The CLI prints `error: <message>` and exits with `exit_code`."""

    exit_code = 1

    def __init__(self, message: str, *, path: str | Path | None = None, hint: str | None = None):
        parts = [f"{path}: {message}" if path is not None else message]
        if hint:
            parts.append(hint)
        super().__init__(" — ".join(parts))


class UsageError(KdcliError):
    """Bad option values; exit code 2 like any other usage error."""

    exit_code = 2
