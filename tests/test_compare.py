"""`kdcli compare`: one table across models and seeds whose numbers are evaluate's, seed-paired and per-sample
paired differences, and warnings where a number means nothing."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import kdcli_run

from kdcli.errors import UsageError


def test_weighted_macro_f1_is_scikit_learns():
    from sklearn.metrics import f1_score

    from kdcli.compare import macro_f1_weighted

    rng = np.random.default_rng(0)
    labels, predictions = rng.integers(0, 4, 60), rng.integers(0, 4, 60)
    predictions[:20] = labels[:20]
    weights = np.stack([np.ones(60), rng.integers(0, 3, 60)]).astype(float)
    ours = macro_f1_weighted(weights, labels, predictions, 5)  # class 4 never occurs: 0, as with zero_division=0
    for row, expected_weights in zip(ours, weights, strict=True):
        expected = f1_score(labels, predictions, labels=list(range(5)), average="macro", zero_division=0,
                            sample_weight=expected_weights)
        assert row == pytest.approx(expected)


def test_inputs_expand_to_best_checkpoints_and_need_two(tmp_path):
    from kdcli.compare import expand, model_key

    for name in ("a/s0.pt", "a/s0.last.pt", "a/s1.pt", "b/s0.pt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in expand([str(tmp_path / "a")])] == ["s0.pt", "s1.pt"]
    assert len(expand([str(tmp_path / "*" / "s0*.pt")])) == 2
    with pytest.raises(UsageError, match="at least two"):
        expand([str(tmp_path / "b")])
    with pytest.raises(UsageError, match="no checkpoint found"):
        expand([str(tmp_path / "nothing-*.pt"), str(tmp_path / "a")])
    base = {"kind": "teacher", "modality": "oct", "config": {"lr": 0.1, "seed": 0, "out": "x.pt", "threads": 1}}
    same = {**base, "config": {"lr": 0.1, "seed": 3, "out": "y.pt", "threads": 2}}
    other = {**base, "config": {"lr": 0.2, "seed": 0, "out": "x.pt"}}
    assert model_key(base) == model_key(same) != model_key(other)


@pytest.fixture(scope="module")
def two_models_two_seeds(multieye_shards, tmp_path_factory):
    """Fundus baselines at two learning rates, seeds 0 and 1 each, one epoch: four checkpoints, two models."""
    from kdcli.train import resolve_config, teach

    root = tmp_path_factory.mktemp("compare")
    paths = {}
    for lr in (3e-3, 3e-4):
        for seed in (0, 1):
            out = root / f"lr{lr:g}" / f"s{seed}.pt"
            teach(resolve_config({"data": str(multieye_shards), "modality": "fundus", "model": "test_resnet",
                                  "head": "linear", "epochs": 1, "batch_size": 8, "workers": 0, "lr": lr, "seed": seed,
                                  "threads": 1, "out": str(out)}), log=lambda m: None)
            paths[(lr, seed)] = out
    return root, paths


@pytest.mark.slow
def test_compare_table_is_evaluates_numbers_with_paired_differences(multieye_shards, two_models_two_seeds, tmp_path):
    from kdcli.compare import at_chance
    from kdcli.evaluate.run import EvaluateOptions, evaluate

    root, paths = two_models_two_seeds
    reports, predictions = {}, {}
    for key, path in paths.items():
        predictions[key] = tmp_path / f"{key[0]:g}-{key[1]}.csv"
        reports[key] = evaluate(EvaluateOptions(path, multieye_shards, "test", predictions=predictions[key],
                                                figure=tmp_path / "cm.png"))["metrics"]
    result = kdcli_run("compare", str(root / "lr0.0003"), str(root / "lr0.003"), "--data",
                       str(multieye_shards), "--bootstrap", "300", "--csv", str(tmp_path / "c.csv"),
                       "--html", str(tmp_path / "c.html"), "--json")
    report = json.loads(result.stdout)
    reference, model = "supervised fundus test_resnet (lr=0.0003)", "supervised fundus test_resnet (lr=0.003)"
    assert report["reference"] == reference and list(report["models"]) == [reference, model]
    for lr, label in ((3e-4, reference), (3e-3, model)):
        runs = report["models"][label]["runs"]
        assert [r["seed"] for r in runs] == [0, 1]
        for run in runs:
            expected = reports[(lr, run["seed"])]
            assert run["metrics"] == {k: expected[k] for k in ("accuracy", "macro_f1", "kappa", "auc")}
        summary = report["models"][label]["summary"]["macro_f1"]
        values = [reports[(lr, s)]["macro_f1"] for s in (0, 1)]
        assert summary["mean"] == pytest.approx(np.mean(values)) and summary["sd"] == pytest.approx(np.std(values,
                                                                                                           ddof=1))
    difference = report["differences"][f"{model} - {reference}"]
    seeds = difference["seeds"]["accuracy"]
    expected = [reports[(3e-3, s)]["accuracy"] - reports[(3e-4, s)]["accuracy"] for s in (0, 1)]
    assert seeds["per_seed"] == pytest.approx(expected) and seeds["mean"] == pytest.approx(np.mean(expected))
    per_sample = difference["per_sample"][""]
    assert per_sample["seed_pairs"] == 2 and per_sample["samples"] == reports[(3e-3, 0)]["n"]
    ours_only = theirs_only = 0
    for seed in (0, 1):  # McNemar's counts, from evaluate's own per-sample predictions
        with open(predictions[(3e-3, seed)]) as a, open(predictions[(3e-4, seed)]) as b:
            for row, ref in zip(csv.DictReader(a), csv.DictReader(b), strict=True):
                assert row["id"] == ref["id"]
                right, ref_right = row["prediction"] == row["label"], ref["prediction"] == ref["label"]
                ours_only += right and not ref_right
                theirs_only += ref_right and not right
    assert (per_sample["right_only_model"], per_sample["right_only_reference"]) == (ours_only, theirs_only)
    assert len(per_sample["mcnemar_p_per_seed_pair"]) == 2
    assert per_sample["mcnemar_p"] == max(per_sample["mcnemar_p_per_seed_pair"])  # each seed pair must show it
    interval = per_sample["accuracy"]
    assert interval["low"] <= np.mean(expected) + 1e-9 and np.mean(expected) - 1e-9 <= interval["high"]
    for key, path in paths.items():  # a warning for exactly the runs evaluate's numbers put at chance
        assert any(w.startswith(f"{path}: at chance") for w in report["warnings"]) == at_chance(
            {k: reports[key][k] for k in ("accuracy", "macro_f1", "kappa", "auc")})
    rows = list(csv.DictReader(open(tmp_path / "c.csv")))
    written = {(r["row"], r["metric"]): float(r["mean"]) for r in rows if r["kind"] == "model"}
    assert written[(model, "macro_f1")] == pytest.approx(report["models"][model]["summary"]["macro_f1"]["mean"])
    page = (tmp_path / "c.html").read_text()
    assert "<table>" in page and "(reference)" in page and "Δ vs reference" in page
    assert "mean ± sd over seeds" in result.stderr


@pytest.mark.slow
def test_a_one_seed_difference_is_flagged(multieye_shards, two_models_two_seeds):
    _, paths = two_models_two_seeds
    result = kdcli_run("compare", str(paths[(3e-4, 0)]), str(paths[(3e-3, 0)]), "--data",
                       str(multieye_shards), "--bootstrap", "0", "--json", ok=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert any("one seed each" in w and "not a result" in w for w in report["warnings"])
    assert "warning: " in result.stderr and "one seed each" in result.stderr
    refused = kdcli_run("compare", str(paths[(3e-4, 0)]), str(paths[(3e-3, 0)]), "--reference",
                        "nobody", ok=False)
    assert refused.exit_code == 2 and "--reference 'nobody'" in refused.stderr


def test_two_models_differing_only_in_their_teacher_file_are_told_apart_by_name(tmp_path):
    """KD from the OCT teacher and self-training (KD from the baseline) share every configuration key but the
    teacher's path: seeds that collide split the group by checkpoint name, and labels stay readable (this used
    to end in a JSON traceback)."""
    from kdcli.compare import Run, distinguish, model_key, split_duplicates

    meta = {"kind": "distill", "modality": "fundus", "config": {"method": "kd", "seed": 0, "teacher": ["x.pt"]}}
    key = model_key(meta)
    runs = [Run(tmp_path / f"seed{seed}" / name, seed, "kd fundus", key, {}, {"method": "kd"})
            for seed in (0, 1) for name in ("kd+u600.pt", "self-train+u600.pt")]
    split_duplicates(runs)
    distinguish(runs)
    assert sorted({run.label for run in runs}) == ["kd fundus [kd+u600.pt]", "kd fundus [self-train+u600.pt]"]
    assert len({run.key for run in runs}) == 2


def test_a_run_from_before_an_option_existed_is_a_seed_of_the_same_model():
    """Checkpoints trained before `allow_partial` existed lack the key; they ran with its default, so they are
    seeds of the model whose config says allow_partial=False, not another model."""
    from kdcli.compare import model_key

    new = {"kind": "teach", "modality": "fundus", "config": {"method": "supervised", "allow_partial": False}}
    old = {"kind": "teach", "modality": "fundus", "config": {"method": "supervised"}}
    other = {"kind": "teach", "modality": "fundus", "config": {"method": "supervised", "allow_partial": True}}
    assert model_key(old) == model_key(new) != model_key(other)


def test_labels_with_brackets_reach_the_table_whole(monkeypatch):
    """A label such as "kd fundus [kd+u600.pt]" (split_duplicates' names) is printed, not read as rich markup."""
    from rich.console import Console

    from kdcli import compare

    monkeypatch.setattr(compare, "table_rows",
                        lambda report: (["model", "accuracy"], [["kd fundus [kd+u600.pt]", "0.332"]]))
    console = Console(width=120, record=True)
    console.print(compare.render_table({"split": "test"}))
    assert "kd fundus [kd+u600.pt]" in console.export_text()


def test_report_at_chance_reads_every_evaluate_report_shape():
    from kdcli.compare import report_at_chance

    assert report_at_chance({"metrics": {"kappa": 0.01, "auc": 0.52}})
    assert not report_at_chance({"metrics": {"kappa": 0.01, "auc": 0.9}})  # ranks well: not guessing
    assert not report_at_chance({"metrics": {"kappa": 0.6, "auc": None}})
    tasks = {"tasks": ["dr", "amd"], "metrics": {"dr": {"kappa": 0.7, "auc": 0.9}, "amd": {"kappa": 0.0, "auc": 0.5}}}
    assert report_at_chance(tasks)  # one label space at chance is enough
    tasks["metrics"]["amd"] = {"kappa": 0.4, "auc": 0.8}
    assert not report_at_chance(tasks)
    assert report_at_chance({"metrics": {"mean_auroc": 0.55, "mean_ap": 0.2}})
    assert not report_at_chance({"metrics": {"mean_auroc": 0.8}})
    assert not report_at_chance({"task": "segmentation", "metrics": {"dice_mean": 0.0}})
