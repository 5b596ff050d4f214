"""Unlabeled chest X-rays (issue 15): `synth cxr --unlabeled N` writes images nobody graded (ChestX-ray14: rows of
Data_Entry with a blank Finding Labels field; MIMIC-CXR: images whose study has no CheXpert row, or one with every
finding blank), `prepare cxr` stores them as training samples of label -1 without a label vector, never of a dev
or test patient, and CVI's KL term alone learns from them (through their gaze)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import polars as pl
import pytest
import torch
from conftest import kdcli_run
from test_prepare_multieye import assert_one_line_error

from kdcli.data.views import ModalityView
from kdcli.shards.reader import ShardStore

POOL = 12
QUICK = ["--epochs", "1", "--batch-size", "8", "--workers", "0", "--model", "test_resnet", "--lr", "3e-3"]


def synth(raw: Path, layout: str, unlabeled: int = POOL) -> None:
    gaze = "egd" if layout == "nih" else "reflacx"
    kdcli_run("synth", "cxr", raw, "--layout", layout, "--gaze", gaze, "--per-class", "2", "--size", "64",
              "--annotated-fraction", "0.5", "--unlabeled", unlabeled)


def prepare(raw: Path, out: Path, layout: str):
    gaze = raw / ("egd-cxr" if layout == "nih" else "reflacx")
    boxes = ["--boxes", raw / "BBox_List_2017.csv"] if layout == "nih" else []
    return kdcli_run("prepare", "cxr", raw, "--out", out, "--size", "32", "--gaze", gaze, *boxes, "--egd-sigma", "8",
                     ok=False)


def rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def pool_names(raw: Path) -> list[str]:
    return [r["name"] for r in csv.DictReader(open(raw / "latents.csv", newline="")) if r["pool"] == "unlabeled"]


@pytest.fixture(scope="module", params=["nih", "mimic"])
def raw(request, tmp_path_factory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp(f"pool-{request.param}") / "raw"
    synth(root, request.param)
    return request.param, root


@pytest.fixture(scope="module")
def shards(raw, tmp_path_factory) -> tuple[str, Path, Path]:
    layout, root = raw
    out = tmp_path_factory.mktemp(f"shards-{layout}") / "cxr"
    result = prepare(root, out, layout)
    assert result.exit_code == 0, result.output
    assert f"unlabeled pool: {POOL} training image(s)" in result.output
    return layout, root, out


def test_synth_writes_the_pool_as_each_layout_ships_unlabeled_images(raw) -> None:
    layout, root = raw
    names = pool_names(root)
    assert len(names) == POOL
    if layout == "nih":
        entry = {r[0]: r for r in rows(root / "Data_Entry_2017.csv")[1:]}
        assert all(entry[n][1] == "" for n in names)  # listed (Data_Entry is the metadata too), no labels
        assert all(entry[n][1] for n in entry if n not in names)  # labelled normals say "No Finding"
        assert set(names) <= set((root / "train_val_list.txt").read_text().split())
        assert not {r[0] for r in rows(root / "BBox_List_2017.csv")[1:]} & set(names)  # a box names a finding
        labelled_patients = {entry[n][3] for n in entry if n not in names}
        assert not labelled_patients & {entry[n][3] for n in names}
    else:
        split = {r[0]: r for r in rows(root / "mimic-cxr-2.0.0-split.csv")[1:]}
        assert all(split[n][3] == "train" for n in names)
        assert set(names) <= {r[0] for r in rows(root / "mimic-cxr-2.0.0-metadata.csv")[1:]}
        chexpert = {r[1]: r[2:] for r in rows(root / "mimic-cxr-2.0.0-chexpert.csv")[1:]}
        studies = [split[n][1] for n in names]
        blank = [s for s in studies if s in chexpert]
        assert blank and len(blank) < len(studies)  # some with a row of blanks, the others with no row
        assert all(not any(chexpert[s]) for s in blank)


def test_prepare_stores_the_pool_as_unlabeled_training_samples(shards) -> None:
    layout, root, out = shards
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["unlabeled"] == {"xray": {"train": POOL, "dev": 0, "test": 0}}
    store = ShardStore(out)
    pool = store.manifest.filter(~pl.col("labelled"))
    assert sorted(pool["id"]) == sorted(pool_names(root))
    assert set(pool["split"]) == {"train"} and set(pool["label"]) == {-1}
    held_out = set(store.manifest.filter(pl.col("split") != "train")["group"])
    assert not held_out & set(pool["group"])  # never a patient of dev or test
    gaze = 0
    for shard in set(pool["shard"]):
        with h5py.File(out / "shards" / shard, "r") as handle:
            assert "labels" not in handle and {"xray", "gaze", "boxes", "annotated"} <= set(handle)
            assert not handle["boxes"][...].any()
            gaze += int(handle["annotated"][:, 0].sum())
    assert 0 < gaze < POOL  # the pool's patients carry gaze at the annotated fraction
    report = json.loads(kdcli_run("inspect", out, "--json", ok=False).stdout)
    assert report["unlabeled"]["xray"]["train"] == POOL


def test_the_labelled_part_is_the_dataset_prepared_without_the_pool(shards, tmp_path) -> None:
    layout, _, out = shards
    plain_raw, plain_out = tmp_path / "raw", tmp_path / "out"
    synth(plain_raw, layout, unlabeled=0)
    assert prepare(plain_raw, plain_out, layout).exit_code == 0
    with_pool = ShardStore(out).manifest.filter(pl.col("labelled")).select("id", "group", "split", "label")
    without = ShardStore(plain_out).manifest.select("id", "group", "split", "label")
    assert with_pool.sort("id").equals(without.sort("id"))  # same labels, same patient-wise dev and test


def test_views_leave_the_pool_out_unless_asked_and_read_no_label_as_unknown(shards) -> None:
    _, _, out = shards
    store = ShardStore(out)
    labelled = ModalityView(store, "train", "xray", targets=("labels", "annotated"))
    every = ModalityView(store, "train", "xray", targets=("labels", "annotated"), unlabeled=True)
    assert (labelled.labels >= 0).all() and len(every) == len(labelled) + POOL
    for i in np.flatnonzero(every.labels < 0)[:3]:
        item = every[i]
        assert item["label"] == -1 and (item["labels"] == 255).all()  # masked BCE leaves every label out
        assert item["labels"].shape == labelled[0]["labels"].shape


def _damage(layout: str, root: Path, damage: str) -> tuple[str, ...]:
    """Break the copy at `root` one way; the words its one-line error must hold."""
    name = pool_names(root)[0]
    if layout == "nih":
        table = root / "Data_Entry_2017.csv"
        lines = table.read_text().splitlines()
        index = next(i for i, line in enumerate(lines) if line.startswith(name + ","))
        fields = lines[index].split(",")
        if damage == "also-labelled":  # a labelled image listed a second time without labels
            labelled = next(line for line in lines[1:] if line.split(",")[1])
            table.write_text("\n".join([*lines, labelled.split(",")[0] + ",," + ",".join(labelled.split(",")[2:])])
                             + "\n")
            return ("listed unlabeled here and labelled at line",)
        if damage == "held-out":  # its patient has images in test_list.txt
            test_name = (root / "test_list.txt").read_text().split()[0]
            fields[3] = str(int(test_name.split("_")[0]))
            lines[index] = ",".join(fields)
            table.write_text("\n".join(lines) + "\n")
            return ("unlabeled image", "who has images in test_list.txt")
        if damage == "test-list":
            listing = (root / "train_val_list.txt").read_text().split()
            (root / "train_val_list.txt").write_text("\n".join(n for n in listing if n != name) + "\n")
            (root / "test_list.txt").write_text((root / "test_list.txt").read_text() + name + "\n")
            return ("unlabeled image", "is in test_list.txt")
        if damage == "box":
            box = root / "BBox_List_2017.csv"
            box.write_text(box.read_text() + f"{name},Nodule,10.0,10.0,5.0,5.0\n")
            return ("which is unlabeled",)
        for image in root.glob(f"images_*/images/{Path(name).stem}.*"):
            image.unlink()
        return (name, "not found")
    split_path = root / "mimic-cxr-2.0.0-split.csv"
    split = rows(split_path)
    row = next(r for r in split if r[0] == name)
    if damage == "also-labelled":  # a labelled study gets a second row with every finding blank
        chexpert = root / "mimic-cxr-2.0.0-chexpert.csv"
        labelled = rows(chexpert)[1]
        chexpert.write_text(chexpert.read_text() + ",".join(labelled[:2] + [""] * (len(labelled) - 2)) + "\n")
        return ("every finding blank", "and a labelled one")
    if damage in ("held-out", "test-list"):
        row[3] = "test"
        split_path.write_text("\n".join(",".join(r) for r in split) + "\n")
        return ("unlabeled image", "is in split 'test'")
    for image in root.glob(f"files/*/p{row[2]}/s{row[1]}/{name}.*"):
        image.unlink()
    return (name, "not found")


@pytest.mark.parametrize("damage", ["also-labelled", "held-out", "test-list", "box", "missing-image"])
def test_bad_unlabeled_images_are_refused_in_one_line(raw, tmp_path, damage) -> None:
    layout, root = raw
    if damage == "box" and layout == "mimic":
        pytest.skip("MIMIC-CXR has no box file")
    copy = tmp_path / "raw"
    shutil.copytree(root, copy)
    needles = _damage(layout, copy, damage)
    out = tmp_path / "out"
    assert_one_line_error(prepare(copy, out, layout), *needles)
    assert not out.exists()


# ---------------------------------------------------------------- CVI


def _cvi(**params):
    from kdcli.methods.cvi import CVI, CVIParams
    from kdcli.models.classifier import Classifier, default_normalisation

    torch.manual_seed(0)
    mean, std = default_normalisation(1)
    stage1 = Classifier({"backbone": "test_resnet", "head": "linear", "in_chans": 1, "num_classes": 3, "mean": mean,
                         "std": std})
    p = CVIParams(samples=4, latent=8, hidden=16, **params)
    return CVI(p, CVI.make_student(p, stage1))


def _batch() -> dict[str, torch.Tensor]:
    """Six images: labelled with gaze (0, 1), labelled without (2), unlabeled with gaze (3, 4), unlabeled
    without (5); unlabeled label vectors are all "unknown" (255), as the views read them."""
    generator = torch.Generator().manual_seed(1)
    gaze = torch.zeros(6, 1, 32, 32)
    gaze[:, :, 6:16, 4:14] = 1.0
    flags = torch.tensor([[1, 0], [1, 0], [0, 0], [1, 0], [1, 0], [0, 0]], dtype=torch.uint8)
    labels = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0]] + [[255] * 3] * 3, dtype=torch.uint8)
    return {"image": torch.rand(6, 1, 32, 32, generator=generator).requires_grad_(True),
            "label": torch.tensor([1, 1, 1, -1, -1, -1]), "labels": labels, "gaze": gaze * flags[:, :1, None, None],
            "boxes": torch.zeros(6, 1, 32, 32), "annotated": flags}


def test_unlabeled_images_reach_only_the_kl_term() -> None:
    cvi = _cvi(annotated_only=False).eval()  # eval: BatchNorm's running statistics, so images do not mix
    cvi.__dict__["progress"] = 0.125  # the top of an annealing cycle: beta = 1
    data = _batch()
    terms = cvi(data)
    unlabeled = data["label"] < 0
    grads = {}
    for name in ("bce_prior", "bce_posterior", "kl"):
        (grads[name],) = torch.autograd.grad(terms[name], data["image"], retain_graph=True)
    per_image = {name: g.abs().flatten(1).sum(1) for name, g in grads.items()}
    assert per_image["bce_prior"][unlabeled].max() == 0 and per_image["bce_prior"][~unlabeled].min() > 0
    assert per_image["bce_posterior"][unlabeled].max() == 0 and per_image["bce_posterior"][:2].min() > 0
    assert per_image["kl"][3:5].min() > 0  # the unlabeled images with gaze: the posterior teaches the prior
    assert per_image["kl"][5] == 0 and per_image["kl"][2] == 0  # no annotation, nothing to distil
    assert terms["_unlabeled"].item() == pytest.approx(0.5)
    # whatever an unlabeled image's label vector says, the supervised terms do not change
    data["labels"][3:] = torch.tensor([1, 1, 1], dtype=torch.uint8)
    again = cvi(data)
    for name in ("bce_prior", "bce_posterior", "kl"):
        assert again[name].item() == pytest.approx(terms[name].item()), name


def test_a_batch_of_unlabeled_images_alone_gives_finite_terms() -> None:
    cvi = _cvi().train()
    data = {k: v[3:5] for k, v in _batch().items()}
    terms = cvi(data)
    assert terms["bce_prior"].item() == 0 and terms["bce_posterior"].item() == 0
    assert torch.isfinite(terms["kl"]) and terms["_kl_raw"] > 0
    sum(v for k, v in terms.items() if not k.startswith("_")).backward()  # every term still in the graph


def test_training_rows_keep_unlabeled_images_only_with_the_annotation(shards) -> None:
    _, _, out = shards
    view = ModalityView(ShardStore(out), "train", "xray", targets=("annotated",), unlabeled=True)
    flags = np.array([view[i]["annotated"].numpy() for i in range(len(view))])
    annotated_only = _cvi().train_rows(view)
    assert set(annotated_only) == set(np.flatnonzero(flags[:, 0]))  # labelled or not, with gaze
    assert (view.labels[annotated_only] < 0).any()
    everyone = _cvi(annotated_only=False).train_rows(view)
    assert set(everyone) == set(np.flatnonzero((view.labels >= 0) | (flags[:, 0] > 0)))


@pytest.mark.slow
def test_cvi_distils_on_the_pool_and_not_with_no_unlabeled(shards, tmp_path) -> None:
    layout, _, out = shards
    if layout != "nih":
        pytest.skip("one layout is enough for the end-to-end run")
    stage1 = tmp_path / "stage1.pt"
    kdcli_run("teach", "--data", out, "--modality", "xray", "--head", "linear", "--out", stage1, *QUICK)
    runs = {}
    for flag in ("--unlabeled", "--no-unlabeled"):
        path = tmp_path / f"cvi{flag}.pt"
        runs[flag] = kdcli_run("distill", "--data", out, "--teacher", stage1, "--student", "xray", "--method", "cvi",
                               "--out", path, flag, *QUICK).output
        runs[flag + "metrics"] = [json.loads(line) for line in path.with_suffix(".metrics.jsonl").read_text()
                                  .splitlines() if line.strip()]
    assert f"{POOL} unlabeled xray samples: distillation terms only" in runs["--unlabeled"]
    assert f"--no-unlabeled: {POOL} unlabeled xray samples left out" in runs["--no-unlabeled"]
    assert runs["--unlabeled" + "metrics"][-1]["train_unlabeled"] > 0
    assert runs["--no-unlabeled" + "metrics"][-1]["train_unlabeled"] == 0
