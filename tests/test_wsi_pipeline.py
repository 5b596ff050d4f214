"""Slides + clinical records end to end through the CLI on tiny phantoms: synth camelyon -> prepare -> teach
(WSI only; WSI + clinical) -> distill --method bidirectional -> evaluate --missing-rate; the routing,
padding and nesting rules the sweep relies on; and the bags training and evaluation share."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import kdcli_run

FAST = ["--epochs", "2", "--batch-size", "4", "--workers", "0", "--model", "test_resnet", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def wsi(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wsi")
    raw, shards = root / "raw", root / "shards"
    kdcli_run("synth", "camelyon", raw, "--slides", "10", "--size", "1024")
    kdcli_run("prepare", "camelyon", raw, "--out", shards, "--patch-size", "128", "--max-patches", "6", "--size", "32")
    paths = {"raw": raw, "shards": shards, "wsi": root / "wsi.pt", "mm": root / "mm.pt", "bd": root / "bd.pt"}
    kdcli_run("teach", "--data", shards, "--modality", "wsi", "--out", paths["wsi"], *FAST)
    kdcli_run("teach", "--data", shards, "--modality", "wsi,clinical", "--out", paths["mm"], *FAST)
    kdcli_run("distill", "--data", shards, "--teacher", paths["mm"], "--student", "wsi", "--method", "bidirectional",
              "--out", paths["bd"], *FAST)
    return paths


def test_checkpoints_record_branches(wsi):
    from kdcli.engine.checkpoint import load_checkpoint

    assert load_checkpoint(wsi["wsi"]).meta["model"]["branches"] == ["sm"]
    assert load_checkpoint(wsi["mm"]).meta["model"]["branches"] == ["mm"]
    student = load_checkpoint(wsi["bd"]).meta
    assert student["model"]["branches"] == ["mm", "sm"] and student["method"] == "bidirectional"
    rows = [json.loads(line) for line in wsi["bd"].with_name("bd.metrics.jsonl").read_text().splitlines()]
    assert {"train_ce_mm", "train_ce_sm", "train_kd", "train_align", "dev_auc"} <= set(rows[0])


def test_missing_rate_sweep_keyed_by_rate(wsi):
    report = json.loads(kdcli_run("evaluate", wsi["bd"], "--data", wsi["shards"], "--missing-rate", "0,0.5,1",
                                  "--json").stdout)
    assert list(report["metrics"]) == ["0", "0.5", "1"]
    hidden = [report["metrics"][r]["hidden"] for r in ("0", "0.5", "1")]
    n = report["metrics"]["0"]["n"]
    assert hidden == [0, round(0.5 * n), n]
    for metrics in report["metrics"].values():
        assert metrics["auc"] is None or 0.0 <= metrics["auc"] <= 1.0


def test_wsi_only_model_ignores_clinical_records(wsi):
    report = json.loads(kdcli_run("evaluate", wsi["wsi"], "--data", wsi["shards"], "--missing-rate", "0,1",
                                  "--json").stdout)
    assert report["metrics"]["0"]["auc"] == report["metrics"]["1"]["auc"]
    assert report["metrics"]["0"]["accuracy"] == report["metrics"]["1"]["accuracy"]


def test_bidirectional_student_starts_as_its_teacher_and_routes_by_presence(wsi):
    from kdcli.data.bags import BagView, collate_bags
    from kdcli.engine.checkpoint import load_checkpoint
    from kdcli.methods.bidirectional import Bidirectional, BidirectionalParams
    from kdcli.shards.reader import ShardStore
    from kdcli.train import load_model

    teacher = load_model(load_checkpoint(wsi["mm"]))
    student = Bidirectional.make_student(BidirectionalParams(), teacher).eval()
    view = BagView(ShardStore(wsi["shards"]), "train")
    batch = collate_bags([view[0], view[1]])
    with torch.no_grad():
        from_teacher, from_student = teacher(batch), student(batch)
    assert torch.allclose(from_student["logits_mm"], from_teacher["logits_mm"], atol=1e-5)
    assert torch.allclose(from_student["logits_sm"].softmax(-1).sum(-1), torch.ones(2))
    # a phantom teacher pools nearly uniformly: only a WSI-only branch of its own makes the alignment a term
    method = Bidirectional(BidirectionalParams(), student).eval()
    terms = method(batch)
    assert (from_student["h_mm"] - from_student["h_sm"]).abs().max() > 1e-3 and terms["align"] > 1e-2
    terms["align"].backward()
    gradient = torch.stack([p.grad.norm() for p in student.pool["mm"].parameters()]).norm()
    assert gradient > 1e-4
    batch["clinical_present"] = torch.tensor([True, False])
    with torch.no_grad():
        routed = student(batch)
    assert torch.equal(routed["logits"][0], routed["logits_mm"][0])
    assert torch.equal(routed["logits"][1], routed["logits_sm"][1])


def test_padding_gets_no_attention_and_hidden_sets_are_nested(wsi):
    from kdcli.data.bags import BagView, collate_bags
    from kdcli.engine.checkpoint import load_checkpoint
    from kdcli.evaluate.slides import hidden_slides
    from kdcli.shards.reader import ShardStore
    from kdcli.train import load_model

    model = load_model(load_checkpoint(wsi["wsi"]))
    view = BagView(ShardStore(wsi["shards"]), "train", bag_size=None)
    short, long = sorted((view[0], view[1]), key=lambda item: item["patches"].shape[0])
    short["patches"] = short["patches"][:2]
    short["bag_mask"] = short["bag_mask"][:2]
    batch = collate_bags([short, long])
    with torch.no_grad():
        attention = model(batch)["attention_sm"]
    assert batch["bag_mask"][0].sum() == 2 and torch.all(attention[0, 2:] == 0)
    assert torch.allclose(attention.sum(-1), torch.ones(2))
    records = [f"s{i}" for i in range(20)]
    assert hidden_slides(records, 0.2) <= hidden_slides(records, 0.6) <= hidden_slides(records, 1.0)
    assert len(hidden_slides(records, 0.6)) == 12


def test_slide_methods_refuse_wrong_teachers(wsi, tmp_path):
    result = kdcli_run("distill", "--data", str(wsi["shards"]), "--teacher", str(wsi["wsi"]), "--student",
                       "wsi", "--method", "bidirectional", "--out", str(tmp_path / "x.pt"), *FAST, ok=False)
    assert result.exit_code != 0 and "wsi,clinical" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = kdcli_run("teach", "--data", str(wsi["shards"]), "--modality", "clinical", "--out",
                       str(tmp_path / "y.pt"), *FAST, ok=False)
    assert result.exit_code != 0 and result.output.strip().startswith("error:")
    from kdcli.errors import UsageError
    from kdcli.train import TrainConfig, distill

    config = TrainConfig(data=str(wsi["shards"]), out=str(tmp_path / "z.pt"), teacher=[str(wsi["mm"])],
                         method="bidirectional", embeddings="other")  # e.g. from a config file
    with pytest.raises(UsageError, match="patch pixels"):  # the student reads what its teacher read
        distill(config, log=lambda message: None)
    assert not (tmp_path / "z.pt").exists()


def test_embed_caches_patch_features_and_mil_trains_on_them(wsi, tmp_path):
    import h5py
    import timm

    from kdcli.engine.checkpoint import load_checkpoint
    from kdcli.engine.device import seed_everything
    from kdcli.models.classifier import default_normalisation
    from kdcli.shards.reader import ShardStore

    first = kdcli_run("embed", "--data", wsi["shards"], "--model", "test_resnet")
    name = first.stdout.strip()
    again = kdcli_run("embed", "--data", wsi["shards"], "--model", "test_resnet")
    assert again.stdout.strip() == name and "reused" in again.stderr
    path = wsi["shards"] / "embeddings" / f"{name}.h5"
    store = ShardStore(wsi["shards"])
    with h5py.File(path, "r") as handle:
        features, ids = handle["features"][:], [i.decode() for i in handle["id"][:]]
        assert handle.attrs["data_hash"] == store.meta.content_hash
    assert sorted(ids) == sorted(store.rows(None, "wsi")["id"].to_list())
    row = store.rows(None, "wsi").filter(store.manifest["id"] == ids[3]).row(0, named=True)
    seed_everything(0)  # the cached encoder: random init at seed 0, as `embed` names it
    encoder = timm.create_model("test_resnet", pretrained=False, num_classes=0, in_chans=3).eval()
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in default_normalisation(3))
    pixels = torch.from_numpy(store.read(row["shard"], row["index"], "wsi")).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        expected = encoder((pixels - mean) / std)[0].numpy()
    assert torch.allclose(torch.from_numpy(features[3].astype("float32")), torch.from_numpy(expected), atol=1e-2)

    out = tmp_path / "emb.pt"
    kdcli_run("teach", "--data", wsi["shards"], "--modality", "wsi,clinical", "--embeddings", name, "--out", out, *FAST)
    checkpoint = load_checkpoint(out)
    assert checkpoint.meta["model"]["embeddings"]["name"] == name
    assert not any(k.startswith("encoder.") for k in checkpoint.model)  # nothing to encode: features are read
    report = json.loads(kdcli_run("evaluate", out, "--data", wsi["shards"], "--missing-rate", "0,1", "--json").stdout)
    assert set(report["metrics"]) == {"0", "1"}
    path.unlink()
    result = kdcli_run("evaluate", str(out), "--data", str(wsi["shards"]), "--json", ok=False)
    assert result.exit_code != 0 and "kdcli embed" in result.output


def test_training_and_evaluation_bags_agree(wsi):
    from kdcli.data.bags import BagView, collate_bags
    from kdcli.engine.checkpoint import load_checkpoint
    from kdcli.mil import BAG_SIZE, predict_bags
    from kdcli.shards.reader import ShardStore
    from kdcli.train import load_model

    store = ShardStore(wsi["shards"])
    train = BagView(store, "train", BAG_SIZE, seed=3)
    every = BagView(store, "train")
    for i in range(len(train)):
        count = len(train.members[i][1])
        drawn = train.patch_indices(i)
        assert len(set(drawn.tolist())) == len(drawn) == min(count, BAG_SIZE)  # distinct patches, no duplicates
    assert all(len(members[1]) <= BAG_SIZE for members in train.members)  # the phantom's slides: one bag each
    model = load_model(load_checkpoint(wsi["bd"]))
    predicted = predict_bags(model, every, torch.device("cpu"), bag_size=BAG_SIZE)
    for epoch in (0, 5):  # a slide of at most BAG_SIZE patches is scored on the very bag it trains on
        train.set_epoch(epoch)
        with torch.no_grad():
            probs = [model(collate_bags([train[i]]))["logits"].softmax(-1)[0].numpy() for i in range(len(train))]
        assert torch.allclose(torch.from_numpy(predicted["probs"]), torch.tensor(np.stack(probs)), atol=1e-5)
    again = predict_bags(model, BagView(store, "train", seed=9), torch.device("cpu"), bag_size=BAG_SIZE)
    assert (again["probs"] == predicted["probs"]).all()  # deterministic, whatever the view's seed


def test_evaluate_scores_the_training_bag_size_unless_told(wsi):
    report = json.loads(kdcli_run("evaluate", wsi["bd"], "--data", wsi["shards"], "--json").stdout)
    assert report["bag_size"] == 16
    whole = json.loads(kdcli_run("evaluate", wsi["bd"], "--data", wsi["shards"], "--bag-size", "0", "--json").stdout)
    assert whole["bag_size"] == 0 and whole["metrics"]["n"] == report["metrics"]["n"]
    result = kdcli_run("evaluate", str(wsi["bd"]), "--data", str(wsi["shards"]), "--bag-size", "-1", ok=False)
    assert result.exit_code != 0 and "--bag-size" in result.output and len(result.output.strip().splitlines()) == 1
