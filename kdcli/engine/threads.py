"""How many intra-op threads torch gets: the CPUs this process may use, less the DataLoader workers and the
CPUs other processes are keeping busy right now.

torch's default is one thread per core it can see. On a machine it shares, one busy neighbour on 2 cores is
enough to make that default slow by an order of magnitude: every parallel operator waits at its barrier for the
thread whose core the neighbour holds (the demo went from 58 s to 715-831 s; with one thread, 127 s). So the
engine counts the CPUs it may use (affinity and cgroup quota), takes away its DataLoader workers and the load
measured on those CPUs over a tenth of a second, and keeps at least one. An explicit `--threads N` or
OMP_NUM_THREADS is always obeyed.

Light on purpose: torch is imported only to apply a choice.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from kdcli.errors import UsageError

SAMPLE_SECONDS = 0.1  # long enough to see a busy process (10 scheduler ticks), short beside any training run
CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1 = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    source: str  # "--threads", "OMP_NUM_THREADS" or "auto"
    cpus: int = 0  # CPUs this process may use
    workers: int = 0
    busy: float = 0.0  # CPUs other processes kept busy while sampled

    def describe(self) -> str:
        """For the start-up line: `threads 1 (auto: 2 CPUs, 0 workers, 1.0 busy elsewhere)`."""
        if self.source != "auto":
            return f"threads {self.threads} ({self.source})"
        return (f"threads {self.threads} (auto: {self.cpus} CPUs, {self.workers} workers, "
                f"{self.busy:.1f} busy elsewhere)")


def allowed_cpus() -> set[int]:
    """The CPU ids this process may run on (its affinity mask; every CPU where the OS has no such call)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def cgroup_cpu_limit(v2: Path = CGROUP_V2, v1: tuple[Path, Path] = CGROUP_V1) -> float | None:
    """CPUs' worth of time the container's cgroup quota allows (docker --cpus), or None when unlimited."""
    try:
        quota, period = v2.read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota, period = (int(path.read_text()) for path in v1)
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus(cpus: set[int] | None = None, limit: float | None = -1.0) -> int:
    """min(affinity, ceil(cgroup quota)), at least 1. `limit` -1 reads the quota; None means unlimited."""
    count = len(cpus if cpus is not None else allowed_cpus())
    quota = cgroup_cpu_limit() if limit == -1.0 else limit
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def _cpu_jiffies(stat: str, cpus: set[int]) -> tuple[int, int]:
    """(busy, total) jiffies over `cpus` from /proc/stat's per-CPU lines (idle and iowait are not busy)."""
    busy = total = 0
    for line in stat.splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(values)
        busy += sum(values) - values[3] - values[4]
    return busy, total


def busy_elsewhere(cpus: set[int], seconds: float = SAMPLE_SECONDS, stat: Path = Path("/proc/stat")) -> float:
    """CPUs' worth of work other processes did on `cpus` over `seconds` (this one sleeps meanwhile); 0 where
    /proc/stat is not there to read."""
    try:
        before = _cpu_jiffies(stat.read_text(), cpus)
        mine = time.process_time()
        time.sleep(seconds)
        after = _cpu_jiffies(stat.read_text(), cpus)
        mine = time.process_time() - mine
    except (OSError, ValueError):
        return 0.0
    busy, total = after[0] - before[0], after[1] - before[1]
    if total <= 0:
        return 0.0
    share = busy / total * len(cpus) - mine / seconds  # less whatever this process did (its other threads)
    return max(0.0, min(float(len(cpus)), share))


def env_threads(environ: Mapping[str, str]) -> int | None:
    """OMP_NUM_THREADS as a count, or None when unset; a value torch would not read is refused."""
    text = (environ.get("OMP_NUM_THREADS") or "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"OMP_NUM_THREADS={text!r}: set a whole number of threads (1 or more), or unset it")
    return int(text)


def choose_threads(requested: int = 0, workers: int = 0, environ: Mapping[str, str] | None = None,
                   cpus: set[int] | None = None, limit: float | None = -1.0, busy: float | None = None,
                   processes: int = 1) -> ThreadChoice:
    """`requested` (--threads) > OMP_NUM_THREADS > usable CPUs - workers - CPUs busy elsewhere (at least 1).
    `processes`: training processes sharing this machine's CPUs (torchrun's LOCAL_WORLD_SIZE), each taking its
    share; their load is each other's, so none is sampled. `cpus`, `limit` and `busy` stand in for the machine
    (tests); None/-1 read it."""
    if requested < 0:
        raise UsageError(f"--threads {requested}: 0 (choose) or a number of threads")
    if requested:
        return ThreadChoice(requested, "--threads")
    from_env = env_threads(os.environ if environ is None else environ)
    if from_env:
        return ThreadChoice(from_env, "OMP_NUM_THREADS")
    cpu_set = cpus if cpus is not None else allowed_cpus()
    count = usable_cpus(cpu_set, limit)
    if processes > 1:
        count, busy = max(1, count // processes), 0.0
    if busy is None:
        # The affinity set's load only means something when affinity is what limits us; under a cgroup quota
        # on a larger host, other tenants' load on the host's CPUs is not ours to share.
        busy = busy_elsewhere(cpu_set) if count == len(cpu_set) else 0.0
    threads = max(1, count - workers - math.floor(busy + 0.5))  # half a CPU busy counts as one
    return ThreadChoice(threads, "auto", count, workers, busy)


def children_cpu_seconds(proc: Path = Path("/proc")) -> float:
    """CPU seconds used so far by this process's live children (DataLoader workers), which the process's own
    clock does not count until they exit; 0 where /proc cannot tell."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        pids = {pid for task in (proc / "self" / "task").iterdir()
                for pid in (task / "children").read_text().split()}
    except OSError:
        return 0.0
    for pid in pids:
        try:
            fields = (proc / pid / "stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            continue  # a worker that just exited
    return total


class LoadWatch:
    """Re-chooses an automatic thread count between epochs, from the load other processes put on this process's
    CPUs meanwhile (its own threads and DataLoader workers taken out): a neighbour that starts after training did
    costs this run threads at the next epoch, not the rest of the run. Explicit counts are never changed."""

    def __init__(self, choice: ThreadChoice, stat: Path = Path("/proc/stat")):
        self.choice, self.stat = choice, stat
        self.active = choice.source == "auto" and choice.cpus == len(allowed_cpus()) and stat.is_file()
        self.cpus = allowed_cpus()
        self._mark()

    def _mark(self) -> None:
        self.started = time.perf_counter()
        self.mine = time.process_time() + children_cpu_seconds()
        try:
            self.jiffies = _cpu_jiffies(self.stat.read_text(), self.cpus)
        except OSError:
            self.active = False

    def update(self) -> ThreadChoice | None:
        """The new choice when it differs from the current one (apply it with torch.set_num_threads)."""
        if not self.active:
            return None
        before, started, mine = self.jiffies, self.started, self.mine
        self._mark()
        elapsed = self.started - started
        busy, total = self.jiffies[0] - before[0], self.jiffies[1] - before[1]
        if elapsed <= 0 or total <= 0:
            return None
        busy_cpus = busy / total * len(self.cpus)
        others = max(0.0, busy_cpus - (self.mine - mine) / elapsed)
        threads = max(1, self.choice.cpus - self.choice.workers - math.floor(others + 0.5))
        if threads == self.choice.threads:
            return None
        self.choice = ThreadChoice(threads, "auto", self.choice.cpus, self.choice.workers, others)
        return self.choice


@contextlib.contextmanager
def torch_threads(choice: ThreadChoice) -> Iterator[ThreadChoice]:
    """torch.set_num_threads(choice) for the block, the previous count restored after it (library callers
    such as the demo and the bench run several trainings in one process)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(choice.threads)
    try:
        yield choice
    finally:
        torch.set_num_threads(previous)
