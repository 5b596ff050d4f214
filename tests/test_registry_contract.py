"""Every phantom generator, end to end through the CLI: synth -> prepare -> inspect --verify -> one-epoch teach ->
evaluate -> explain, on the smallest phantom that trains. Parametrized over SYNTHS, so every source with a
generator and every task type those sources pose is run; a new generator fails the fast check below until it
has its line in RECIPES (the small sizes and the options its prepare needs)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
from conftest import TINY_MODEL, kdcli_run

from kdcli.engine.curves import curves_path
from kdcli.sources import SOURCES
from kdcli.synth import SYNTHS
from kdcli.tasks import TASKS

ONE_EPOCH = ["--epochs", "1", "--batch-size", "8", "--workers", "0", "--lr", "3e-3"]


class Raw(str):
    """An option's value that is a path under the phantom's RAW folder."""


@dataclass
class Recipe:
    synth: list = field(default_factory=list)  # `kdcli synth NAME RAW ...`
    prepares: list = field(default_factory=list)  # (source, path under RAW, options), in order, into one --out
    teach: list = field(default_factory=list)  # what picks the modality or label space
    model: str = TINY_MODEL


RECIPES = {
    "multieye": Recipe(["--per-class", 5, "--size", 32], [("multieye", ".", ["--size", 32])],
                       ["--modality", "oct"]),
    "fundus-grading": Recipe(["--per-class", 6, "--amd-per-class", 4, "--size", 32, "--test-per-class", 3],
                             [("fundus-grading", "dr", ["--labels", Raw("dr/trainLabels.csv"), "--task", "dr"]),
                              ("fundus-grading", "amd", ["--labels", Raw("amd/labels.csv"), "--task", "amd"])],
                             ["--task", "dr"]),
    "brats": Recipe(["--cases", 8, "--size", 32], [("brats", ".", ["--size", 32])], ["--modality", "t1ce"],
                    model="plain-4-2"),
    "cxr": Recipe(["--per-class", 3, "--size", 96, "--annotated-fraction", 0.5],
                  [("cxr", ".", ["--size", 48, "--gaze", Raw("egd-cxr"), "--boxes", Raw("BBox_List_2017.csv")])], []),
    "camelyon": Recipe(["--slides", 8, "--size", 1024],
                       [("camelyon", ".", ["--patch-size", 128, "--max-patches", 8, "--size", 32])],
                       ["--modality", "wsi"]),
    "table": Recipe(["--samples", 30, "--size", 32], [("table", "table.csv", ["--size", 32])],
                    ["--modality", "scan"]),
}
NO_GENERATOR = {"isic"}  # sources without a phantom generator: tests/test_isic_source.py builds its layout


def test_every_generator_has_a_recipe_and_every_source_a_generator():
    assert sorted(RECIPES) == SYNTHS.names(), "add the new generator's line to RECIPES"
    prepared = {source for recipe in RECIPES.values() for source, _, _ in recipe.prepares}
    assert prepared | NO_GENERATOR == set(SOURCES.names())


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_synth_prepare_verify_teach_evaluate_explain(name, tmp_path):
    recipe = RECIPES[name]
    raw, shards = tmp_path / "raw", tmp_path / "shards"
    kdcli_run("synth", name, raw, *recipe.synth)
    for source, where, options in recipe.prepares:
        extra = [raw / o if isinstance(o, Raw) else o for o in options]
        kdcli_run("prepare", source, raw / where, "--out", shards, *extra)
    report = json.loads(kdcli_run("inspect", shards, "--verify", "--json").stdout)
    assert report["samples"] > 0
    task = TASKS.get(json.loads((shards / "dataset.json").read_text()).get("task") or "classification")
    checkpoint = tmp_path / "model.pt"
    kdcli_run("teach", "--data", shards, *recipe.teach, "--model", recipe.model, "--out", checkpoint, *ONE_EPOCH)
    assert checkpoint.is_file() and curves_path(checkpoint).is_file()
    evaluated = json.loads(kdcli_run("evaluate", checkpoint, "--json", "--device", "cpu").stdout)
    assert evaluated["task"] == task.name
    assert any(name in json.dumps(evaluated["metrics"]) for name in task.report_metrics)
    index = tmp_path / "explained" / "index.html"
    kdcli_run("explain", checkpoint, "--out", index.parent, "--count", 2, "--device", "cpu")
    assert index.is_file() and (index.parent / "explain.json").is_file()
