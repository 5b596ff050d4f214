"""Damage and faults (issue 17, sections 1-2): a run never publishes or replaces something wrong, and a full disk
or a read-only folder ends in one `error:` line naming the file, with temporaries removed and earlier output
intact. Every case asserts the exit code, the single error line, no traceback and the earlier output's bytes.

Faults are injected at the lowest write layer kdcli owns (ENOSPC from the writer's file or HDF5 calls); where
`unshare` lets an unprivileged test mount a tmpfs or a read-only bind mount, the real thing is tested too."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import polars as pl
import pytest
from conftest import kdcli_run

from kdcli.locks import Holder, OutputLocked, acquire, lock_path, output_lock

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
TINY = ["--epochs", "1", "--batch-size", "16", "--workers", "0", "--model", "test_resnet"]


# what may precede the error: notes (a stale lock taken over), training's start-up line and epoch lines
PROGRESS = ("note: ", "epoch ", "teach ", "distill ")


def error_line(output: str, *needles: str, prefix: str = "error: ") -> str:
    """The one `error:` line a failed command ends with: nothing else but notes and epoch lines before it."""
    assert "Traceback" not in output and "Segmentation fault" not in output and "HDF5" not in output, output
    lines = [line for line in output.splitlines() if line.strip() and not line.startswith(PROGRESS)]
    assert len(lines) == 1 and lines[0].startswith(prefix), output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def assert_error(result, code: int, *needles: str) -> str:
    assert result.exit_code == code, result.output
    return error_line(result.output, *needles)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) by relative path, with a digest of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def dataset_content(folder: Path) -> dict[str, str]:
    """A dataset's bytes, but for fingerprints.json (sizes and mtimes: differs between identical prepares)."""
    return {name: digest for name, digest in snapshot(folder).items() if name != "fingerprints.json"}


def leftovers(folder: Path) -> list[str]:
    """Temporaries, staged results, staging folders and locks a failed or finished run must not leave."""
    markers = (".tmp", "-staged", ".staging-", ".old-", ".lock")
    return sorted(str(p) for p in Path(folder).rglob("*") if any(m in p.name for m in markers))


def enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def fake_checkpoint(tmp_path) -> Path:
    """A checkpoint file with a kdcli header and no weights: enough for commands refused before they load any."""
    from kdcli.engine.checkpoint import save_checkpoint

    path = tmp_path / "ckpt" / "model.pt"
    save_checkpoint(path, {"kind": "teacher", "task": "classification", "model": {}, "classes": [],
                           "modality": "oct", "data": {}}, {})
    return path


def prepare_args(raw: Path, out: Path, *extra) -> list:
    return ["prepare", "multieye", raw, "--out", out, "--size", "32", "--shard-size", "16", *extra]


# ------------------------------------------------------------------------------------------- the lock itself
def test_a_live_lock_is_refused_naming_its_holder_and_released_after(tmp_path):
    target = tmp_path / "out"
    with output_lock(target, "kdcli prepare multieye --out out"):
        holder = json.loads(lock_path(target).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(OutputLocked, match=f"in use by pid {os.getpid()} on {socket.gethostname()}"):
            acquire(target, "second run")
    assert not lock_path(target).exists()
    acquire(target, "third run").release()


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("flock", [True, False], ids=["flock", "pid-check-only"])
def test_a_stale_lock_is_reported_and_taken_over(tmp_path, monkeypatch, flock):
    import kdcli.locks as locks

    if not flock:  # file systems without flock: the holder's pid decides
        monkeypatch.setattr(locks, "_try_flock", lambda fd: None)
    target = tmp_path / "out"
    stale = Holder(dead_pid(), socket.gethostname(), "kdcli teach --out out", "2024-01-01 00:00:00")
    lock_path(target).write_text(json.dumps(stale.__dict__))
    notes: list[str] = []
    held = acquire(target, "new run", report=notes.append)
    assert len(notes) == 1 and "stale lock" in notes[0] and str(stale.pid) in notes[0]
    assert json.loads(lock_path(target).read_text())["pid"] == os.getpid()
    held.release()


def test_without_flock_a_live_pid_is_refused(tmp_path, monkeypatch):
    import kdcli.locks as locks

    monkeypatch.setattr(locks, "_try_flock", lambda fd: None)
    target = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = Holder(sleeper.pid, socket.gethostname(), "kdcli prepare", "2024-01-01 00:00:00")
        lock_path(target).write_text(json.dumps(live.__dict__))
        with pytest.raises(OutputLocked, match=f"pid {sleeper.pid}"):
            acquire(target, "new run")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_lock_of_another_host_is_refused_with_the_file_to_delete(tmp_path):
    target = tmp_path / "out"
    remote = Holder(1234, "some-other-node", "kdcli prepare", "2024-01-01 00:00:00")
    lock_path(target).write_text(json.dumps(remote.__dict__))
    with pytest.raises(OutputLocked, match=f"delete {lock_path(target)}"):
        acquire(target, "new run")
    assert json.loads(lock_path(target).read_text())["host"] == "some-other-node"  # left for its owner


# ------------------------------------------------------- every writing command refuses a live lock on --out
def locked_commands(raw: Path, shards: Path, checkpoint: Path, tmp: Path) -> dict[str, tuple[Path, str, list]]:
    """command -> (output whose lock is held, lock tag held, argv)."""
    out = tmp / "prepared"
    return {
        "prepare": (out, "", prepare_args(raw, out)),
        "prepare --overwrite": (out, "", prepare_args(raw, out, "--overwrite")),
        "prepare --resume": (out, "", prepare_args(raw, out, "--resume")),
        "prepare while a part runs": (out, "part-2-of-2", prepare_args(raw, out)),
        "prepare --part while a plain run runs": (out, "", prepare_args(raw, out, "--part", "1/2")),
        "prepare --part twice": (out, "part-1-of-2", prepare_args(raw, out, "--part", "1/2")),
        "prepare merge": (out, "", ["prepare", "merge", out]),
        "merge while a part runs": (out, "part-1-of-2", ["prepare", "merge", out]),
        "teach": (tmp / "oct.pt", "", ["teach", "--data", shards, "--modality", "oct", "--out", tmp / "oct.pt",
                                       *TINY]),
        "distill": (tmp / "fundus.pt", "", ["distill", "--data", shards, "--teacher", checkpoint, "--student",
                                            "fundus", "--method", "coda", "--out", tmp / "fundus.pt", *TINY]),
        "explain": (tmp / "explained", "", ["explain", checkpoint, "--data", shards, "--out", tmp / "explained"]),
    }


LOCKED = ["prepare", "prepare --overwrite", "prepare --resume", "prepare while a part runs",
          "prepare --part while a plain run runs", "prepare --part twice", "prepare merge", "merge while a part runs",
          "teach", "distill", "explain"]


@pytest.mark.parametrize("command", LOCKED)
def test_every_writer_refuses_an_output_in_use(command, multieye_raw, multieye_shards, fake_checkpoint, tmp_path):
    target, tag, argv = locked_commands(multieye_raw, multieye_shards, fake_checkpoint, tmp_path)[command]
    partial = Path(str(target) + ".partial")
    (partial / "shards").mkdir(parents=True)  # the holder's work in progress
    (partial / "shards" / "train-oct-00000.h5").write_bytes(b"the other run's shard")
    before = snapshot(tmp_path)
    held = acquire(target, "kdcli prepare multieye --out prepared --size 160", tag)
    try:
        result = kdcli_run(*argv, ok=False)
    finally:
        held.release()
    assert_error(result, 1, "in use by", f"pid {os.getpid()}", "--size 160", str(target))
    assert snapshot(tmp_path) == before  # nothing written, and the live run's .partial folder still there


def test_a_second_prepare_started_while_the_first_writes_is_refused(multieye_raw, tmp_path, monkeypatch):
    """The first run holds --out's lock while it writes its shards; a second one, started then, is refused and
    leaves the first one's staging folder alone (in one process: deterministic; the subprocess case is slow)."""
    import kdcli.shards.writer as writer

    out, original, seen = tmp_path / "shards", writer.write_shard, {}

    def second_run_meanwhile(*args, **kwargs):
        if not seen:
            partial = Path(str(out) + ".partial")
            before = snapshot(partial)
            seen["plain"] = kdcli_run("prepare", "multieye", multieye_raw, "--out", out, "--size", "24", ok=False)
            seen["overwrite"] = kdcli_run("prepare", "multieye", multieye_raw, "--out", out, "--size", "24",
                                          "--overwrite", ok=False)
            seen["intact"] = snapshot(partial) == before
        return original(*args, **kwargs)

    monkeypatch.setattr(writer, "write_shard", second_run_meanwhile)
    kdcli_run(*prepare_args(multieye_raw, out))
    for name in ("plain", "overwrite"):
        assert_error(seen[name], 1, "in use by", f"pid {os.getpid()}", "--size 32", str(out))
    assert seen["intact"] and json.loads((out / "dataset.json").read_text())["prepare"]["size"] == 32
    assert leftovers(tmp_path) == []


@pytest.fixture
def slide_shards(tmp_path) -> Path:
    from kdcli.prepare import PrepareOptions, prepare
    from kdcli.synth.camelyon import synth_camelyon

    synth_camelyon(tmp_path / "slides-raw", slides=4, size=512)
    out = tmp_path / "slides"
    prepare(PrepareOptions(source="camelyon", raw=tmp_path / "slides-raw", out=out, size=16,
                           source_options={"patch_size": 64, "max_patches": 2, "ratios": "0.5,0.25,0.25"}))
    return out


def test_embed_refuses_embeddings_another_run_is_computing(slide_shards, monkeypatch):
    from kdcli.errors import KdcliError

    seen = {}

    def second_run_meanwhile(*args, **kwargs):
        seen["second"] = kdcli_run("embed", "--data", slide_shards, "--model", "resnet18", ok=False)
        raise KdcliError("first run stopped here")

    monkeypatch.setattr("kdcli.mil._embed", second_run_meanwhile)
    before = snapshot(slide_shards)
    assert_error(kdcli_run("embed", "--data", slide_shards, "--model", "resnet18", ok=False), 1,
                 "first run stopped here")
    assert_error(seen["second"], 1, "in use by", f"pid {os.getpid()}", "kdcli embed",
                 str(slide_shards / "embeddings"))
    assert snapshot(slide_shards) == before and leftovers(slide_shards) == []


# ----------------------------------------------------------------------- two prepares into one --out at once
GATED = """
import pathlib, sys, time
import kdcli.shards.writer as writer
started, gate = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
original = writer.write_shard
def gated(*args, **kwargs):
    started.touch()
    while not gate.exists():
        time.sleep(0.05)
    return original(*args, **kwargs)
writer.write_shard = gated
sys.argv = ["kdcli", *sys.argv[3:]]
from kdcli.cli import main
main()
"""


def start_kdcli(script: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for(condition, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_two_prepares_into_one_out_second_is_refused_while_the_first_runs(multieye_raw, tmp_path):
    out, started, gate = tmp_path / "shards", tmp_path / "started", tmp_path / "gate"
    first = start_kdcli(GATED, started, gate, *prepare_args(multieye_raw, out))
    try:
        wait_for(lambda: started.exists() or first.poll() is not None)
        partial = Path(str(out) + ".partial")
        before = snapshot(partial)
        for extra in ([], ["--overwrite"], ["--resume"]):  # other sizes too: the mixed-size dataset
            result = kdcli_run("prepare", "multieye", multieye_raw, "--out", out, "--size", "24", *extra, ok=False)
            assert_error(result, 1, "in use by", f"pid {first.pid}", str(out))
        assert snapshot(partial) == before and not out.exists()  # the first run's staging folder untouched
    finally:
        gate.touch()
        output, _ = first.communicate(timeout=120)
    assert first.returncode == 0, output
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["prepare"]["size"] == 32
    for shard in (out / "shards").glob("*.h5"):
        with h5py.File(shard, "r") as handle:
            assert all(handle[name].shape[1:3] == (32, 32) for name in ("fundus", "oct") if name in handle)
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------ kill -9 during prepare, then --resume
KILLED = """
import os, signal, sys
import kdcli.shards.writer as writer
after = int(sys.argv[1])
original = writer._Appender.add
calls = [0]
def add(self, arrays, hasher):
    calls[0] += 1
    if calls[0] > after:  # mid-shard: its temporary file is half-written
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, arrays, hasher)
writer._Appender.add = add
sys.argv = ["kdcli", *sys.argv[2:]]
from kdcli.cli import main
main()
"""


@pytest.mark.slow
def test_kill_9_during_prepare_then_resume_equals_a_clean_run(multieye_raw, tmp_path):
    out = tmp_path / "shards"
    killed = start_kdcli(KILLED, 30, *prepare_args(multieye_raw, out))
    killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL
    partial = Path(str(out) + ".partial")
    assert list((partial / "shards").glob(".*.tmp")) and lock_path(out).exists()  # what the kill left
    result = kdcli_run(*prepare_args(multieye_raw, out, "--resume"))
    assert "took over the stale lock" in result.output and f"pid {killed.pid}" in result.output
    assert leftovers(tmp_path) == [] and not partial.exists()
    clean = tmp_path / "clean"
    kdcli_run(*prepare_args(multieye_raw, clean))
    assert dataset_content(out) == dataset_content(clean)  # byte for byte the dataset of an uninterrupted run


# ----------------------------------------------------------------- --workers 2: workers die with the parent
STUCK_WORKERS = """
import os, pathlib, sys, time
import kdcli.shards.writer as writer
pids = pathlib.Path(sys.argv[1])
def stuck(*args, **kwargs):
    (pids / str(os.getpid())).touch()
    time.sleep(600)
writer.write_shard = stuck
sys.argv = ["kdcli", *sys.argv[2:]]
from kdcli.cli import main
main()
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_killing_prepare_kills_its_workers(multieye_raw, tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    parent = start_kdcli(STUCK_WORKERS, pids, *prepare_args(multieye_raw, tmp_path / "out", "--workers", "2"))
    workers: list[int] = []
    try:
        wait_for(lambda: len(list(pids.iterdir())) >= 2 or parent.poll() is not None)
        workers = [int(p.name) for p in pids.iterdir()]
        assert len(workers) == 2 and all(alive(pid) for pid in workers)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 15
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [pid for pid in workers if alive(pid)]
        assert survivors == [], f"workers {survivors} outlived their parent"
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()


# ------------------------------------------------------- --resume on a .partial folder that lost its plan
def crashed_partial(raw: Path, out: Path, monkeypatch) -> Path:
    """A prepare (size 16) that died after some shards, with its plan.json gone."""
    from kdcli.errors import KdcliError
    from kdcli.sources.multieye import MultiEyeSource

    original, calls = MultiEyeSource.load, {"n": 0}

    def flaky(self, record, size):
        calls["n"] += 1
        if calls["n"] > 40:
            raise KdcliError("simulated crash")
        return original(self, record, size)

    with monkeypatch.context() as patch:
        patch.setattr(MultiEyeSource, "load", flaky)
        assert_error(kdcli_run("prepare", "multieye", raw, "--out", out, "--size", "16", "--shard-size", "16",
                               ok=False), 1,
                     "simulated crash")
    partial = Path(str(out) + ".partial")
    assert list((partial / "shards").glob("*.h5"))
    (partial / "plan.json").unlink()
    return partial


@pytest.mark.parametrize(("flags", "needle"), [
    (["--size", "24"], "size 16 there, 24 now"),
    (["--size", "16", "--median", "3"], "'median': 0} there, {'clahe': False, 'median': 3} now"),
    (["--size", "16", "--compression", "gzip"], "compression None there, 'gzip' now"),
])
def test_resume_without_its_plan_refuses_shards_of_other_arguments(multieye_raw, tmp_path, monkeypatch, flags,
                                                                   needle):
    out = tmp_path / "shards"
    partial = crashed_partial(multieye_raw, out, monkeypatch)
    before = snapshot(partial)
    result = kdcli_run("prepare", "multieye", multieye_raw, "--out", out, "--resume", "--shard-size", "16", *flags,
                       ok=False)
    line = assert_error(result, 1, "written with other arguments", str(partial / "shards"), "drop --resume")
    assert needle in line
    assert snapshot(partial) == before and not out.exists()


def test_resume_without_its_plan_with_the_same_arguments_equals_a_clean_run(multieye_raw, tmp_path, monkeypatch):
    out = tmp_path / "shards"
    crashed_partial(multieye_raw, out, monkeypatch)
    kdcli_run("prepare", "multieye", multieye_raw, "--out", out, "--resume", "--size", "16",
              "--shard-size", "16")
    clean = tmp_path / "clean"
    kdcli_run("prepare", "multieye", multieye_raw, "--out", clean, "--size", "16", "--shard-size", "16")
    assert dataset_content(out) == dataset_content(clean) and leftovers(tmp_path) == []


def test_a_dataset_moved_aside_by_a_run_killed_mid_swap_is_put_back(multieye_raw, multieye_shards, tmp_path):
    """Killed between moving the old --out aside and the new one in: the next run restores it, never deletes it."""
    out = tmp_path / "shards"
    shutil.copytree(multieye_shards, out.with_name(f".{out.name}.old-4242-1700000000"))
    before = snapshot(out.with_name(f".{out.name}.old-4242-1700000000"))
    # no --overwrite: the restored dataset is refused, kept
    result = kdcli_run(*prepare_args(multieye_raw, out), ok=False)
    assert_error(result, 1, str(out), "output directory exists", "--overwrite")
    assert "restored the previous one" in result.output and snapshot(out) == before
    assert leftovers(tmp_path) == []


def test_resume_cleans_temporaries_a_killed_run_left(multieye_raw, tmp_path, monkeypatch):
    out = tmp_path / "shards"
    partial = crashed_partial(multieye_raw, out, monkeypatch)
    for name in (".train-oct-00000.h5.999999.tmp", ".train-fundus-00001.h5.999998.tmp"):
        (partial / "shards" / name).write_bytes(b"half a shard")
    (partial / ".manifest.parquet.tmp").write_bytes(b"half a manifest")
    (partial / ".dataset.json.abc123.tmp").write_bytes(b"{")
    kdcli_run("prepare", "multieye", multieye_raw, "--out", out, "--resume", "--size", "16", "--shard-size", "16")
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------- disk full: prepare
WRITE_FAULTS = {  # what a full disk looks like at each layer under prepare's writes
    "shard sample (OSError)": ("kdcli.shards.writer._Appender.add", OSError(errno.ENOSPC, "No space left on device")),
    "shard flush (h5py RuntimeError)": ("h5py.File.flush", RuntimeError(
        "Unable to synchronously flush file (file write failed: time = Mon, filename = 'x.tmp', file descriptor = 3, "
        "errno = 28, error message = 'No space left on device', buf = 0x0, total write size = 976)")),
    "manifest (polars ComputeError)": ("polars.DataFrame.write_parquet", pl.exceptions.ComputeError(
        "parquet: File out of specification: underlying IO error: No space left on device (os error 28)")),
    "plan.json (OSError)": ("kdcli.shards.format.write_bytes_synced", OSError(errno.ENOSPC, "No space left on device")),
}


@pytest.mark.parametrize(("fault", "workers"), [(fault, workers) for fault in WRITE_FAULTS for workers in "12"
                                                 if workers == "1" or fault.startswith("shard")])  # shards: in workers
def test_prepare_on_a_full_disk_is_one_line_and_keeps_the_old_dataset(fault, workers, multieye_raw,
                                                                        multieye_shards, tmp_path, monkeypatch):
    target, error = WRITE_FAULTS[fault]
    out = tmp_path / "shards"
    shutil.copytree(multieye_shards, out)
    before = snapshot(out)

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(target, fail)  # forked workers inherit it
    result = kdcli_run(*prepare_args(multieye_raw, out, "--overwrite", "--workers", workers), ok=False)
    assert_error(result, 1, "no space left on device", str(out), "--resume")
    assert snapshot(out) == before  # the earlier dataset, byte for byte
    assert leftovers(tmp_path) == []  # the .partial folder keeps finished shards only, for --resume


# ------------------------------------------------------------------------- --out that is a regular file
@pytest.mark.parametrize("command", ["prepare", "prepare --overwrite", "explain", "explain --overwrite", "teach"])
def test_out_that_is_a_regular_file_is_refused_and_left_alone(command, multieye_raw, multieye_shards,
                                                              fake_checkpoint, tmp_path):
    regular = tmp_path / "a-file"
    regular.write_bytes(b"precious")
    argv = {
        "prepare": prepare_args(multieye_raw, regular),
        "prepare --overwrite": prepare_args(multieye_raw, regular, "--overwrite"),
        "explain": ["explain", fake_checkpoint, "--data", multieye_shards, "--out", regular],
        "explain --overwrite": ["explain", fake_checkpoint, "--data", multieye_shards, "--out", regular,
                                "--overwrite"],
        "teach": ["teach", "--data", multieye_shards, "--modality", "oct", "--out", regular / "oct.pt", *TINY],
    }[command]
    result = kdcli_run(*argv, ok=False)
    assert result.exit_code != 0
    error_line(result.output, str(regular), "file")
    assert regular.read_bytes() == b"precious" and leftovers(tmp_path) == []


@pytest.mark.parametrize("command", ["teach", "explain"])
def test_a_run_failing_after_it_took_the_lock_leaves_no_folder_behind(command, fake_checkpoint, tmp_path):
    missing = tmp_path / "no-such-dataset"
    argv = {"teach": ["teach", "--data", missing, "--modality", "oct", "--out", tmp_path / "new" / "deep" / "oct.pt",
                      *TINY],
            "explain": ["explain", fake_checkpoint, "--data", missing, "--out", tmp_path / "new" / "deep" / "ex"]}
    result = kdcli_run(*argv[command], ok=False)
    assert_error(result, 1, str(missing))
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------- explain into a folder
def make_explain_folder(folder: Path) -> dict[str, str]:
    """An earlier report (page, JSON, a panel it lists, a panel of a still earlier run mixed in by old kdcli) and
    a file of the user's."""
    folder.mkdir(parents=True)
    (folder / "index.html").write_text("<html>old report</html>")
    (folder / "explain.json").write_text('{"images": [{"file": "1_old_image.png"}]}')
    (folder / "1_old_image.png").write_bytes(b"old png")
    (folder / "07_older_run.png").write_bytes(b"older png")
    (folder / "notes.txt").write_text("mine")
    return snapshot(folder)


def test_explain_into_an_earlier_report_is_refused_without_overwrite(fake_checkpoint, multieye_shards, tmp_path):
    out = tmp_path / "explain"
    before = make_explain_folder(out)
    result = kdcli_run("explain", fake_checkpoint, "--data", multieye_shards, "--out", out, ok=False)
    assert_error(result, 1, str(out), "earlier explain report", "--overwrite")
    assert snapshot(out) == before and leftovers(tmp_path) == []


@pytest.mark.slow
def test_explain_overwrite_replaces_the_report_as_a_whole(oct_teacher, multieye_shards, tmp_path):
    out = tmp_path / "explain"
    make_explain_folder(out)
    kdcli_run("explain", oct_teacher, "--data", multieye_shards, "--out", out, "--count", "3",
              "--overwrite")
    report = json.loads((out / "explain.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted(["explain.json", "index.html", "notes.txt", "curves.png",
                                                            *(r["file"] for r in report["images"])])
    assert (out / "notes.txt").read_text() == "mine" and leftovers(tmp_path) == []


@pytest.mark.slow
def test_explain_into_a_new_folder_is_renamed_into_place_whole(oct_teacher, multieye_shards, tmp_path,
                                                               monkeypatch):
    import kdcli.explain.run as run

    seen = {}
    original = run.write_report

    def look_while_writing(out, report, page):
        seen["visible"] = (tmp_path / "new").exists()  # nothing at --out before the report is complete
        return original(out, report, page)

    monkeypatch.setattr(run, "write_report", look_while_writing)
    kdcli_run("explain", oct_teacher, "--data", multieye_shards, "--out", tmp_path / "new", "--count", "2")
    assert seen == {"visible": False} and (tmp_path / "new" / "index.html").is_file()
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_explain_on_a_full_disk_keeps_the_earlier_report(oct_teacher, multieye_shards, tmp_path, monkeypatch):
    out = tmp_path / "explain"
    before = make_explain_folder(out)
    monkeypatch.setattr("kdcli.shards.format.write_bytes_synced", enospc)
    result = kdcli_run("explain", oct_teacher, "--data", multieye_shards, "--out", out, "--count", "3",
                       "--overwrite", ok=False)
    line = assert_error(result, 1, "no space left on device", str(out))
    assert ".staging-" not in line  # names the file asked for, not the folder it was built in
    assert snapshot(out) == before and leftovers(tmp_path) == []


@pytest.mark.slow
def test_explain_on_a_full_disk_leaves_no_empty_folder(oct_teacher, multieye_shards, tmp_path, monkeypatch):
    monkeypatch.setattr("kdcli.shards.format.write_bytes_synced", enospc)
    result = kdcli_run("explain", oct_teacher, "--data", multieye_shards, "--out", tmp_path / "new", "--count", "2",
                       ok=False)
    assert_error(result, 1, "no space left on device", str(tmp_path / "new"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ disk full: evaluate
@pytest.mark.slow
@pytest.mark.parametrize("what", ["figure", "predictions"])
def test_evaluate_on_a_full_disk_is_one_line_and_leaves_nothing(what, oct_teacher, multieye_shards, tmp_path,
                                                                monkeypatch):
    import matplotlib.figure
    import polars as pl

    target = tmp_path / "new" / "folder" / ("cm.png" if what == "figure" else "preds.csv")
    if what == "figure":
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", enospc)
        args = ["--figure", target]
    else:
        monkeypatch.setattr(pl.DataFrame, "write_csv", enospc)
        args = ["--figure", tmp_path / "cm.png", "--predictions", target]
    before = snapshot(oct_teacher.parent)
    result = kdcli_run("evaluate", oct_teacher, "--data", multieye_shards, *args, ok=False)
    assert_error(result, 1, "no space left on device", str(target))
    assert not (tmp_path / "new").exists()  # the folders made for the file went with it
    assert snapshot(oct_teacher.parent) == before and leftovers(tmp_path) == []


# ------------------------------------------------------------------------- teach: a failing --overwrite
def copy_result(checkpoint: Path, folder: Path) -> Path:
    from kdcli.engine.publish import result_files

    folder.mkdir()
    for path in result_files(checkpoint):
        shutil.copy2(path, folder / path.name)
    return folder / checkpoint.name


def fail_at_save(number: int, error: BaseException):
    """save_checkpoint's writer failing at its `number`-th call (1: the first best checkpoint)."""
    import kdcli.engine.checkpoint as checkpoint

    original, calls = checkpoint._torch_save, {"n": 0}

    def save(payload, tmp):
        calls["n"] += 1
        if calls["n"] >= number:
            raise error
        return original(payload, tmp)

    return save


@pytest.mark.slow
@pytest.mark.parametrize(("save", "error", "code", "prefix", "needle"), [
    (1, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), 1, "error: ", "no space left on device"),  # best
    (2, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), 1, "error: ", "no space left on device"),  # last state
    (3, KeyboardInterrupt(), 130, "interrupted", "finished outputs are intact"),  # Ctrl-C in epoch 2
], ids=["disk full at the first checkpoint", "disk full at the last state", "Ctrl-C in the second epoch"])
def test_a_failing_teach_overwrite_keeps_the_old_checkpoint_and_sidecars(save, error, code, prefix, needle,
                                                                         oct_teacher, multieye_shards, tmp_path,
                                                                         monkeypatch):
    from kdcli.engine.publish import result_files

    out = copy_result(oct_teacher, tmp_path / "run")
    assert all(p.exists() for p in result_files(out))  # config, metrics, last state and checkpoint
    before = snapshot(out.parent)
    monkeypatch.setattr("kdcli.engine.checkpoint._torch_save", fail_at_save(save, error))
    result = kdcli_run("teach", "--data", multieye_shards, "--modality", "oct", "--out", out, "--overwrite",
                       "--epochs", "2", "--batch-size", "16", "--workers", "0", "--model", "test_resnet", ok=False)
    assert result.exit_code == code, result.output
    error_line(result.output, needle, *([str(out.parent)] if code == 1 else []), prefix=prefix)
    assert "staged" not in result.output
    assert snapshot(out.parent) == before and leftovers(tmp_path) == []


@pytest.mark.slow
def test_a_teach_overwrite_that_succeeds_replaces_every_sidecar(oct_teacher, multieye_shards, tmp_path):
    from kdcli.engine.publish import result_files

    out = copy_result(oct_teacher, tmp_path / "run")
    before = snapshot(out.parent)
    kdcli_run("teach", "--data", multieye_shards, "--modality", "oct", "--out", out, "--overwrite",
              "--epochs", "1", "--batch-size", "16", "--workers", "0", "--model", "test_resnet", "--seed", "7")
    after = snapshot(out.parent)
    assert set(after) == set(before) and all(after[k] != before[k] for k in after)
    assert json.loads((out.parent / "oct.config.json").read_text())["seed"] == 7
    assert len((out.parent / "oct.metrics.jsonl").read_text().splitlines()) == 1
    assert all(p.exists() for p in result_files(out)) and leftovers(tmp_path) == []


@pytest.mark.slow
def test_teach_on_a_full_disk_names_the_checkpoint(multieye_shards, tmp_path, monkeypatch):
    monkeypatch.setattr("kdcli.engine.checkpoint._torch_save", fail_at_save(1, OSError(errno.ENOSPC, "full")))
    out = tmp_path / "oct.pt"
    result = kdcli_run("teach", "--data", multieye_shards, "--modality", "oct", "--out", out, *TINY, ok=False)
    assert_error(result, 1, f"{out}: no space left on device")
    assert not out.exists() and leftovers(tmp_path) == []


# --------------------------------------------------------------------- OpenCV's own warning is silenced
def test_a_truncated_png_is_one_line_without_opencvs_warning(multieye_raw, tmp_path, capfd):
    raw = tmp_path / "raw"
    shutil.copytree(multieye_raw, raw)
    image = sorted((raw / "assemble" / "train").rglob("*.png"))[0]
    image.write_bytes(image.read_bytes()[:200])
    capfd.readouterr()
    result = kdcli_run(*prepare_args(raw, tmp_path / "out"), ok=False)
    assert_error(result, 1, str(image), "will not decode")
    assert "WARN" not in capfd.readouterr().err  # OpenCV writes to file descriptor 2 itself


# ---------------------------------------------------------------- the real thing: tmpfs and read-only mounts
def can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || "
                            "mount -t tmpfs -o size=64k tmpfs /tmp"], capture_output=True)
    return probe.returncode == 0


needs_mounts = pytest.mark.skipif(not can_unshare(), reason="needs `unshare -rm` to mount a tmpfs unprivileged")


def kdcli_in_namespace(setup: str, argv: list) -> subprocess.CompletedProcess:
    """Run `kdcli argv` in a private mount namespace after the shell commands `setup` (mounts)."""
    command = " ".join(f"'{a}'" for a in [sys.executable, "-m", "kdcli", *map(str, argv)])
    return subprocess.run(["unshare", "-rm", "sh", "-c", f"{setup} && exec {command}"], capture_output=True,
                          text=True, env=ENV, timeout=300)


@pytest.mark.slow
@needs_mounts
@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("space", ["8k", "120k", "200k", "300k"])  # the disk fills in various writes
def test_prepare_onto_a_real_full_tmpfs(multieye_raw, tmp_path, workers, space):
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "shards"
    result = kdcli_in_namespace(f"mount -t tmpfs -o size={space} tmpfs {disk}",
                                prepare_args(multieye_raw, out, "--workers", workers))
    assert result.returncode == 1, result.stderr  # never 139
    error_line(result.stderr, "no space left on device", str(out))
    # the tmpfs is gone with the namespace: what it held cannot be looked at here, the injected cases do


@pytest.mark.slow
@needs_mounts
def test_teach_evaluate_explain_onto_a_real_full_tmpfs(oct_teacher, multieye_shards, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = f"mount -t tmpfs -o size=16k tmpfs {disk}"
    teach = kdcli_in_namespace(mount, ["teach", "--data", multieye_shards, "--modality", "oct", "--out",
                                       disk / "oct.pt", *TINY])
    assert teach.returncode == 1, teach.stderr
    error_line(teach.stderr, "no space left on device", str(disk))
    evaluate = kdcli_in_namespace(mount, ["evaluate", oct_teacher, "--data", multieye_shards, "--figure",
                                          disk / "cm.png", "--predictions", disk / "p.csv"])
    assert evaluate.returncode == 1, evaluate.stderr
    error_line(evaluate.stderr, "no space left on device", str(disk))
    explain = kdcli_in_namespace(mount, ["explain", oct_teacher, "--data", multieye_shards, "--out",
                                         disk / "explain"])
    assert explain.returncode == 1, explain.stderr
    error_line(explain.stderr, "no space left on device", str(disk / "explain"))


def read_only(folder: Path) -> str:
    """Shell commands making `folder` read-only for everyone, root included (a read-only bind mount)."""
    return f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder}"


@pytest.mark.slow
@needs_mounts
@pytest.mark.parametrize("command", ["prepare", "teach", "explain", "evaluate"])
def test_a_read_only_output_folder_is_one_line(command, multieye_raw, multieye_shards, oct_teacher, tmp_path):
    folder = tmp_path / "ro"
    checkpoint = copy_result(oct_teacher, folder)
    before = snapshot(folder)
    argv, needles = {
        "prepare": (prepare_args(multieye_raw, folder / "shards"), ["writable"]),
        "teach": (["teach", "--data", multieye_shards, "--modality", "oct", "--out", folder / "new.pt", *TINY],
                  ["writable"]),
        "explain": (["explain", oct_teacher, "--data", multieye_shards, "--out", folder / "explain"], ["writable"]),
        "evaluate": (["evaluate", checkpoint, "--data", multieye_shards], ["--figure PATH"]),
    }[command]
    result = kdcli_in_namespace(read_only(folder), argv)
    assert result.returncode == 1, result.stderr
    error_line(result.stderr, str(folder), "cannot write here", "Read-only file system", *needles)
    assert snapshot(folder) == before


# ----------------------------------------------------------------------------------- the error types
def test_disk_full_errors_survive_pickling_from_workers():
    import pickle

    from kdcli.errors import DiskFull, Unwritable

    for error in (DiskFull(Path("/x/a.h5"), "hint"), Unwritable(Path("/x"), "Permission denied")):
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and str(again) == str(error)


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    RuntimeError("Can't decrement id ref count (file write failed: errno = 28, error message = 'No space left')"),
    Exception("parquet: underlying IO error: No space left on device (os error 28)"),
])
def test_disk_full_is_recognised_however_a_library_wraps_it(error):
    from kdcli.errors import is_disk_full

    assert is_disk_full(error)
    assert not is_disk_full(OSError(errno.ENOENT, "No such file"))
    assert not is_disk_full(RuntimeError("errno = 2, error message = 'No such file or directory'"))


def test_a_failed_hdf5_write_closes_cleanly_and_deletes_its_file(tmp_path):
    """The exit-time segfault HDF5 gives after a failed write: reproduced in a child, which must exit 0."""
    script = f"""
import errno, os, numpy as np, h5py
from kdcli.storage import new_h5
from kdcli.errors import DiskFull
def full(self):
    raise RuntimeError("Unable to synchronously flush file (errno = 28, error message = 'No space left')")
h5py.File.flush = full
try:
    with new_h5('{tmp_path}/x.tmp', '{tmp_path}/x.h5') as handle:
        handle.create_dataset('a', data=np.zeros((4, 8)))
except DiskFull as exc:
    print(exc)
assert not os.path.exists('{tmp_path}/x.tmp')
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{tmp_path}/x.h5: no space left on device — free some space (or write to " \
                                    "another disk), then rerun" and result.stderr == ""
