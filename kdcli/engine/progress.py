"""Progress within an epoch: a tqdm bar on an interactive terminal; in logs and pipelines (stderr not a
terminal) a plain line every N batches with the rate and the time left, so a cluster job's log shows a
long epoch moving. (tqdm draws every bar kdcli shows: prepare's, predict's and these.)"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator

LINES_PER_EPOCH = 10  # the automatic interval: about this many lines per epoch...
MIN_EVERY = 10  # ...but never more often than every this many batches (short epochs print only their end line)


def progress_interval(total: int, every: int = 0) -> int:
    """Batches between progress lines: `every` when given, else about LINES_PER_EPOCH per epoch."""
    return every if every > 0 else max(MIN_EVERY, math.ceil(total / LINES_PER_EPOCH))


def clock(seconds: float) -> str:
    """3725 -> '1:02:05', 42 -> '0:42'."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@contextlib.contextmanager
def batch_progress(total: int, description: str, log: Callable[[str], None] = print, every: int = 0,
                   later_batches: int = 0, interactive: bool | None = None) -> Iterator[Callable[[int], None]]:
    """Yields advance(samples) to call after each batch. `later_batches`: batches in the epochs still to come
    (for the run's ETA, training only: validation adds its own time)."""
    interactive = sys.stderr.isatty() if interactive is None else interactive
    if interactive:
        from tqdm import tqdm

        with tqdm(total=total, desc=description, unit="batch", file=sys.stderr, leave=False) as bar:
            yield lambda samples=0: bar.update(1)
        return
    interval = progress_interval(total, every)
    started, state = time.perf_counter(), {"batches": 0, "samples": 0}

    def advance(samples: int = 0) -> None:
        state["batches"] += 1
        state["samples"] += samples
        done = state["batches"]
        if done % interval or done >= total:  # the epoch's own line follows its last batch
            return
        elapsed = max(time.perf_counter() - started, 1e-9)
        per_batch = elapsed / done
        log(f"{description}  batch {done}/{total}  {state['samples'] / elapsed:.0f} img/s  "
            f"ETA {clock(per_batch * (total - done))} epoch, {clock(per_batch * (total - done + later_batches))} "
            "training")

    yield advance
