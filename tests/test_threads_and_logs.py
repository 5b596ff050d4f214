"""Threads chosen from the CPUs this process may use, the first contact (--version, --help defaults, typed demo
JSON, --config), and what a training run tells: the start-up line, progress lines in logs, trackers, the curve
PNG beside the checkpoint and the provenance in its meta."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
from conftest import kdcli_run

from kdcli.cli import app
from kdcli.engine import threads as thread_choice
from kdcli.errors import UsageError

TINY = ["--model", "test_resnet", "--batch-size", "8", "--workers", "0", "--lr", "3e-3"]


# ------------------------------------------------------------------------------------------------ threads
def test_threads_are_the_usable_cpus_less_workers_and_busy_ones():
    choose = thread_choice.choose_threads
    four = {0, 1, 2, 3}
    assert choose(0, 0, environ={}, cpus=four, limit=None, busy=0.0).threads == 4
    assert choose(0, 1, environ={}, cpus=four, limit=None, busy=0.0).threads == 3
    assert choose(0, 1, environ={}, cpus=four, limit=None, busy=1.2).threads == 2  # a busy neighbour's CPU
    assert choose(0, 8, environ={}, cpus=four, limit=None, busy=0.0).threads == 1  # never fewer than one
    assert choose(0, 0, environ={}, cpus=set(range(8)), limit=1.5, busy=0.0).threads == 2  # cgroup quota 1.5 CPUs
    assert choose(0, 0, environ={}, cpus=four, limit=None, processes=2).threads == 2  # torchrun: a share per rank
    choice = choose(0, 1, environ={}, cpus={0, 1}, limit=None, busy=1.0)
    assert (choice.threads, choice.source) == (1, "auto")
    assert choice.describe() == "threads 1 (auto: 2 CPUs, 1 workers, 1.0 busy elsewhere)"


def test_an_explicit_thread_count_wins_over_the_choice():
    choose = thread_choice.choose_threads
    assert choose(5, 1, environ={"OMP_NUM_THREADS": "2"}, cpus={0}).describe() == "threads 5 (--threads)"
    assert choose(0, 1, environ={"OMP_NUM_THREADS": "2"}, cpus={0}).describe() == "threads 2 (OMP_NUM_THREADS)"
    with pytest.raises(UsageError, match="OMP_NUM_THREADS='two'"):
        choose(0, 0, environ={"OMP_NUM_THREADS": "two"})
    with pytest.raises(UsageError, match="--threads -1"):
        choose(-1)


def test_the_affinity_mask_and_cgroup_quota_are_read(monkeypatch, tmp_path):
    monkeypatch.setattr(thread_choice.os, "sched_getaffinity", lambda pid: {3, 5, 7}, raising=False)
    assert thread_choice.allowed_cpus() == {3, 5, 7}
    choice = thread_choice.choose_threads(0, 0, environ={}, limit=None, busy=0.0)
    assert (choice.threads, choice.cpus) == (3, 3)
    v2, v1 = tmp_path / "cpu.max", (tmp_path / "quota", tmp_path / "period")
    v2.write_text("150000 100000\n")
    assert thread_choice.cgroup_cpu_limit(v2, v1) == 1.5
    v2.write_text("max 100000\n")
    assert thread_choice.cgroup_cpu_limit(v2, v1) is None
    v2.unlink()
    v1[0].write_text("200000\n")
    v1[1].write_text("100000\n")
    assert thread_choice.cgroup_cpu_limit(v2, v1) == 2.0
    v1[0].write_text("-1\n")
    assert thread_choice.cgroup_cpu_limit(v2, v1) is None


def test_busy_cpus_are_counted_on_the_allowed_cpus_only():
    stat = ("cpu  100 0 100 800 0 0 0 0 0 0\n"
            "cpu0 90 0 10 0 0 0 0 0 0 0\n"  # all busy
            "cpu1 10 0 0 80 10 0 0 0 0 0\n"  # idle and iowait are not busy
            "intr 123\n")
    assert thread_choice._cpu_jiffies(stat, {0}) == (100, 100)
    assert thread_choice._cpu_jiffies(stat, {1}) == (10, 100)
    assert thread_choice._cpu_jiffies(stat, {0, 1}) == (110, 200)


def test_an_automatic_count_follows_the_load_between_epochs(monkeypatch, tmp_path):
    """2 CPUs, nothing else running at the start: 2 threads. An epoch later a neighbour has kept one CPU busy
    (both CPUs busy, this process used one): 1 thread. Once it has gone: 2 again. An explicit count stays."""
    clock = {"wall": 0.0, "cpu": 0.0}
    monkeypatch.setattr(thread_choice, "allowed_cpus", lambda: {0, 1})
    monkeypatch.setattr(thread_choice.time, "perf_counter", lambda: clock["wall"])
    monkeypatch.setattr(thread_choice.time, "process_time", lambda: clock["cpu"])
    monkeypatch.setattr(thread_choice, "children_cpu_seconds", lambda: 0.0)
    stat = tmp_path / "stat"
    jiffies = {"busy": [0, 0], "idle": [0, 0]}

    def epoch(seconds: float, mine: float, busy: tuple[int, int]) -> None:
        clock["wall"] += seconds
        clock["cpu"] += mine
        for cpu in (0, 1):
            jiffies["busy"][cpu] += busy[cpu]
            jiffies["idle"][cpu] += int(100 * seconds) - busy[cpu]
        stat.write_text("cpu  0 0 0 0 0 0 0 0\n" + "".join(
            f"cpu{c} {jiffies['busy'][c]} 0 0 {jiffies['idle'][c]} 0 0 0 0\n" for c in (0, 1)))

    epoch(0, 0, (0, 0))
    start = thread_choice.choose_threads(0, 0, environ={}, cpus={0, 1}, limit=None, busy=0.0)
    watch = thread_choice.LoadWatch(start, stat)
    epoch(10, 20, (1000, 1000))  # both CPUs busy for 10 s, all of it this process's 2 threads
    assert watch.update() is None
    epoch(10, 10, (1000, 1000))  # both busy, this process only 10 CPU-seconds: a neighbour held one CPU
    assert watch.update() == thread_choice.ThreadChoice(1, "auto", 2, 0, 1.0)
    epoch(10, 10, (1000, 0))  # the neighbour has gone
    assert watch.update().threads == 2
    fixed = thread_choice.LoadWatch(thread_choice.choose_threads(2, 0), stat)
    epoch(10, 10, (1000, 1000))
    assert fixed.update() is None


def test_live_children_cpu_time_is_read_from_proc(tmp_path):
    import os

    task = tmp_path / "self" / "task" / "41"
    task.mkdir(parents=True)
    (task / "children").write_text("42 43\n")
    tick = os.sysconf("SC_CLK_TCK")
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "stat").write_text("42 (pt_data_worker) S 41 " + "0 " * 9 + f"{3 * tick} {tick} 0 0\n")
    assert thread_choice.children_cpu_seconds(tmp_path) == pytest.approx(4.0)  # 43 exited: skipped


# ------------------------------------------------------------------------------------------ first contact
def test_version_prints_kdcli_torch_and_timm_without_importing_them():
    from test_cli_basics import _probe

    from kdcli import __version__

    result = kdcli_run("--version")
    assert result.stdout.startswith(f"kdcli {__version__} (torch ") and "timm " in result.stdout
    _, heavy, code = _probe(["--version"])
    assert code == 0 and heavy == []


def test_help_shows_the_defaults_that_actually_run():
    import typer.main

    from kdcli.engine.loop import EngineConfig

    engine = EngineConfig()
    shown = {"epochs": engine.epochs, "batch_size": engine.batch_size, "lr": engine.lr, "seed": engine.seed,
             "workers": engine.workers, "threads": engine.threads, "patience": engine.patience,
             "device": engine.device, "amp": engine.amp}
    group = typer.main.get_command(app)
    for name in ("teach", "distill"):
        params = {p.name: p for p in group.commands[name].params}
        for key, value in shown.items():
            assert params[key].show_default == str(value), (name, key, params[key].show_default)
    text = kdcli_run("teach", "--help", env={"COLUMNS": "200"}, ok=False).stdout
    epochs = next(line for line in text.splitlines() if line.lstrip("│ ").startswith("--epochs"))
    assert f"{engine.epochs})" in epochs and "100" not in epochs


def test_demo_json_options_keep_their_types():
    from kdcli.demo import METRICS, DemoOptions, _results

    runs = {role: [{m: 0.5 for m in METRICS}] for role in ("teacher (OCT)", "baseline (fundus)",
                                                               "CoDA student (fundus)")}
    results = _results(DemoOptions(Path("demo-out"), epochs=7, threads=1), runs, METRICS, "t", 0.0, "multieye")
    options = json.loads(json.dumps(results))["options"]
    assert options["epochs"] == 7 and isinstance(options["epochs"], int)
    assert options["lr"] == 3e-3 and options["threads"] == 1 and options["method_params"] is None
    assert options["out"] == "demo-out"


def test_every_option_and_the_data_can_come_from_a_config_file(tmp_path):
    from kdcli.train import resolve_config

    config = tmp_path / "run.yaml"
    config.write_text("data: shards/multieye\nstudent: fundus\nteacher: oct.pt\nepochs: 4\nthreads: 1\n"
                      "log_every: 5\nallow_partial: true\nparams: {alpha: 2}\nprovenance: {command: kdcli x}\n")
    cfg = resolve_config({"epochs": None, "threads": None, "lr": 0.01}, config)
    assert (cfg.data, cfg.modality, cfg.teacher, cfg.allow_partial) == ("shards/multieye", "fundus", ["oct.pt"], True)
    assert (cfg.engine.epochs, cfg.engine.threads, cfg.engine.log_every, cfg.engine.lr) == (4, 1, 5, 0.01)
    assert cfg.params == {"alpha": 2}


def test_only_rank_zero_speaks(monkeypatch, capsys):
    from kdcli.cli.common import rank_zero_log

    monkeypatch.setenv("RANK", "1")
    rank_zero_log()("from rank 1")
    monkeypatch.setenv("RANK", "0")
    rank_zero_log()("from rank 0")
    assert capsys.readouterr().err == "from rank 0\n"


# --------------------------------------------------------------------------------------------------- logs
def test_progress_lines_in_logs_carry_rate_and_eta():
    from kdcli.engine.progress import batch_progress, clock, progress_interval

    lines: list[str] = []
    with batch_progress(20, "epoch 1/3", lines.append, every=5, later_batches=40, interactive=False) as advance:
        for _ in range(20):
            advance(8)
    assert [line.split("  ")[1] for line in lines] == ["batch 5/20", "batch 10/20", "batch 15/20"]
    assert all(line.startswith("epoch 1/3") and "img/s" in line and "ETA " in line and "training" in line
               for line in lines)
    assert progress_interval(1000) == 100 and progress_interval(30) == 10 and progress_interval(30, every=3) == 3
    assert clock(42) == "0:42" and clock(3725) == "1:02:05"


def test_a_missing_tracker_package_is_one_line_before_anything_is_written(monkeypatch, multieye_shards, tmp_path):
    from kdcli.engine import trackers

    real = importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    result = kdcli_run("teach", "--data", str(multieye_shards), "--modality", "oct", "--out",
                       str(tmp_path / "oct.pt"), "--log", "tensorboard", *TINY, ok=False)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: --log tensorboard needs the tensorboard package, which is not installed: pip install "
        "'kdcli[tensorboard]' (or drop --log tensorboard; CSV/JSONL logs are written anyway)"]
    assert not any(tmp_path.iterdir())
    with pytest.raises(UsageError, match="--log wandb: use tensorboard or mlflow"):
        trackers.parse_log("wandb")


def test_selected_epoch_and_loss_terms_are_read_from_the_metrics_log():
    from kdcli.engine.curves import loss_terms, selected_epoch

    rows = [{"epoch": 1, "train_loss": 2.0, "train_ce": 1.5, "train_glob": 0.5, "train_gate": 1.0,
             "train_samples_per_s": 50.0, "dev_macro_f1": 0.2},
            {"epoch": 2, "train_loss": 1.0, "train_ce": 0.8, "train_glob": 0.2, "train_gate": 1.0, "dev_macro_f1": 0.6},
            {"epoch": 3, "train_loss": 0.9, "train_ce": 0.7, "train_glob": 0.2, "train_gate": 1.0, "dev_macro_f1": 0.6}]
    assert selected_epoch(rows, "macro_f1") == 2  # the first best: the engine saves on a strict gain only
    assert loss_terms(rows, diagnostics=("_gate",)) == ["train_loss", "train_ce", "train_glob"]


def test_the_curve_png_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    import matplotlib.figure

    from kdcli.engine.curves import curves_path, write_curves

    out = tmp_path / "m.pt"
    rows = [{"epoch": e, "train_loss": 1.0 / e, "dev_macro_f1": 0.1 * e} for e in (1, 2, 3)]
    (tmp_path / "m.metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert write_curves(out, "macro_f1") == curves_path(out) == tmp_path / "m.curves.png"
    good = curves_path(out).read_bytes()
    assert good.startswith(b"\x89PNG")

    def broken(self, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        write_curves(out, "macro_f1")
    assert curves_path(out).read_bytes() == good  # the old figure is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.curves.png", "m.metrics.jsonl"]  # no half file


def test_a_figure_that_cannot_be_drawn_is_a_note_not_a_failed_run(monkeypatch, tmp_path):
    from kdcli.engine import curves, loop

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(curves, "write_curves", broken)
    lines: list[str] = []
    loop._draw_curves(tmp_path / "m.pt", loop.EngineConfig(), types.SimpleNamespace(terms=()), lines.append, "m")
    assert lines == ["note: training curves not drawn (RuntimeError: no fonts)"]


def test_provenance_names_the_command_versions_and_commit():
    from kdcli import __version__
    from kdcli.provenance import command_line, git_commit, provenance

    record = provenance(["/usr/bin/kdcli", "teach", "--data", "my shards"])
    assert record["command"] == "kdcli teach --data 'my shards'"
    assert record["kdcli"] == __version__ and record["torch"] and record["timm"] and "cuda" in record
    assert command_line([str(Path("kdcli") / "__main__.py"), "evaluate", "m.pt"]) == "kdcli evaluate m.pt"
    commit = git_commit()
    if commit is not None:  # running from a checkout
        assert len(commit["commit"]) == 40 and isinstance(commit["dirty"], bool)
    assert git_commit(Path("/")) is None


@pytest.mark.slow
def test_a_training_run_says_what_it_does_and_leaves_curves_and_provenance(multieye_shards, tmp_path, monkeypatch):
    """One tiny teach through the CLI, options from a config file: the start-up line, progress lines (stderr
    is no terminal here), the epochs sent to a tracker (a stand-in mlflow), the curve PNG, provenance in the
    checkpoint and config.json, and torch's thread count restored afterwards."""
    import torch

    from kdcli.engine.checkpoint import load_checkpoint

    calls: list[tuple] = []
    fake = types.ModuleType("mlflow")
    fake.__spec__ = importlib.machinery.ModuleSpec("mlflow", None)
    fake.set_tracking_uri = lambda uri: calls.append(("uri", uri))
    fake.get_tracking_uri = lambda: "file:///tracked"
    fake.start_run = lambda run_name: calls.append(("start", run_name)) or types.SimpleNamespace(
        info=types.SimpleNamespace(run_id="r1"))
    fake.log_params = lambda params: calls.append(("params", params))
    fake.log_metrics = lambda metrics, step: calls.append(("metrics", step, metrics))
    fake.end_run = lambda: calls.append(("end",))
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    monkeypatch.setattr(sys, "argv", ["kdcli", "teach", "--config", "run.yaml"])
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {multieye_shards}\nmodality: oct\nout: {tmp_path / 'oct.pt'}\nepochs: 2\n"
                      "model: test_resnet\nbatch_size: 4\nworkers: 0\nlog_every: 2\n")
    before = torch.get_num_threads()
    result = kdcli_run("teach", "--config", str(config), "--threads", "1", "--log",
                       "mlflow=file:///tracked")
    lines = result.stderr.splitlines()
    start = lines[0]
    assert start.startswith(f"teach oct -> {tmp_path / 'oct.pt'}: method supervised (loss ce); cpu, AMP off, "
                            "threads 1 (--threads); ")
    assert "parameters (" in start and "train 27 / dev 9 samples; 6 batches of 4 per epoch, 2 epochs" in start
    progress = [line for line in lines if " batch " in line]
    assert [line.split("  ")[:2] for line in progress] == [["epoch 1/2", "batch 2/6"], ["epoch 1/2", "batch 4/6"],
                                                           ["epoch 2/2", "batch 2/6"], ["epoch 2/2", "batch 4/6"]]
    assert all("img/s  ETA " in line for line in progress)
    assert torch.get_num_threads() == before
    assert [c[:2] for c in calls if c[0] in ("uri", "start", "end")] == [("uri", "file:///tracked"),
                                                                         ("start", "oct"), ("end",)]
    tracked = [c for c in calls if c[0] == "metrics"]
    logged = [json.loads(line) for line in (tmp_path / "oct.metrics.jsonl").read_text().splitlines()]
    assert [step for _, step, _ in tracked] == [1, 2]
    assert [m["train_loss"] for _, _, m in tracked] == [row["train_loss"] for row in logged]
    png = tmp_path / "oct.curves.png"
    assert png.read_bytes().startswith(b"\x89PNG")
    meta = load_checkpoint(tmp_path / "oct.pt").meta
    saved = json.loads((tmp_path / "oct.config.json").read_text())
    for record in (meta["provenance"], saved["provenance"]):
        assert record["command"] == "kdcli teach --config run.yaml"
        assert {"kdcli", "python", "torch", "timm", "cuda", "git", "platform"} <= set(record)
    assert saved["threads"] == 1 and saved["data"] == str(multieye_shards)


@pytest.mark.slow
def test_tensorboard_gets_every_epoch(multieye_shards, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "oct.pt"
    result = kdcli_run("teach", "--data", str(multieye_shards), "--modality", "oct", "--out", str(out),
                       "--epochs", "2", "--log", "tensorboard", *TINY)
    assert f"tracking: tensorboard {tmp_path / 'oct.tensorboard'}" in result.stderr
    events = EventAccumulator(str(tmp_path / "oct.tensorboard"))
    events.Reload()
    logged = [json.loads(line) for line in (tmp_path / "oct.metrics.jsonl").read_text().splitlines()]
    scalars = events.Scalars("train/loss")
    assert [e.step for e in scalars] == [row["epoch"] for row in logged]
    assert [e.value for e in scalars] == pytest.approx([row["train_loss"] for row in logged])  # stored as float32
    assert "dev/macro_f1" in events.Tags()["scalars"]


@pytest.mark.slow
def test_a_resume_may_change_how_it_runs_threads_and_logs(multieye_shards, tmp_path):
    out = ["--data", str(multieye_shards), "--modality", "oct", "--out", str(tmp_path / "oct.pt"), *TINY]
    kdcli_run("teach", *out, "--epochs", "1", "--threads", "2")
    resumed = kdcli_run("teach", *out, "--epochs", "2", "--resume", "--threads", "1", "--set",
                        "log_every=3")
    assert "threads 1 (--threads)" in resumed.stderr and "resuming at epoch 2/2" in resumed.stderr
