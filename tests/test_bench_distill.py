"""`kdcli bench distill`: the paired statistics, which generator options reach the phantoms, and one tiny
end-to-end run (baseline and students on the same shards with the same seed, files written, resumable)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.errors import UsageError

ROW_KEYS = {"method", "variant", "train_size", "seeds", "baseline_mean", "student_mean", "delta_mean", "ci_low",
            "ci_high", "seeds_up"}


def test_paired_interval_matches_a_hand_computation():
    from kdcli.bench_distill import paired_interval

    # deltas 0.10, -0.05, 0.20: mean 0.25 / 3; deviations 1/60, -2/15, 7/60; sum of squares 0.031667 over n-1 = 2
    # gives sd 0.125831; t(0.975, 2) = 4.302653 (tables); half-width 4.302653 * 0.125831 / sqrt(3) = 0.312581
    result = paired_interval([0.10, -0.05, 0.20])
    mean, half = 0.25 / 3, 4.302653 * math.sqrt(0.0316667 / 2) / math.sqrt(3)
    assert result["seeds"] == 3 and result["delta_mean"] == pytest.approx(mean)
    assert result["ci_low"] == pytest.approx(mean - half, abs=2e-5)
    assert result["ci_high"] == pytest.approx(mean + half, abs=2e-5)
    assert (result["seeds_up"], result["seeds_down"]) == (2, 1)
    tied = paired_interval([0.0, 0.02, 0.0, -0.01])  # a tie goes neither up nor down
    assert (tied["seeds_up"], tied["seeds_down"]) == (1, 1)
    single = paired_interval([0.04])  # one seed: a mean, no interval
    assert single["ci_low"] is None and single["ci_high"] is None and single["seeds_up"] == 1
    with pytest.raises(ValueError):
        paired_interval([])


def test_generator_options_pass_only_what_the_generator_takes():
    from kdcli.bench_distill import generator_options

    def today(out, *, per_class=20, seed=0):
        return {}

    def later(out, *, per_class=20, seed=0, independent=False, label_noise=0.0, test_per_class=0):
        return {}

    wanted = {"independent": True, "test_per_class": 50, "label_noise": 0.2}
    assert generator_options(today, wanted) == ({}, ["independent", "test_per_class", "label_noise"])
    assert generator_options(later, wanted) == (wanted, [])


def _options(tmp_path: Path, **changes):
    from kdcli.bench_distill import DistillBenchOptions

    return DistillBenchOptions(**{"dataset": "multieye", "out": tmp_path / "bench", "quick": True, "sizes": (6, 12),
                                  "seeds": 2, **changes})


def test_variants_and_test_set_follow_the_generator(tmp_path, monkeypatch):
    """Today's generator: no independent control (a note says so), no fixed test set; a generator with the
    options gets independent=True on the control's phantoms, False on the shared ones, and the fixed test size."""
    import kdcli.synth.multieye as multieye
    from kdcli.bench_distill import plan_benchmark

    def without(out, *, per_class=20, size=128, seed=0, paired=False, workers=1):
        return {}

    monkeypatch.setattr(multieye, "synth_multieye", without)
    plan = plan_benchmark(_options(tmp_path))
    assert plan.variants == ["shared"]
    assert any("independent control skipped" in note for note in plan.notes)
    assert any("no fixed test set" in note for note in plan.notes)
    assert {key[:3] for key in plan.data_jobs} == {("shared", p, n) for p in ("unpaired", "paired") for n in (6, 12)}
    assert all("independent" not in job.synth_kwargs and "test_per_class" not in job.synth_kwargs
               for job in plan.data_jobs.values())
    with pytest.raises(UsageError, match="label_noise"):
        plan_benchmark(_options(tmp_path, label_noise=0.2))

    def later(out, *, per_class=20, size=128, seed=0, paired=False, workers=1, independent=False, label_noise=0.0,
              test_per_class=0):
        return {}

    monkeypatch.setattr(multieye, "synth_multieye", later)
    plan = plan_benchmark(_options(tmp_path, label_noise=0.2, methods=("kd",)))
    assert plan.variants == ["shared", "independent"] and plan.used_phantoms == ["paired"]
    for (variant, phantom, size, seed), job in plan.data_jobs.items():
        assert seed is None and phantom == "paired"
        assert job.synth_kwargs == {"size": 32, "paired": True, "per_class": size, "seed": 0,
                                    "independent": variant == "independent", "test_per_class": 10,
                                    "label_noise": 0.2}
    resampled = plan_benchmark(_options(tmp_path, resample=True, independent=False, methods=("kd",)))
    assert sorted(job.synth_kwargs["seed"] for job in resampled.data_jobs.values()) == [0, 0, 1, 1]


@pytest.mark.slow
def test_bench_distill_multieye_end_to_end(tmp_path):
    from kdcli.engine.checkpoint import load_checkpoint

    out = tmp_path / "bench"
    # --no-independent: one variant keeps it cheap once the generator has the control (planning tests cover it)
    args = ["bench", "distill", "multieye", "--quick", "--sizes", "6", "--seeds", "2", "--epochs", "1",
            "--no-independent", "--out", str(out), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["dataset"] == "multieye" and report["metric"] == "accuracy"
    assert {(r["method"], r["variant"], r["train_size"]) for r in report["rows"]} == {
        ("coda", "shared", 6), ("kd", "shared", 6), ("label-smoothing", "shared", 6)}
    for row in report["rows"]:
        assert ROW_KEYS <= set(row) and row["seeds"] == 2
        assert row["delta_mean"] == pytest.approx(row["student_mean"] - row["baseline_mean"])
        assert row["ci_low"] <= row["delta_mean"] <= row["ci_high"]
    assert "--sizes 6 --seeds 2 --epochs 1" in report["command"] and report["grid"]["sizes"] == [6]
    for name in ("results.csv", "results.json", "gain.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "results.csv").read_text().splitlines()[0].startswith("method,variant,train_size,seeds,")

    # baseline and student: the same shards and seed (hence the same initial weights and batch order)
    for phantom, method in (("unpaired", "coda"), ("paired", "kd")):
        for seed in (0, 1):
            cell = out / "runs" / "shared" / phantom / "n6" / f"seed{seed}"
            baseline, student = (load_checkpoint(cell / f"{name}.pt").meta for name in ("baseline", method))
            assert baseline["data"]["content_hash"] == student["data"]["content_hash"]
            assert baseline["config"]["seed"] == student["config"]["seed"] == seed
            assert student["teacher"]["sha256"].startswith("sha256:") and student["method"] == method
    paired, unpaired = (load_checkpoint(out / "runs" / "shared" / p / "n6" / "seed0" / "baseline.pt").meta
                        for p in ("paired", "unpaired"))
    assert paired["data"]["content_hash"] != unpaired["data"]["content_hash"]  # kd's phantom is the --paired one
    smoothed = load_checkpoint(out / "runs" / "shared" / "unpaired" / "n6" / "seed0" / "baseline+ls.pt").meta
    assert smoothed["method_params"]["label_smoothing"] == 0.1

    # rerun after losing one result (as if interrupted after its last epoch): only that run is taken up again,
    # from its .last.pt, and gives the same test accuracy; the others are read back
    (out / "runs" / "shared" / "unpaired" / "n6" / "seed1" / "coda.bench.json").unlink()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    runs = json.loads(again.stdout)["runs"]
    assert [(r["phantom"], r["seed"], r["run"]) for r in runs if not r["cached"]] == [("unpaired", 1, "coda")]
    assert len(runs) == 14 and "seed 1 coda: accuracy" in again.stderr and "resumed" in again.stderr
    before = {(r["phantom"], r["seed"], r["run"]): r["metrics"] for r in report["runs"]}
    assert {(r["phantom"], r["seed"], r["run"]): r["metrics"] for r in runs} == before


def test_parallel_jobs_return_results_in_order():
    from kdcli.bench_distill import _map

    lines: list[str] = []
    assert _map(lambda job, log: -job, abs, [-3, -1, -2], 1, lines.append) == [3, 1, 2]  # in this process
    assert _map(None, abs, [-3, -1, -2], 2, lines.append) == [3, 1, 2]  # two spawned processes


def test_bench_distill_refuses_unknown_datasets_and_methods(tmp_path):
    for args in (["nope"], ["multieye", "--methods", "coda,sall"], ["multieye", "--sizes", "6,x"]):
        result = CliRunner().invoke(app, ["bench", "distill", *args, "--out", str(tmp_path / "b")])
        assert result.exit_code == 2, result.output
    assert not (tmp_path / "b").exists()
