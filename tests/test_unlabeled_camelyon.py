"""Unlabeled slides (issue 15): a clinical row without an ALN status makes its slide an unlabeled training slide;
`synth camelyon --unlabeled N` writes such slides, `prepare camelyon` stores them (label -1, train only, counted in
dataset.json) without changing any labelled record; bad inputs are refused in one line; teach never sees them;
bidirectional's distillation terms read them and its CE terms do not."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import kdcli_run
from test_prepare_multieye import assert_one_line_error

from kdcli.data.bags import BagView
from kdcli.shards.reader import ShardStore

UNLABELED = ["200001", "200002", "200003"]  # bcnb ids of `--unlabeled 3`
PREPARE = ["--patch-size", "128", "--max-patches", "4", "--size", "32"]
QUICK = ["--epochs", "1", "--batch-size", "4", "--workers", "0", "--model", "test_resnet", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("unlabeled-camelyon") / "raw"
    made = kdcli_run("synth", "camelyon", root, "--slides", "8", "--size", "1024", "--format", "bcnb", "--unlabeled",
                     "3")
    assert "3 unlabeled" in made.output
    return root


@pytest.fixture(scope="module")
def shards(raw) -> Path:
    out = raw.parent / "shards"
    result = kdcli_run("prepare", "camelyon", raw, "--out", out, *PREPARE)
    assert "unlabeled: 3 slide(s) whose ALN status is empty" in result.output
    return out


def sheet_rows(raw: Path) -> pl.DataFrame:
    return pl.read_excel(raw / "clinical.xlsx", infer_schema_length=0)


def test_synth_writes_unlabeled_rows_with_every_column_but_the_status(raw):
    rows = sheet_rows(raw)
    pool = rows.filter(pl.col("Patient ID").is_in(UNLABELED))
    assert pool.height == 3 and pool["ALN status"].null_count() == 3
    assert pool["Number of lymph node metastases"].null_count() == 3
    assert pool["Tumour Size(cm)"].null_count() == 0 and pool["ER"].null_count() == 0
    assert rows.filter(~pl.col("Patient ID").is_in(UNLABELED))["ALN status"].null_count() == 0
    assert all((raw / "WSIs" / f"{i}.jpg").is_file() for i in UNLABELED)


def test_prepare_stores_unlabeled_slides_in_train_only(shards):
    meta = json.loads((shards / "dataset.json").read_text())
    store = ShardStore(shards)
    pool = store.manifest.filter(~pl.col("labelled"))
    assert sorted(set(pool["record"])) == UNLABELED
    assert set(pool["split"]) == {"train"} and set(pool["label"]) == {-1}
    assert all("-unlabeled-" in name for name in set(pool["shard"]))
    assert meta["unlabeled"] == {"wsi": {"train": pool.height, "dev": 0, "test": 0}}  # patches, as counts
    report = json.loads(kdcli_run("inspect", shards, "--json", ok=False).stdout)
    assert report["per_class"]["wsi"]["train"]["unlabeled"] == pool.height


def test_unlabeled_slides_change_no_labelled_record(raw, shards, tmp_path):
    labelled_only = tmp_path / "raw"
    shutil.copytree(raw, labelled_only)
    for slide in UNLABELED:
        for suffix in (".jpg", ".json"):
            (labelled_only / "WSIs" / f"{slide}{suffix}").unlink()
    rows = sheet_rows(raw).filter(~pl.col("Patient ID").is_in(UNLABELED))
    (labelled_only / "clinical.xlsx").unlink()
    rows.write_csv(labelled_only / "clinical.csv")
    kdcli_run("prepare", "camelyon", labelled_only, "--out", tmp_path / "shards", *PREPARE)
    columns = ["id", "split", "label", "record", "position"]
    with_pool = ShardStore(shards).manifest.filter(pl.col("labelled")).select(columns).sort("id")
    without = ShardStore(tmp_path / "shards").manifest.select(columns).sort("id")
    assert with_pool.equals(without)
    encoding = [json.loads((s / "dataset.json").read_text())["extra"]["clinical"]["encoding"]
                for s in (shards, tmp_path / "shards")]
    assert encoding[0] == encoding[1]  # the z-scores come from the labelled train slides alone


def test_bag_views_leave_unlabeled_slides_out_unless_asked(shards):
    store = ShardStore(shards)
    plain = BagView(store, "train", bag_size=4)
    every = BagView(store, "train", bag_size=4, unlabeled=True)
    assert not set(UNLABELED) & set(plain.records) and (plain.labels >= 0).all()
    assert sorted(set(every.records) - set(plain.records)) == UNLABELED
    assert sorted(r for r, label in zip(every.records, every.labels, strict=True) if label < 0) == UNLABELED
    assert every[every.records.index(UNLABELED[0])]["clinical_present"]  # the record the teacher labels through


def _latents(raw: Path) -> list[dict]:
    with open(raw / "latents.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("damage", ["also-labelled", "in-dev", "missing-slide"])
def test_bad_unlabeled_inputs_are_refused_in_one_line(raw, tmp_path, damage):
    copy = tmp_path / "raw"
    shutil.copytree(raw, copy)
    rows = sheet_rows(copy)
    extra: list = []
    if damage == "also-labelled":  # patient 200002 staged in a second row
        staged = rows.filter(pl.col("Patient ID") == UNLABELED[1]).with_columns(pl.lit("N0").alias("ALN status"))
        rows = pl.concat([rows, staged])
        needles = ("patient 200002 is both labelled (row 13) and unlabeled (row 11, no ALN status)",)
    elif damage == "in-dev":
        splits = {"train": [], "dev": [], "test": []}
        for row in _latents(copy):
            splits[row["split"]].append(row["id"])
        splits["train"].remove(UNLABELED[0])
        splits["dev"].append(UNLABELED[0])
        (copy / "mine.json").write_text(json.dumps(splits))
        extra = ["--splits", copy / "mine.json"]
        needles = ("slide 200001 has no ALN status (unlabeled) but is listed in dev", "mine.json")
    else:
        (copy / "WSIs" / f"{UNLABELED[2]}.jpg").unlink()
        needles = ("1 clinical.csv row(s) without a slide in RAW: 200003",)
    (copy / "clinical.xlsx").unlink()
    rows.write_csv(copy / "clinical.csv")
    out = tmp_path / "shards"
    assert_one_line_error(kdcli_run("prepare", "camelyon", copy, "--out", out, *PREPARE, *extra, ok=False), *needles)
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_a_splits_file_may_list_unlabeled_slides_in_train(raw, shards, tmp_path):
    copy = tmp_path / "raw"
    shutil.copytree(raw, copy)
    splits = {"train": [], "dev": [], "test": []}
    for row in _latents(copy):
        splits[row["split"]].append(row["id"])
    assert set(UNLABELED) <= set(splits["train"])
    (copy / "splits.json").write_text(json.dumps(splits))
    listed = kdcli_run("prepare", "camelyon", copy, "--out", tmp_path / "listed", *PREPARE, "--splits",
                       copy / "splits.json")
    assert "splits.json" not in listed.output
    columns = ["id", "split", "label"]
    assert ShardStore(tmp_path / "listed").manifest.select(columns).sort("id").equals(
        ShardStore(shards).manifest.select(columns).sort("id"))  # the phantom's split is prepare's default
    # a phantom's splits.json left behind is named (its noisy labels or extra test slides would depend on it)
    unlisted = kdcli_run("prepare", "camelyon", copy, "--out", tmp_path / "unlisted", *PREPARE)
    assert f"pass --splits {copy / 'splits.json'} to use it" in unlisted.output


# ---------------------------------------------------------------- bidirectional


def _method_and_batch():
    from kdcli.engine.device import seed_everything
    from kdcli.methods.bidirectional import Bidirectional, BidirectionalParams
    from kdcli.models.mil import MILClassifier, mil_spec

    seed_everything(0)
    spec = mil_spec("test_resnet", 2, ["mm"], 5, hidden=16, clinical_hidden=8)
    spec["embeddings"] = {"name": "random", "model": "test_resnet", "dim": 24}  # bags of cached patch features
    teacher = MILClassifier(spec).eval()
    seed_everything(1)
    student = Bidirectional.make_student(BidirectionalParams(), teacher).eval()  # eval: no dropout between slides
    generator = torch.Generator().manual_seed(2)
    batch = {"features": torch.randn(4, 6, 24, generator=generator).relu().requires_grad_(),
             "bag_mask": torch.ones(4, 6, dtype=torch.bool), "clinical": torch.randn(4, 5, generator=generator),
             "clinical_mask": torch.ones(4, 5), "clinical_present": torch.ones(4, dtype=torch.bool),
             "label": torch.tensor([0, -1, 1, -1])}
    return Bidirectional(BidirectionalParams(), student).eval(), batch


def test_unlabeled_slides_reach_only_the_distillation_terms():
    method, batch = _method_and_batch()
    terms = method(batch)
    unlabeled = batch["label"] < 0
    assert terms["_unlabeled"].item() == pytest.approx(0.5)
    for name in ("ce_mm", "ce_sm"):  # a slide's features reach only its own logits: per-slide gradients
        (grad,) = torch.autograd.grad(terms[name], batch["features"], retain_graph=True)
        assert grad[unlabeled].abs().max() == 0 and grad[~unlabeled].abs().max() > 0, name
    for name in ("kd", "align"):
        (grad,) = torch.autograd.grad(terms[name], batch["features"], retain_graph=True)
        assert grad[unlabeled].abs().max() > 0, name
    # the CE terms are those of the labelled slides alone
    with torch.no_grad():
        out = method.student(batch)
    labelled = ~unlabeled
    expected = torch.nn.functional.cross_entropy(out["logits_sm"][labelled], batch["label"][labelled])
    assert terms["ce_sm"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_batch_of_unlabeled_slides_alone_gives_finite_terms():
    method, batch = _method_and_batch()
    batch["label"] = torch.full((4,), -1)
    terms = method(batch)
    assert terms["ce_mm"].item() == 0 and terms["ce_sm"].item() == 0 and terms["_unlabeled"].item() == 1
    sum(v for k, v in terms.items() if not k.startswith("_")).backward()
    assert torch.isfinite(batch["features"].grad).all() and batch["features"].grad.abs().max() > 0


def _metrics(path: Path) -> dict:
    return json.loads(path.with_name(path.name.replace(".pt", ".metrics.jsonl")).read_text().splitlines()[-1])


@pytest.mark.slow
def test_teach_ignores_and_bidirectional_distils_on_unlabeled_slides(shards, tmp_path):
    teacher = tmp_path / "mm.pt"
    taught = kdcli_run("teach", "--data", shards, "--modality", "wsi,clinical", "--out", teacher, *QUICK)
    assert "unlabeled" not in taught.output  # a label of -1 in its CE would have failed the run
    student = tmp_path / "bd.pt"
    result = kdcli_run("distill", "--data", shards, "--teacher", teacher, "--student", "wsi", "--method",
                       "bidirectional", "--out", student, "--unlabeled-ratio", "2", *QUICK)
    assert "3 unlabeled slides: distillation terms only, 2 per labelled slide" in result.output
    row = _metrics(student)
    assert row["train_unlabeled"] > 0 and np.isfinite(row["train_ce_sm"]) and np.isfinite(row["train_kd"])
    left_out = tmp_path / "bd-no.pt"
    result = kdcli_run("distill", "--data", shards, "--teacher", teacher, "--student", "wsi", "--method",
                       "bidirectional", "--out", left_out, "--no-unlabeled", *QUICK)
    assert "--no-unlabeled: 3 unlabeled slides left out" in result.output
    assert _metrics(left_out)["train_unlabeled"] == 0


def test_splits_files_read_as_json_or_csv(tmp_path):
    from kdcli.errors import KdcliError
    from kdcli.sources.camelyon import read_splits

    (tmp_path / "s.json").write_text(json.dumps({"train": [1, "002"], "val": ["3"], "test": ["cnb_0004"]}))
    assert read_splits(tmp_path / "s.json") == {"1": "train", "2": "train", "3": "dev", "cnb_0004": "test"}
    (tmp_path / "s.csv").write_text("Slide,Split\n1,training\n3,validation\n\n4.0,test\n")
    assert read_splits(tmp_path / "s.csv") == {"1": "train", "3": "dev", "4": "test"}
    (tmp_path / "twice.csv").write_text("slide,split\n1,train\n001,test\n")
    with pytest.raises(KdcliError, match="row 3: slide 001 is listed in train and test"):
        read_splits(tmp_path / "twice.csv")
    (tmp_path / "odd.csv").write_text("slide,fold\n1,train\n")
    with pytest.raises(KdcliError, match="a split column and a slide id column"):
        read_splits(tmp_path / "odd.csv")
