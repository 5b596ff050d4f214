"""One writer per output: an exclusive lock file beside it (`.<name>.lock`) for prepare, teach/distill `--out`,
embed and explain.

The file names its holder (pid, host, command, start time) for the message a second run prints. Whether the
holder is alive is decided by an flock on the file, which the kernel drops when the holder dies however it dies
(kill -9 included), so a leftover file is recognised as stale, reported and taken over; where flock is not
available the holder's pid is checked instead. A lock left by another host cannot be checked from here: it is
refused, with the file to delete if that run is gone."""

from __future__ import annotations

import glob
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kdcli.errors import KdcliError, write_failure
from kdcli.storage import make_folder, remove_folders

try:
    import fcntl
except ImportError:  # Windows: pid checks only
    fcntl = None


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    command: str
    started: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} (`{self.command}`, since {self.started})"

    @classmethod
    def me(cls, command: str) -> Holder:
        return cls(os.getpid(), socket.gethostname(), command, time.strftime("%Y-%m-%d %H:%M:%S"))


class OutputLocked(KdcliError):
    """Another live run writes the same output."""

    def __init__(self, target: Path, lock: Path, holder: Holder | None, remote: bool = False):
        who = holder.describe() if holder else "another run"
        hint = (f"if no kdcli run is active on {holder.host}, delete {lock}" if remote and holder
                else "wait for it to finish, or choose another output")
        super().__init__(f"in use by {who}", path=target, hint=hint)


def lock_path(target: Path, tag: str = "") -> Path:
    target = Path(target)
    return target.parent / f".{target.name}{'.' + tag if tag else ''}.lock"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:  # a zombie is dead for our purpose (its parent has not reaped it yet)
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


def _try_flock(fd: int) -> bool | None:
    """True: locked; False: another open file holds it; None: this file system has no flock."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:  # ENOLCK, EOPNOTSUPP...: some network and FUSE file systems
        return None


def _read_holder(fd: int) -> Holder | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        values = json.loads(os.read(fd, 1 << 16).decode() or "null")
        return Holder(int(values["pid"]), str(values["host"]), str(values["command"]), str(values["started"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


@dataclass
class Held:
    path: Path
    fd: int
    created: list[Path] = field(default_factory=list)  # folders made for the lock file, removed if left empty

    def release(self) -> None:
        # unlink before close: a run that opened the file meanwhile sees it is no longer the lock (_same_file)
        if _same_file(self.fd, self.path):
            self.path.unlink(missing_ok=True)
        os.close(self.fd)
        remove_folders(self.created)  # a run refused or failed before writing leaves no empty folder behind


def acquire(target: Path, command: str, tag: str = "", report: Callable[[str], None] = _stderr) -> Held:
    """Take the lock of `target` (`tag`: one of several locks beside it, e.g. a prepare part's) or raise
    OutputLocked naming its live holder. A stale lock (its holder died) is reported and taken over."""
    path = lock_path(target, tag)
    created = make_folder(path.parent)
    for _ in range(5):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            remove_folders(created)
            raise write_failure(exc, path, "choose an output in a writable folder") or exc from None
        locked = _try_flock(fd)
        previous = _read_holder(fd)
        if locked is False:
            os.close(fd)
            raise OutputLocked(target, path, previous)  # its holder made the folder: nothing of ours to remove
        if not _same_file(fd, path):  # its holder released and deleted it between our open and flock
            os.close(fd)
            continue
        if previous is not None:  # a file left behind, or (without flock) maybe a live holder's
            if previous.host != socket.gethostname():
                os.close(fd)
                raise OutputLocked(target, path, previous, remote=True)
            if locked is None and _pid_alive(previous.pid):
                os.close(fd)
                raise OutputLocked(target, path, previous)
            report(f"note: took over the stale lock {path} of {previous.describe()}: that process is gone")
        me = json.dumps(asdict(Holder.me(command))).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, me, 0)
        return Held(path, fd, created)
    raise OutputLocked(target, path, None)


def live_holder(path: Path) -> Holder | None:
    """Who holds the lock file `path` now, if anyone (a stale or absent file: None)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        holder = _read_holder(fd)
        locked = _try_flock(fd)
        if locked is False:
            return holder or Holder(0, "?", "?", "?")
        if holder is None:
            return None
        if holder.host != socket.gethostname():
            return holder
        return holder if locked is None and _pid_alive(holder.pid) else None
    finally:
        os.close(fd)


@contextmanager
def output_lock(target: Path, command: str, tag: str = "", exclusive_of: tuple[str, ...] = (),
                report: Callable[[str], None] = _stderr, enabled: bool = True) -> Iterator[Path]:
    """Hold the lock of `target` for the block. `exclusive_of`: tags of sibling locks that must not be live
    meanwhile (glob patterns; "" is the plain lock), e.g. a plain prepare refuses while `--part` runs write the
    same staging folder. `enabled=False` (ranks > 0 under torchrun) takes nothing."""
    if not enabled:
        yield Path(target)
        return
    held = acquire(Path(target), command, tag, report)
    try:
        target = Path(target)
        for pattern in exclusive_of:
            name = f".{glob.escape(target.name)}{'.' + pattern if pattern else ''}.lock"
            for other in sorted(target.parent.glob(name)):
                holder = None if other == held.path else live_holder(other)
                if holder is not None:
                    raise OutputLocked(target, other, holder, remote=holder.host != socket.gethostname())
        yield target
    finally:
        held.release()
