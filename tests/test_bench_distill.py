"""`kdcli bench distill`: the paired statistics, which generator options reach the phantoms, and one tiny
end-to-end run (baseline and students on the same shards with the same seed, files written, resumable)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import kdcli_run

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
            "--no-independent", "--methods", "coda,kd", "--out", str(out), "--json"]
    result = kdcli_run(*args)
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
    again = kdcli_run(*args)
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
        result = kdcli_run("bench", "distill", *args, "--out", str(tmp_path / "b"), ok=False)
        assert result.exit_code == 2, result.output
    assert not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------ the unlabeled-pool axis
def test_unlabeled_axis_plans_pooled_runs_against_the_same_baseline(tmp_path):
    """--unlabeled 50: kd (which learns from unlabeled samples) trains again on a phantom with the pool, beside
    the self-training control (kd with the baseline as teacher); teacher, baseline and the runs without a pool
    are those of N = 0, CoDA (which cannot use the pool) gets no pooled run, and a pooled run draws the same
    labelled samples per epoch as the others plus as many unlabeled ones."""
    from kdcli.bench_distill import command_line, plan_benchmark, plan_cells

    options = _options(tmp_path, unlabeled=(50, 0), independent=False, methods=("coda", "kd"))
    plan = plan_benchmark(options)
    assert plan.pools == [0, 50] and plan.pooled == ["kd"] and plan.self_train
    assert any(note.startswith("coda learns nothing from unlabeled samples") for note in plan.notes)
    assert set(plan.pool_jobs) == {("shared", "paired", size, None, 50) for size in (6, 12)}
    for key, job in plan.pool_jobs.items():  # the very generator call of N = 0, plus the pool
        assert job.synth_kwargs == {**plan.data_jobs[key[:4]].synth_kwargs, "unlabeled": 50}
        assert Path(job.folder).parent == Path(plan.data_jobs[key[:4]].folder).parent
        assert job.folder != plan.data_jobs[key[:4]].folder

    def info(train: int) -> dict:
        counts = {"train": train, "dev": 9, "test": 90}
        return {"task": "classification", "counts": {modality: dict(counts) for modality in ("fundus", "oct")}}

    # 54 labelled training eyes at size 6 (< min_samples 256), 300 at size 12 (one pass = 300 samples)
    cells = plan_cells(plan, options, {key: info(54 if key[2] == 6 else 300) for key in plan.data_jobs})
    small = cells[("shared", "paired", 6, 0)]
    runs = {run.name: run for run in small.runs}
    assert list(runs) == ["teacher", "baseline", "kd", "kd+u50", "self-train+u50"]
    pool_shards = str(Path(plan.pool_jobs[("shared", "paired", 6, None, 50)].folder) / "shards")
    assert runs["teacher"].data == runs["baseline"].data == runs["kd"].data == ""  # the cell's own phantom
    assert runs["kd+u50"].data == runs["self-train+u50"].data == pool_shards
    assert (runs["kd+u50"].unlabeled, runs["self-train+u50"].unlabeled, runs["kd"].unlabeled) == (50, 50, 0)
    assert runs["kd+u50"].teachers == ["teacher"] and runs["self-train+u50"].teachers == ["baseline"]
    # the same method and flags: only the data (the pool), the budget and, for self-training, the teacher differ
    pooled_flags = {**runs["kd"].flags, "samples_per_epoch": 512}  # 256 labelled + as many unlabeled
    assert runs["kd+u50"].flags == runs["self-train+u50"].flags == pooled_flags
    assert runs["kd"].flags["samples_per_epoch"] == 256
    large = {run.name: run for run in cells[("shared", "paired", 12, 1)].runs}
    assert large["kd"].flags["samples_per_epoch"] == 0  # the engine's default: one pass over the 300
    assert large["kd+u50"].flags["samples_per_epoch"] == 600  # the 300 labelled, as the baseline, + 300 unlabeled
    assert [run.name for run in cells[("shared", "unpaired", 6, 0)].runs] == ["teacher", "baseline", "baseline+ls",
                                                                               "coda"]
    assert "--unlabeled 0,50" in command_line(options, plan.grid, plan.methods)

    alone = plan_benchmark(_options(tmp_path, unlabeled=(), independent=False))  # no axis: today's plan
    assert alone.pools == [0] and not alone.pool_jobs and not alone.pooled


def test_unlabeled_axis_refuses_what_it_cannot_measure(tmp_path, monkeypatch):
    import kdcli.synth.multieye as multieye
    from kdcli.bench_distill import plan_benchmark

    for bad in ("-5", "20,20"):
        result = kdcli_run("bench", "distill", "multieye", "--unlabeled", bad, "--out",
                           str(tmp_path / "b"), ok=False)
        assert result.exit_code == 2 and "--unlabeled" in result.output, result.output

    def without(out, *, per_class=20, size=128, seed=0, paired=False, workers=1):
        return {}

    monkeypatch.setattr(multieye, "synth_multieye", without)
    with pytest.raises(UsageError, match="no unlabeled option"):
        plan_benchmark(_options(tmp_path, unlabeled=(20,)))
    assert plan_benchmark(_options(tmp_path, unlabeled=(0,))).pools == [0]  # no pool asked: nothing to refuse
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("dataset", ["multieye", "brats"])
def test_the_pool_leaves_the_labelled_data_alike(tmp_path, dataset):
    """The generators draw the pool from streams of their own: with and without it, the same labelled samples,
    labels, splits and pixels (labelled_hash), while the shards do differ (the pool is in them); another data
    seed changes the hash (it is not blind). brats: the recipe's prepare reads the pool and the generator's
    split, so the test split is exactly the extra test cases."""
    from kdcli.bench_distill import RECIPES, Grid, labelled_hash
    from kdcli.shards.reader import ShardStore
    from kdcli.synth import SYNTHS

    recipe, grid = RECIPES[dataset], Grid((3,), 1, 1, 16 if dataset == "multieye" else 24, "test_resnet")
    base = ({"per_class": 3, "size": 16, "paired": True, "test_per_class": 2} if dataset == "multieye"
            else {"cases": 3, "size": 24, "test_cases": 2})
    stores, summaries = {}, {}
    for name, kwargs in (("none", {}), ("pool", {"unlabeled": 4}), ("other", {"seed": 1})):
        summaries[name] = SYNTHS.get(recipe.synth)(tmp_path / name / "raw", **base, **kwargs)
        recipe.prepare(tmp_path / name / "raw", tmp_path / name / "shards", summaries[name], grid, 1)
        stores[name] = ShardStore(tmp_path / name / "shards")
    assert not stores["none"].meta.unlabeled and sum(stores["pool"].meta.unlabeled[m]["train"]
                                                      for m in stores["pool"].meta.unlabeled) > 0
    assert stores["pool"].meta.content_hash != stores["none"].meta.content_hash
    hashes = {name: labelled_hash(tmp_path / name / "shards") for name in stores}
    assert hashes["pool"] == hashes["none"] != hashes["other"]
    if dataset == "brats":
        test_groups = set(stores["pool"].rows("test")["group"].to_list())
        assert test_groups == set(summaries["pool"]["splits"]["test"]) and len(test_groups) == 2


def test_labelled_data_that_change_with_the_pool_stop_the_benchmark(tmp_path):
    from kdcli.bench_distill import check_labelled_alike, plan_benchmark
    from kdcli.errors import KdcliError

    plan = plan_benchmark(_options(tmp_path, unlabeled=(50,), independent=False, methods=("kd",)))
    data = {key: {"labelled_hash": "sha256:a"} for key in plan.data_jobs}
    check_labelled_alike(plan, data, {key: {"labelled_hash": "sha256:a"} for key in plan.pool_jobs})
    broken = {key: {"labelled_hash": "sha256:a" if key[2] == 6 else "sha256:b"} for key in plan.pool_jobs}
    with pytest.raises(KdcliError, match="labelled samples change with unlabeled=50"):
        check_labelled_alike(plan, data, broken)


def test_rows_with_a_pool_pair_with_the_same_baseline_and_the_run_without_it(tmp_path):
    """Hand-made cell results: kd with the pool is compared with the baseline of the cell (as kd without it is),
    its pool gain is kd+u50 - kd per seed, and the self-training row reports the baseline as its teacher."""
    from kdcli.bench_distill import (
        SELF_TRAIN,
        compared_rows,
        paired_interval,
        plan_benchmark,
        render_table,
        summarise_rows,
    )

    options = _options(tmp_path, unlabeled=(50,), independent=False, methods=("kd",), sizes=(6,), seeds=3,
                       label_smoothing=0.0)
    plan = plan_benchmark(options)
    values = {"teacher": [0.6, 0.6, 0.6], "baseline": [0.30, 0.40, 0.50], "kd": [0.32, 0.41, 0.50],
              "kd+u50": [0.40, 0.45, 0.56], "self-train+u50": [0.29, 0.40, 0.49]}
    cells = {("shared", "paired", 6, seed): {run: {"metrics": {"accuracy": v[seed]}} for run, v in values.items()}
             for seed in range(3)}
    notes: list[str] = []
    rows = summarise_rows(plan.recipe, compared_rows(plan, options), cells, plan.variants, plan.grid, notes)
    by = {(r["method"], r["unlabeled"]): r for r in rows}
    assert list(by) == [("kd", 0), ("kd", 50), (SELF_TRAIN, 50)]
    for (method, pool), row in by.items():
        run = method if not pool else f"{method}+u{pool}"
        assert row["deltas"] == pytest.approx([s - b for s, b in zip(values[run], values["baseline"], strict=True)])
        assert row["baseline_mean"] == pytest.approx(0.40)
    pool_gain = paired_interval([0.08, 0.04, 0.06])
    assert by[("kd", 50)]["pool_delta_mean"] == pytest.approx(0.06)
    assert by[("kd", 50)]["pool_ci_low"] == pytest.approx(pool_gain["ci_low"])
    assert by[("kd", 0)]["pool_delta_mean"] is None and by[(SELF_TRAIN, 50)]["pool_delta_mean"] is None
    assert by[("kd", 50)]["teacher_mean"] == pytest.approx(0.6)
    assert by[(SELF_TRAIN, 50)]["teacher_mean"] == pytest.approx(0.40)  # its teacher is the baseline
    # what the teacher's modality adds over the same pool: kd+u50 - self-train+u50 per seed
    over_self = paired_interval([0.11, 0.05, 0.07])
    assert by[("kd", 50)]["vs_self_train_mean"] == pytest.approx(over_self["delta_mean"])
    assert by[("kd", 50)]["vs_self_train_ci_high"] == pytest.approx(over_self["ci_high"])
    assert by[("kd", 0)]["vs_self_train_mean"] is None and by[(SELF_TRAIN, 50)]["vs_self_train_mean"] is None
    table = render_table({"dataset": "multieye", "metric": "accuracy", "metrics": ["accuracy"],
                          "size_option": "per_class", "seconds": 1.0, "rows": rows})
    assert [column.header for column in table.columns][3] == "unlabeled"
    assert {"pool gain (95% CI)", "vs self-train (95% CI)"} <= {column.header for column in table.columns}


@pytest.mark.slow
def test_bench_distill_with_an_unlabeled_pool_end_to_end(tmp_path):
    """kd at N = 0 and 20 and the self-training control, one cell pair per seed: the pooled runs read the pool's
    shards (same labelled data), their teachers are the cell's teacher and baseline checkpoints, every run keeps
    the budget; rows, CSV and a rerun from the cache."""
    from kdcli.engine.checkpoint import file_sha256, load_checkpoint

    out = tmp_path / "bench"
    args = ["bench", "distill", "multieye", "--quick", "--sizes", "6", "--seeds", "2", "--epochs", "1",
            "--no-independent", "--methods", "kd", "--label-smoothing", "0", "--unlabeled", "20", "--out", str(out),
            "--json"]
    result = kdcli_run(*args)
    report = json.loads(result.stdout)
    assert report["unlabeled"] == [0, 20] and "--unlabeled 0,20" in report["command"]
    rows = {(r["method"], r["unlabeled"]): r for r in report["rows"]}
    assert set(rows) == {("kd", 0), ("kd", 20), ("self-train", 20)}
    for row in rows.values():
        assert ROW_KEYS | {"unlabeled", "pool_delta_mean"} <= set(row) and row["seeds"] == 2
    assert rows[("kd", 20)]["baseline_mean"] == rows[("kd", 0)]["baseline_mean"] == rows[("self-train", 20)][
        "baseline_mean"]
    assert rows[("kd", 20)]["pool_delta_mean"] == pytest.approx(rows[("kd", 20)]["student_mean"]
                                                               - rows[("kd", 0)]["student_mean"])
    without, pool = (report["data"][label] for label in ("shared/paired per_class=6",
                                                          "shared/paired per_class=6 unlabeled=20"))
    assert without["labelled_hash"] == pool["labelled_hash"] and without["content_hash"] != pool["content_hash"]
    assert pool["unlabeled"]["fundus"]["train"] == 20 and not without["unlabeled"]
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert "unlabeled" in header and "pool_delta_mean" in header

    for seed in (0, 1):
        cell = out / "runs" / "shared" / "paired" / "n6" / f"seed{seed}"
        meta = {name: load_checkpoint(cell / f"{name}.pt").meta
                for name in ("teacher", "baseline", "kd", "kd+u20", "self-train+u20")}
        assert {m["data"]["content_hash"] for n, m in meta.items() if "+u" not in n} == {without["content_hash"]}
        assert meta["kd+u20"]["data"]["content_hash"] == meta["self-train+u20"]["data"]["content_hash"] \
            == pool["content_hash"]
        teacher = file_sha256(cell / "teacher.pt")
        assert meta["kd+u20"]["teacher"]["sha256"] == meta["kd"]["teacher"]["sha256"] == teacher
        assert meta["self-train+u20"]["teacher"]["sha256"] == file_sha256(cell / "baseline.pt")
        assert meta["self-train+u20"]["teacher"]["modality"] == meta["self-train+u20"]["modality"] == "fundus"
        assert {m["config"]["seed"] for m in meta.values()} == {seed}
        assert {n: m["config"]["samples_per_epoch"] for n, m in meta.items()} == {
            "teacher": 256, "baseline": 256, "kd": 256, "kd+u20": 512, "self-train+u20": 512}
        assert meta["kd+u20"]["method"] == meta["self-train+u20"]["method"] == "kd"

    again = kdcli_run(*args)
    runs = json.loads(again.stdout)["runs"]
    assert runs and all(r["cached"] for r in runs) and len(runs) == 10
    assert {r["run"]: r["unlabeled"] for r in runs} == {"teacher": 0, "baseline": 0, "kd": 0, "kd+u20": 20,
                                                        "self-train+u20": 20}


def test_parallel_cells_die_with_the_benchmark():
    """A --jobs worker whose benchmark is gone exits at once instead of training on into its folders (found when
    an interrupted run's cells were still writing 20 minutes later)."""
    import subprocess
    import sys

    code = "from kdcli.bench_distill import _child_init; _child_init(1, {parent}); print('alive')"
    orphan = subprocess.run([sys.executable, "-c", code.format(parent=2**22 + 12345)], capture_output=True, text=True)
    assert orphan.returncode == 1 and "alive" not in orphan.stdout
    child = subprocess.run([sys.executable, "-c", code.format(parent="__import__('os').getppid()")],
                           capture_output=True, text=True)
    assert child.returncode == 0 and "alive" in child.stdout
