"""Writing outputs so that a failure (disk full, read-only folder, Ctrl-C, a crash) never leaves half a file or
a half-replaced folder: every file is written under a temporary name beside its target and renamed when
complete; a failed write removes its temporary (and the folders it made) and says in one line what happened.

HDF5 needs care of its own: once a write has failed for lack of space, the library keeps unflushable buffers
and crashes the interpreter at exit (a segmentation fault after h5py's traceback). `new_h5` flushes inside the
caller's block and, on failure, points the file's descriptor at a discard file so HDF5 can close cleanly."""

from __future__ import annotations

import glob
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from kdcli.errors import KdcliError, write_failure

if TYPE_CHECKING:
    import h5py


def _file_mode() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()  # what open() would give a new file (read once, at import: os.umask is process-wide)


def make_folder(folder: Path) -> list[Path]:
    """mkdir -p that returns the folders it created (deepest last), so a failed write can remove them again; a
    parent that is a file or read-only becomes a one-line error naming it."""
    folder = Path(folder)
    missing = []
    probe = folder
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise KdcliError("is a file, not a folder", path=probe, hint="choose another output location")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_failure(exc, folder / "x") or exc from None
    return list(reversed(missing))


def remove_folders(folders: list[Path]) -> None:
    """Remove folders `make_folder` created, deepest first, as long as they are empty."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return


def atomic_write(path: Path, write: Callable[[Path], None], hint: str | None = None) -> None:
    """`write(tmp)` fills a temporary file beside `path`, which is renamed to `path` when complete. On failure
    the temporary and any folder made for it are removed, and disk-full or read-only folders become one line
    naming `path` (`hint`: what the user can do instead)."""
    path = Path(path)
    created = make_folder(path.parent)
    tmp = None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, FILE_MODE)  # mkstemp's 0600 would make a shared dataset or checkpoint unreadable to others
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        remove_folders(created)
        failure = write_failure(exc, path, hint)
        if failure is not None:
            raise failure from None
        raise


def write_bytes_synced(tmp: Path, data: bytes) -> None:
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


@contextmanager
def new_h5(path: Path, final: Path | None = None) -> Iterator[h5py.File]:
    """A new HDF5 file at `path` (a temporary name; the caller renames it once complete), flushed and closed at
    the end of the block so that a full disk surfaces here. On any failure the file is closed without touching
    the disk again and deleted; disk-full becomes one `DiskFull` naming `final` (default `path`)."""
    import h5py
    import h5py._errors

    h5py._errors.silence_errors()  # HDF5's own error stack printing is per thread; h5py silences the main one only
    # A failed write can also surface where Python cannot raise it: when h5py frees an object whose buffers HDF5
    # cannot flush (a dataset handle going out of scope). Those are this file's errors: kept, not printed.
    ignored: list[BaseException] = []
    previous_hook = sys.unraisablehook

    def keep_h5py_errors(unraisable) -> None:
        if "h5py" in str(unraisable.object) and isinstance(unraisable.exc_value, (OSError, RuntimeError)):
            ignored.append(unraisable.exc_value)
        else:
            previous_hook(unraisable)

    sys.unraisablehook = keep_h5py_errors
    handle = None
    try:
        handle = h5py.File(path, "w")
        _keep_created_objects(handle)
        yield handle
        if ignored:
            raise ignored[0]
        handle.flush()
        handle.close()
        if ignored:
            raise ignored[0]
    except BaseException as exc:
        if handle is not None:
            _abandon(handle)
        Path(path).unlink(missing_ok=True)
        failure = write_failure(exc, final or path)
        if failure is not None:
            raise failure from None
        raise
    finally:
        sys.unraisablehook = previous_hook


def _keep_created_objects(handle: h5py.File) -> None:
    """Datasets and groups made in the block live until the file is closed. Freed earlier, HDF5 flushes them in
    their destructor, and when that fails (disk full) Python cannot raise the error and HDF5 keeps a half-closed
    object that crashes the interpreter at exit; closed with the file, they fail (or not) where we can act."""
    kept: list = []

    def keeping(make):
        def made(*args, **kwargs):
            created = make(*args, **kwargs)
            kept.append(created)
            return created
        return made

    for name in ("create_dataset", "require_dataset", "create_group", "require_group"):
        setattr(handle, name, keeping(getattr(handle, name)))
    handle._kdcli_kept = kept


def _abandon(handle: h5py.File) -> None:
    """Close an HDF5 file whose buffers cannot be written: its descriptor is pointed at a discard file (memory,
    sparse), so the flush at close succeeds there instead of failing again and leaving HDF5 in a state that
    segfaults at exit. The real file is deleted by the caller."""
    if not handle.id.valid:
        return
    try:
        fd = handle.id.get_vfd_handle()
        sink = _discard_descriptor()
        os.dup2(sink, fd)
        os.close(sink)
    except Exception:  # another driver than sec2: close as well as it can
        pass
    try:
        handle.close()
    except Exception:
        pass


def _discard_descriptor() -> int:
    if hasattr(os, "memfd_create"):  # Linux: memory, and sparse, so the writes HDF5 still makes cost nothing
        return os.memfd_create("kdcli-discard")
    with tempfile.TemporaryFile() as spare:  # deleted already; the duplicate keeps it open
        return os.dup(spare.fileno())


def replace_folder(new: Path, out: Path) -> None:
    """Put the finished folder `new` at `out`; an old `out` goes only after the new one is in place."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{int(time.time())}")
        out.rename(old)
    new.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(out: Path, kinds: tuple[str, ...] = ("old", "staging"),
                     report: Callable[[str], None] | None = None) -> None:
    """Clear `.<name>.<kind>-*` siblings of `out` that killed runs left: half-built folders, and replaced ones
    not yet deleted. One exception: a run killed between moving the old `out` aside and moving the new one in
    left no `out` at all; the old one is put back. Only call this holding the output's lock: then no live run
    owns them."""
    say = report or (lambda message: print(message, file=sys.stderr, flush=True))
    for kind in kinds:
        found = sorted(out.parent.glob(f".{glob.escape(out.name)}.{kind}-*"), key=lambda p: p.stat().st_mtime)
        if kind == "old" and found and not out.exists():
            found[-1].rename(out)
            say(f"note: {out} was missing after an interrupted replacement; restored the previous one")
            found = found[:-1]
        for leftover in found:
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)


def save_figure(fig, path: Path, hint: str | None = None) -> None:
    """Write a matplotlib figure as PNG under a temporary name, then rename: never half a file at `path`."""
    import matplotlib.pyplot as plt

    try:
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=110, format="png"), hint)
    finally:
        plt.close(fig)
