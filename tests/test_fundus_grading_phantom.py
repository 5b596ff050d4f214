"""The SALL phantom's generative story (kdcli/synth/fundus_grading.py): one latent per eye behind its own grade,
its hidden grade and its pixels; asymmetric set sizes; grader noise only in train, recorded, boundary-biased;
the control without the other disease; a fixed test pool; the phantom's split reaching `prepare --splits`; and
the bench recipe that exercises the asymmetric design."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import cv2
import numpy as np
import polars as pl
import pytest
from conftest import kdcli_run

from kdcli.synth.fundus_grading import (
    AMD_CUTS,
    DR_CUTS,
    LATENTS_NAME,
    NOISE_NAME,
    grade_of,
    synth_fundus_grading,
)

TINY = {"per_class": 6, "amd_per_class": 3, "size": 32, "seed": 0}
CUTS = {"dr": DR_CUTS, "amd": AMD_CUTS}
OTHER = {"dr": "amd", "amd": "dr"}


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _image(info: dict, im: dict) -> np.ndarray:
    folder = Path(info["sets"][im["set"]]["images"])
    path = next(folder.glob(f"{im['name']}.*"))
    return cv2.imread(str(path)).astype(np.float32)


def _margin(severity: float, disease: str) -> float:
    return min(abs(severity - cut) for cut in CUTS[disease])


@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("noisy")
    return root, synth_fundus_grading(root, per_class=40, amd_per_class=30, size=32, seed=0, label_noise=0.3,
                                      test_per_class=4)


# ---------------------------------------------------------------- the latent behind every grade


def test_every_grade_is_a_threshold_of_the_one_latent_the_image_renders(noisy) -> None:
    root, info = noisy
    latents = {(row["set"], row["image"]): row for row in _csv_rows(root / LATENTS_NAME)}
    assert len(latents) == len(info["images"])
    for im in info["images"]:
        u, own, other = im["latent"], im["set"], OTHER[im["set"]]
        assert im["clean_grade"] == grade_of(getattr(u, own), own)  # the set's grade
        assert im["hidden_grade"] == grade_of(getattr(u, other), other)  # the other disease's, same latent
        assert info["sets"][own]["hidden"][im["name"]] == im["hidden_grade"]
        row = latents[(own, im["name"])]
        assert float(row[f"{own}_severity"]) == pytest.approx(getattr(u, own), abs=1e-6)
        assert (int(row[f"{own}_grade"]), int(row[f"{other}_grade"]), int(row["listed_grade"])) == (
            im["clean_grade"], im["hidden_grade"], im["grade"])
    # thresholded scores: borderline eyes exist in every set (severity within 0.02 of a cut)
    for disease in ("dr", "amd"):
        margins = [_margin(getattr(im["latent"], disease), disease) for im in info["images"] if im["set"] == disease]
        assert 0.03 < np.mean(np.array(margins) < 0.02) < 0.3
    # every hidden grade occurs, and the two severities share risk: the hidden one rises with the set's own
    for disease in ("dr", "amd"):
        rows = [im for im in info["images"] if im["set"] == disease]
        hidden = np.bincount([im["hidden_grade"] for im in rows], minlength=len(CUTS[OTHER[disease]]) + 1)
        assert hidden.min() > 0
        own, other = (np.array([getattr(im["latent"], d) for im in rows]) for d in (disease, OTHER[disease]))
        assert np.corrcoef(own, other)[0, 1] > 0.3


def test_other_disease_in_the_pixels_follows_the_hidden_severity_and_the_control_removes_it(tmp_path) -> None:
    """The control is the same eyes without the other disease: images differ exactly where the other disease's
    lesions are (the macula for AMD, everywhere for DR), more so the more severe it is."""
    options = {"per_class": 4, "amd_per_class": 4, "size": 64, "seed": 3}
    shared = synth_fundus_grading(tmp_path / "shared", **options)
    control = synth_fundus_grading(tmp_path / "control", **options, independent=True)
    assert control["design"] == "independent" and shared["design"] == "shared"
    s = 64
    yy, xx = np.mgrid[:s, :s]
    central = np.hypot(xx - s / 2, yy - s / 2) < 0.3 * s
    for disease in ("dr", "amd"):
        pairs = [(a, b) for a, b in zip(shared["images"], control["images"], strict=True) if a["set"] == disease]
        masses, central_share, severities = [], [], []
        for a, b in pairs:
            assert (a["name"], a["split"], a["clean_grade"], a["grade"]) == (b["name"], b["split"],
                                                                              b["clean_grade"], b["grade"])
            assert getattr(b["latent"], OTHER[disease]) == 0.0 and b["hidden_grade"] == 0
            assert getattr(a["latent"], disease) == getattr(b["latent"], disease)  # own severity kept
            diff = np.abs(_image(shared, a) - _image(control, b)).sum(-1)
            masses.append(diff.sum())
            central_share.append(diff[central].sum() / max(diff.sum(), 1e-9))
            severities.append(getattr(a["latent"], OTHER[disease]))
        order = np.argsort(severities)
        low, high = np.array(masses)[order[: len(order) // 3]], np.array(masses)[order[-len(order) // 3:]]
        assert high.mean() > 3 * low.mean(), (disease, masses)  # more of the other disease, more pixels differ
        changed = np.array(masses) > 0
        share = np.array(central_share)[changed]
        if disease == "dr":  # AMD's lesions: at the macula
            assert share.mean() > 0.9 and share.min() > 0.7, share
        else:  # DR's lesions: all over the retina
            assert share.mean() < 0.75, share


def test_asymmetric_sets_and_the_fixed_test_pool(tmp_path) -> None:
    info = synth_fundus_grading(tmp_path / "a", **TINY, test_per_class=5)
    dr, amd = info["sets"]["dr"], info["sets"]["amd"]
    assert dr["counts"] == [6 + 5] * 5 and amd["counts"] == [3 + 5] * 4
    for st, main in ((dr, 6), (amd, 3)):
        rows = _csv_rows(Path(st["labels"]))
        assert len(rows) == sum(st["counts"])
        splits = {row["image"]: row["split"] for row in _csv_rows(Path(st["splits"]))}
        assert set(splits) == {row[next(iter(row))] for row in rows}
        assert st["split_counts"]["test"] == 5 * len(st["counts"])  # the pool is the test split, all of it
        assert st["split_counts"]["train"] + st["split_counts"]["dev"] == main * len(st["counts"])
        assert st["split_counts"]["dev"] > 0
    # the pool does not depend on the training sizes: byte-identical test images, same latents
    other = synth_fundus_grading(tmp_path / "b", **{**TINY, "per_class": 9, "amd_per_class": 4}, test_per_class=5)

    def pool(root: Path, summary: dict) -> dict[str, bytes]:
        files = {}
        for im in summary["images"]:
            if im["pool"] == "test":
                path = next(Path(summary["sets"][im["set"]]["images"]).glob(f"{im['name']}.*"))
                files[f"{im['set']}/{path.name}"] = path.read_bytes()
        return files

    assert pool(tmp_path / "a", info) == pool(tmp_path / "b", other) != {}
    assert not {im["name"] for im in info["images"] if im["pool"] == "main"} & {
        im["name"] for im in info["images"] if im["pool"] == "test"}


def test_grader_noise_only_in_train_recorded_and_on_borderline_eyes(noisy, tmp_path) -> None:
    root, info = noisy
    moved = {(row["set"], row["image"]): row for row in _csv_rows(root / NOISE_NAME)}
    flipped = [im for im in info["images"] if im["grade"] != im["clean_grade"]]
    assert {(im["set"], im["name"]) for im in flipped} == set(moved)  # every moved grade recorded, nothing else
    assert all(im["split"] == "train" for im in flipped)  # dev and test stay clean
    for disease in ("dr", "amd"):
        train = [im for im in info["images"] if im["set"] == disease and im["split"] == "train"]
        rate = np.mean([im["grade"] != im["clean_grade"] for im in train])
        assert 0.15 < rate < 0.45, (disease, rate)  # rho = 0.3 in expectation
        assert info["sets"][disease]["flipped"] == sum(im["set"] == disease for im in flipped)
        listed = {row[next(iter(row))]: int(row[list(row)[1]]) for row in _csv_rows(
            Path(info["sets"][disease]["labels"]))}
        for im in (im for im in flipped if im["set"] == disease):
            severity = getattr(im["latent"], disease)
            nearest = min(CUTS[disease], key=lambda cut: abs(severity - cut))
            # moved across the nearest cut: to the neighbouring grade on its other side
            assert im["grade"] == grade_of(nearest - 1e-9 if severity >= nearest else nearest, disease)
            assert abs(im["grade"] - im["clean_grade"]) == 1
            assert listed[im["name"]] == im["grade"] == int(moved[(disease, im["name"])]["listed_grade"])
        margins = np.array([_margin(getattr(im["latent"], disease), disease) for im in train])
        moved_here = np.array([im["grade"] != im["clean_grade"] for im in train])
        near = margins < np.median(margins)
        assert moved_here[near].mean() > 2 * moved_here[~near].mean()  # boundary-biased
    # the noise is in the listed grades only: the pixels are those of the clean phantom
    clean = synth_fundus_grading(tmp_path / "clean", per_class=40, amd_per_class=30, size=32, seed=0,
                                 test_per_class=4)
    images = lambda r: {k: v for k, v in _tree_bytes(r).items() if k.endswith((".png", ".jpeg"))}  # noqa: E731
    assert images(root) == images(tmp_path / "clean")
    assert [im["split"] for im in clean["images"]] == [im["split"] for im in info["images"]]
    assert not (tmp_path / "clean" / NOISE_NAME).exists()


def test_same_arguments_same_bytes_whatever_the_workers(tmp_path) -> None:
    options = {**TINY, "label_noise": 0.3, "independent": True, "test_per_class": 2, "dr_layout": "aptos"}
    synth_fundus_grading(tmp_path / "a", **options)
    synth_fundus_grading(tmp_path / "b", **options, workers=2)
    synth_fundus_grading(tmp_path / "c", **{**options, "seed": 1})
    assert _tree_bytes(tmp_path / "a") == _tree_bytes(tmp_path / "b")
    assert _tree_bytes(tmp_path / "a") != _tree_bytes(tmp_path / "c")


@pytest.mark.parametrize("bad", [{"label_noise": 0.5}, {"label_noise": -0.1}, {"label_noise": math.nan},
                                 {"amd_per_class": 2}, {"per_class": 2}, {"test_per_class": -1}])
def test_impossible_options_are_refused_before_anything_is_written(tmp_path, bad) -> None:
    with pytest.raises(ValueError, match="label_noise|per_class"):
        synth_fundus_grading(tmp_path / "x", **{**TINY, **bad})
    assert not (tmp_path / "x").exists()
    result = kdcli_run("synth", "fundus-grading", str(tmp_path / "y"), "--amd-per-class", "2", ok=False)
    assert result.exit_code == 2 and "amd_per_class" in result.output and "Traceback" not in result.output


# ---------------------------------------------------------------- through the CLI: synth, then prepare --splits


def test_cli_writes_the_phantom_and_prepare_splits_takes_its_split(tmp_path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "shards"
    made = kdcli_run("synth", "fundus-grading", str(raw), "--per-class", "6", "--amd-per-class",
                     "4", "--size", "32", "--label-noise", "0.3", "--test-per-class", "3")
    assert "--splits" in made.output and "training grades moved" in made.output
    for task, csv_name in (("dr", "trainLabels.csv"), ("amd", "labels.csv")):
        kdcli_run("prepare", "fundus-grading", str(raw / task), "--labels",
                  str(raw / task / csv_name), "--task", task, "--out", str(out), "--size", "32",
                  "--splits", str(raw / task / "splits.csv"))
    manifest = pl.read_parquet(out / "manifest.parquet")
    latents = {f"{row['set']}:{row['image']}": row for row in _csv_rows(raw / LATENTS_NAME)}
    assert set(manifest["id"]) == set(latents)
    for sample_id, split, label, task in manifest.select("id", "split", "label", "task").iter_rows():
        row = latents[sample_id]
        assert split == row["split"]  # the phantom's split, not the seeded one
        assert label == int(row["listed_grade"])
        if split != "train":
            assert label == int(row[f"{task}_grade"])  # dev and test: the clean grade
    assert manifest.filter(pl.col("split") == "test").group_by("task").len().sort("task").rows() == [
        ("amd", 12), ("dr", 15)]


def test_without_noise_or_pool_the_phantoms_split_is_prepares_default(tmp_path) -> None:
    raw = tmp_path / "raw"
    info = synth_fundus_grading(raw, **TINY)
    for task, st in info["sets"].items():
        kdcli_run("prepare", "fundus-grading", str(raw / task), "--labels", st["labels"],
                  "--task", task, "--out", str(tmp_path / "s"), "--size", "32")
    manifest = pl.read_parquet(tmp_path / "s" / "manifest.parquet")
    written = {f"{task}:{row['image']}": row["split"] for task, st in info["sets"].items()
               for row in _csv_rows(Path(st["splits"]))}
    assert dict(zip(manifest["id"], manifest["split"], strict=True)) == written


# ---------------------------------------------------------------- the benchmark's recipe


def test_bench_recipe_varies_the_small_amd_set_beside_a_fixed_dr_set(tmp_path) -> None:
    from kdcli.bench_distill import DistillBenchOptions, plan_benchmark

    plan = plan_benchmark(DistillBenchOptions("fundus-grading", tmp_path / "b", quick=True, label_noise=0.2))
    assert plan.variants == ["shared", "independent"]
    assert plan.recipe.metrics[0].name == "amd_accuracy"
    sizes = set()
    for (variant, _, size, _), job in plan.data_jobs.items():
        kwargs = job.synth_kwargs
        assert kwargs["amd_per_class"] == size and kwargs["per_class"] == 48 > size  # asymmetric at every size
        assert kwargs["independent"] == (variant == "independent")
        assert kwargs["test_per_class"] == plan.grid.test_size and kwargs["label_noise"] == 0.2
        sizes.add(size)
    assert sizes == set(plan.grid.sizes)
    assert plan.grid.min_samples > 0.75 * 48 * 5 + 0.75 * max(sizes) * 4  # every run trains the same samples
    assert any("asymmetric" in note for note in plan.notes)


@pytest.mark.slow
def test_bench_distill_fundus_grading_trains_on_the_phantoms_split(tmp_path) -> None:
    import json

    from kdcli.engine.checkpoint import load_checkpoint

    out = tmp_path / "bench"
    args = ["bench", "distill", "fundus-grading", "--quick", "--sizes", "3", "--seeds", "2", "--epochs", "1",
            "--label-smoothing", "0", "--label-noise", "0.2", "--out", str(out), "--json"]
    result = kdcli_run(*args)
    report = json.loads(result.stdout)
    assert {(r["method"], r["variant"], r["metric"]) for r in report["rows"]} == {
        ("sall", v, m) for v in ("shared", "independent") for m in ("amd_accuracy", "dr_accuracy")}
    shards = out / "runs" / "shared" / "n3" / "data" / "shards"
    manifest = pl.read_parquet(shards / "manifest.parquet")
    counts = dict(manifest.filter(pl.col("split") == "test").group_by("task").len().iter_rows())
    assert counts == {"dr": 5 * report["grid"]["test_size"], "amd": 4 * report["grid"]["test_size"]}
    for seed in (0, 1):
        cell = out / "runs" / "shared" / "n3" / f"seed{seed}"
        baseline, student = (load_checkpoint(cell / f"{name}.pt").meta for name in ("amd", "sall"))
        assert baseline["data"]["content_hash"] == student["data"]["content_hash"]
