"""The one exception users see: a single line that names the file and the fix."""

from __future__ import annotations

import errno
import os
from pathlib import Path


class KdcliError(Exception):
    """A user-facing failure. The CLI prints `error: <message>` and exits with `exit_code`."""

    exit_code = 1

    def __init__(self, message: str, *, path: str | Path | None = None, hint: str | None = None,
                 subject: str | None = None):
        # kept apart so no caller parses the text: `subject` names the record at fault ("case BraTS_001"), which
        # --skip-bad may leave out; `fault` is what is wrong with it and `problem` both, each without the hint
        self.subject = subject
        self.fault = f"{path}: {message}" if path is not None else message
        self.problem = f"{subject}: {self.fault}" if subject else self.fault
        super().__init__(f"{self.problem} — {hint}" if hint else self.problem)


class UsageError(KdcliError):
    """Bad option values; exit code 2 like any other usage error."""

    exit_code = 2


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
UNWRITABLE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT, raised directly or wrapped in a library's own error whose text carries it: h5py's OSError
    or RuntimeError ("errno = 28"), polars' ComputeError ("os error 28"), torch's serializer's RuntimeError."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return True
    if not isinstance(exc, Exception) or isinstance(exc, KdcliError):
        return False
    text = str(exc)
    return any(marker in text for code in DISK_FULL_ERRNOS
               for marker in (os.strerror(code), f"errno = {code},", f"os error {code})"))


class DiskFull(KdcliError):
    """A write ran out of space: one line naming the file, never HDF5's error stack or a crash."""

    def __init__(self, path: str | Path, hint: str | None = None):
        self.path, self.hint = Path(path), hint
        super().__init__("no space left on device", path=path,
                         hint=hint or "free some space (or write to another disk), then rerun")

    def __reduce__(self):  # prepare's worker processes send it back pickled
        return type(self), (self.path, self.hint)


class Unwritable(KdcliError):
    """A folder kdcli must write into is read-only or not ours."""

    def __init__(self, path: str | Path, reason: str, hint: str | None = None):
        self.path, self.reason, self.hint = Path(path), reason, hint
        super().__init__(f"cannot write here ({reason})", path=path, hint=hint or "choose a writable location")

    def __reduce__(self):
        return type(self), (self.path, self.reason, self.hint)


def write_failure(exc: BaseException, path: str | Path, hint: str | None = None) -> KdcliError | None:
    """The one-line error for a failed write of `path` (disk full, read-only folder), or None for other errors."""
    if isinstance(exc, KdcliError):
        return None
    if is_disk_full(exc):
        return DiskFull(path, hint)
    if isinstance(exc, OSError) and exc.errno in UNWRITABLE_ERRNOS:
        return Unwritable(Path(path).parent, exc.strerror or str(exc), hint)
    return None
