"""Reading the text files of a raw download (label lists, CSVs): UTF-8 (a BOM allowed), gzipped or not. Bytes
that are not text are one error naming the file and the line, never a UnicodeDecodeError traceback and never
replaced by U+FFFD in silence (a mangled image name would be reported as a missing image, far from its cause)."""

from __future__ import annotations

import contextlib
import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from kdcli.errors import KdcliError

ENCODING = "utf-8-sig"


def _raw_bytes(path: Path) -> bytes:
    return gzip.open(path).read() if path.name.endswith(".gz") else path.read_bytes()


def decode_error(path: Path) -> KdcliError:
    """The error for a file that will not decode: which line, which byte."""
    data = _raw_bytes(Path(path))
    for number, line in enumerate(data.splitlines(), start=1):
        try:
            line.decode(ENCODING if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            return KdcliError(f"line {number} holds bytes that are not UTF-8 text (0x{line[exc.start]:02x} at column "
                              f"{exc.start + 1})", path=path,
                              hint="save the file as UTF-8, or restore the original download")
    return KdcliError("not UTF-8 text", path=path, hint="save the file as UTF-8, or restore the original download")


def read_text(path: Path) -> str:
    path = Path(path)
    try:
        return _raw_bytes(path).decode(ENCODING)
    except UnicodeDecodeError:
        raise decode_error(path) from None


def open_text(path: Path) -> IO[str]:
    """A text handle for csv readers (newline=""), gunzipping `.gz`; iterate it under `decoding(path)`."""
    path = Path(path)
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", newline="", encoding=ENCODING)
    return open(path, newline="", encoding=ENCODING)


@contextlib.contextmanager
def decoding(path: Path) -> Iterator[None]:
    """Turn a UnicodeDecodeError met while reading `path` into the one-line error."""
    try:
        yield
    except UnicodeDecodeError:
        raise decode_error(Path(path)) from None
