"""A training run's result is the checkpoint and its sidecars (config, metrics, the resumable last state). A run
that would replace an earlier result (`--overwrite`) writes all of them under staged names and publishes them
together when it ends well; a run that fails (disk full, Ctrl-C, a NaN loss) leaves the earlier result as it
was, sidecars included, and removes its staged files.

Runs with nothing to replace, and `--resume`, write under the final names as before: an interrupted first run
must leave `<out>.last.pt` for `--resume`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kdcli.engine.checkpoint import sibling
from kdcli.errors import DiskFull, KdcliError
from kdcli.shards.format import atomic_write_bytes

SIDECARS = (".config.json", ".metrics.jsonl", ".metrics.csv", ".curves.png", ".last.pt")


def result_files(out: Path) -> list[Path]:
    """Every file of the result at `out`, the checkpoint last."""
    return [sibling(out, suffix) for suffix in SIDECARS] + [Path(out)]


def public_path(path: Path) -> Path:
    """The name a user asked for: .oct-staged.pt -> oct.pt; any other path as it is."""
    path = Path(path)
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    if stem.startswith(".") and stem.endswith("-staged"):
        return path.with_name(stem[1:-len("-staged")] + path.suffix)
    return path


def staged_path(out: Path) -> Path:
    """oct.pt -> .oct-staged.pt, whose siblings (.oct-staged.last.pt, ...) mirror oct.pt's."""
    out = Path(out)
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return out.with_name(f".{stem}-staged{out.suffix}")


def write_config(out: Path, config: dict) -> None:
    """<out>.config.json: the run's resolved options (written at the start, published with the checkpoint)."""
    atomic_write_bytes(sibling(out, ".config.json"), (json.dumps(config, indent=2) + "\n").encode())


def discard(work: Path) -> None:
    for path in result_files(work):
        path.unlink(missing_ok=True)


def publish(work: Path, out: Path) -> None:
    """Move the staged result over the old one: sidecars first, the checkpoint last, so once the new checkpoint is
    visible so are its sidecars; an old sidecar this run did not write (no metrics) does not outlive it."""
    if not Path(work).is_file():
        discard(work)
        raise KdcliError("the run saved no checkpoint (no dev score was ever computed); the earlier one is kept",
                         path=out)
    for staged, final in zip(result_files(work), result_files(out), strict=True):
        if staged.exists():
            os.replace(staged, final)
        else:
            final.unlink(missing_ok=True)


@contextmanager
def staged_result(out: Path, resume: bool, writer: bool = True) -> Iterator[Path]:
    """The path a run writes its checkpoint to (sidecars follow it): `out` itself, or, when the run would replace
    an earlier result, a staged name published over it at the end of a successful block. `writer=False` (ranks
    > 0 under torchrun, which write nothing) yields the staged name too but publishes nothing."""
    out = Path(out)
    staged = staged_path(out)
    if resume or not any(path.exists() for path in result_files(out)):
        yield out
        return
    if not writer:
        yield staged
        return
    discard(staged)  # a killed run's (this run holds the output's lock: no live run owns them)
    try:
        yield staged
    except BaseException as exc:
        discard(staged)
        if isinstance(exc, KdcliError):  # its line names the files the user asked for, not their staged names
            names = dict(zip(result_files(staged), result_files(out), strict=True))
            if isinstance(exc, DiskFull) and exc.path in names:
                raise DiskFull(names[exc.path], exc.hint) from None
            text = str(exc)
            for staged_file, final in names.items():
                text = text.replace(str(staged_file), str(final))
            exc.args = (text,)
        raise
    publish(staged, out)
