"""`kdcli bench` measures (never asserts speed): check it runs both ways on the same data and reports ratios."""

from __future__ import annotations

import json

import pytest
from conftest import kdcli_run


def test_bench_loader_compares_with_png_and_plain_h5py(multieye_shards):
    result = kdcli_run("bench", "loader", str(multieye_shards), "--modality", "oct", "--workers", "0",
                       "--repeats", "1", "--batch-size", "8", "--json")
    report = json.loads(result.stdout)
    assert report["modality"] == "oct" and report["samples"] == 27
    (row,) = report["rows"]
    assert row["workers"] == 0 and row["kdcli"] > 0 and row["png_pil"] > 0
    assert abs(row["ratio"] - row["kdcli"] / row["png_pil"]) < 1e-9
    assert 0 < report["fraction_of_h5py"] == report["kdcli_no_augmentation"] / report["plain_h5py"]


def test_bench_engine_times_the_engine_the_bare_loop_and_distillation(multieye_shards, oct_teacher, tmp_path):
    import shutil

    data = tmp_path / "shards"  # the cached run writes into the shard directory: keep the shared one pristine
    shutil.copytree(multieye_shards, data)
    result = kdcli_run("bench", "engine", str(data), "--teacher", str(oct_teacher),
                       "--epochs", "2", "--batch-size", "8", "--rounds", "2", "--no-contention",
                       "--json")
    report = json.loads(result.stdout)
    assert report["engine"] > 0 and report["bare_loop"] > 0 and report["distill"] > 0
    assert len(report["rounds"]["engine"]) == len(report["rounds"]["bare_loop"]) == 2
    assert report["distill_cached_vs_student_only"] == report["engine"] / report["distill_cached"]
    rounds = report["rounds"]
    paired = sorted(1 - e / b for e, b in zip(rounds["engine"], rounds["bare_loop"], strict=True))
    assert report["engine_overhead"] == pytest.approx((paired[0] + paired[1]) / 2)  # median of per-round figures
    assert report["overhead_of_medians"] == pytest.approx(1 - report["engine"] / report["bare_loop"])
    assert kdcli_run("bench", "engine", str(data), "--epochs", "1", ok=False).exit_code == 2


def test_bench_prepare_reports_rates_efficiency_and_peak_memory(multieye_raw):
    result = kdcli_run("bench", "prepare", str(multieye_raw), "--size", "32", "--workers", "2",
                       "--scale", "2", "--json")
    report = json.loads(result.stdout)
    assert report["images"] == 90 and report["naive_pil"] > 0 and report["prepare_1_workers"] > 0
    assert report["parallel_efficiency"] == report["prepare_2_workers"] / (2 * report["prepare_1_workers"])
    assert report["peak_mib_1_workers"] > 0 and report["peak_ratio"] == report["peak_mib_scaled"] / report[
        "peak_mib_1_workers"]


@pytest.mark.slow
def test_bench_engine_times_a_competing_load_with_both_thread_choices(multieye_shards, monkeypatch):
    from kdcli import bench

    spinners = []
    monkeypatch.setattr(bench, "busy_process", lambda real=bench.busy_process: spinners.append(real()) or spinners[-1])
    result = kdcli_run("bench", "engine", str(multieye_shards), "--student", "oct", "--epochs", "2",
                       "--batch-size", "8", "--rounds", "1", "--json")
    contention = json.loads(result.stdout)["contention"]
    idle, loaded = contention["idle"], contention["loaded"]
    assert contention["default_slowdown"] == loaded["default_seconds"] / idle["default_seconds"]
    assert contention["kdcli_slowdown"] == loaded["kdcli_seconds"] / idle["kdcli_seconds"]
    assert idle["default_threads"] == loaded["default_threads"] == contention["cpus"] >= 1
    assert loaded["busy_elsewhere"] >= 0.5  # the spinner was seen while kdcli chose its threads
    assert loaded["kdcli_threads"] <= max(1, contention["cpus"] - 1)
    assert "under one competing busy process" in result.stderr
    assert len(spinners) == 1 and spinners[0].poll() is not None  # the busy process is gone
