"""Unlabeled paired data: prepare reads the unlabeled lists, teach never sees them, distillation terms do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, kdcli_run
from test_prepare_multieye import assert_one_line_error

from kdcli.data.views import ModalityView, PairedView, class_balanced_sampler
from kdcli.shards.reader import ShardStore

LAYOUT = {"fundus": ("assemble", "cfp-clahe-224x224"), "oct": ("assemble_oct", "oct-filter-448x448")}
QUICK = ["--model", TINY_MODEL, "--epochs", "1", "--batch-size", "8", "--workers", "0", "--lr", "3e-3"]


def add_unlabeled(raw: Path, names: dict[str, list[str]], second_column: bool = False) -> None:
    """Unlabeled images (copies of labelled ones under new names) and their lists, per modality."""
    for modality, wanted in names.items():
        folder, images = LAYOUT[modality]
        image_dir = raw / folder / "train" / "ImageData" / images
        sources = sorted(image_dir.glob("*.png"))
        lines = []
        for k, name in enumerate(wanted):
            shutil.copy(sources[k % len(sources)], image_dir / f"{name}.png")
            lines.append(f"{name} 3" if second_column else name)
        (raw / folder / "train" / "unlabeled.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def paired_raw(tmp_path_factory) -> Path:
    from kdcli.synth.multieye import synth_multieye

    raw = tmp_path_factory.mktemp("unlabeled") / "raw"
    synth_multieye(raw, per_class=5, size=32, seed=3, paired=True)
    pool = [f"pool-{k:03d}" for k in range(12)]
    add_unlabeled(raw, {"fundus": [*pool, "fundus-only"], "oct": pool}, second_column=True)
    return raw


@pytest.fixture(scope="module")
def paired_shards(paired_raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("unlabeled-shards") / "me"
    result = kdcli_run("prepare", "multieye", paired_raw, "--out", out, "--size", "32")
    assert "unlabeled pool: 13 fundus, 12 oct images (12 paired eyes)" in result.output
    assert "columns after the image name ignored" in result.output
    return out


def test_prepare_records_unlabeled_samples_in_train_only(paired_shards):
    meta = json.loads((paired_shards / "dataset.json").read_text())
    assert meta["pairing"] == "paired"
    assert meta["unlabeled"] == {"fundus": {"train": 13, "dev": 0, "test": 0},
                                 "oct": {"train": 12, "dev": 0, "test": 0}}
    store = ShardStore(paired_shards)
    unlabeled = store.manifest.filter(~store.manifest["labelled"])
    assert set(unlabeled["split"]) == {"train"} and set(unlabeled["label"]) == {-1}
    report = json.loads(kdcli_run("inspect", paired_shards, "--json", ok=False).stdout)
    assert report["unlabeled"]["fundus"]["train"] == 13
    assert report["per_class"]["fundus"]["train"]["unlabeled"] == 13


def test_teach_and_plain_views_never_see_unlabeled_samples(paired_shards, tmp_path):
    store = ShardStore(paired_shards)
    labelled = store.manifest.filter(store.manifest["labelled"] & (store.manifest["split"] == "train"))
    assert len(ModalityView(store, "train", "fundus")) == labelled.height
    assert len(ModalityView(store, "train", "fundus", unlabeled=True)) == labelled.height + 13
    # a label of -1 reaching cross-entropy would fail the run ("Target -1 is out of bounds")
    kdcli_run("teach", "--data", paired_shards, "--modality", "oct", "--out", tmp_path / "oct.pt", *QUICK)


def test_paired_view_leaves_out_unlabeled_images_without_a_partner(paired_shards):
    view = PairedView(ShardStore(paired_shards), "train", "fundus", "oct", unlabeled=True)
    assert (view.labels == -1).sum() == 12 and view.notes == ["1 unlabeled fundus images have no oct partner: "
                                                              "not used"]
    for i in np.flatnonzero(view.labels == -1):
        j = int(view[i]["teacher_index"])
        assert view.teacher.ids[j] == view.student.ids[int(view.rows[i])]


def test_kd_trains_its_ce_on_labelled_samples_and_its_kl_on_all():
    from kdcli.methods.kd import HintonKD, KDParams

    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, images):
            return {"logits": self.logits}

    torch.manual_seed(0)
    teacher = Fixed(torch.randn(6, 4))
    method = HintonKD(KDParams(), torch.nn.Identity(), teacher)
    logits = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([0, -1, 2, -1, 3, 1])
    terms = method.loss({"label": labels, "teacher_image": torch.zeros(6, 1)}, {"logits": logits})
    labelled = labels >= 0
    assert terms["ce"].item() == pytest.approx(torch.nn.functional.cross_entropy(logits[labelled],
                                                                                  labels[labelled]).item())
    (ce_grad,) = torch.autograd.grad(terms["ce"], logits, retain_graph=True)
    (kd_grad,) = torch.autograd.grad(terms["kd"], logits)
    assert ce_grad[~labelled].abs().max() == 0 and ce_grad[labelled].abs().max() > 0
    assert kd_grad[~labelled].abs().max() > 0
    all_unlabeled = method.loss({"label": torch.full((6,), -1), "teacher_image": torch.zeros(6, 1)},
                                {"logits": logits})
    assert all_unlabeled["ce"].item() == 0 and torch.isfinite(all_unlabeled["kd"])


@pytest.mark.parametrize("ratio", [0.5, 2.0])
def test_sampler_draws_unlabeled_samples_at_the_ratio(ratio):
    labels = np.array([0] * 10 + [1] * 30 + [-1] * 100)
    drawn = labels[list(class_balanced_sampler(labels, 20_000, seed=0, unlabeled_ratio=ratio))]
    assert (drawn == -1).mean() == pytest.approx(ratio / (1 + ratio), abs=0.02)
    assert (drawn == 0).sum() == pytest.approx((drawn == 1).sum(), rel=0.1)  # still class-balanced


# slow: a teacher and three KD runs; the pool's distillation stays fast on BraTS (test_unlabeled_brats)
@pytest.mark.slow
def test_distill_uses_the_pool_for_kd_and_not_with_no_unlabeled(paired_shards, tmp_path):
    teacher = tmp_path / "oct.pt"
    kdcli_run("teach", "--data", paired_shards, "--modality", "oct", "--out", teacher, *QUICK)
    result = kdcli_run("distill", "--data", paired_shards, "--teacher", teacher, "--student", "fundus", "--method",
                       "kd", "--out", tmp_path / "kd.pt", *QUICK)
    assert "13 unlabeled fundus samples: distillation terms only" in result.output
    assert "1 unlabeled fundus images have no oct partner" in result.output
    result = kdcli_run("distill", "--data", paired_shards, "--teacher", teacher, "--student", "fundus", "--method",
                       "kd", "--out", tmp_path / "kd-no.pt", "--no-unlabeled", *QUICK)
    assert "--no-unlabeled: 13 unlabeled fundus samples left out" in result.output
    kdcli_run("distill", "--data", paired_shards, "--teacher", teacher, "--student", "fundus", "--method", "kd",
              "--out", tmp_path / "kd-cached.pt", "--cache-teacher", *QUICK)


@pytest.mark.parametrize("damage", ["also-labelled", "in-dev", "missing-image"])
def test_bad_unlabeled_lists_are_refused_in_one_line(paired_raw, tmp_path, damage):
    raw = tmp_path / "raw"
    shutil.copytree(paired_raw, raw)
    listing = raw / "assemble" / "train" / "unlabeled.txt"
    if damage == "also-labelled":
        labelled = (raw / "assemble" / "train" / "large9cls.txt").read_text().split()[0]
        listing.write_text(listing.read_text() + f"{labelled}\n")
        needles = ("is also labelled",)
    elif damage == "in-dev":
        shutil.copy(listing, raw / "assemble" / "dev" / "unlabeled.txt")
        needles = ("unlabeled list under dev/", "train/")
    else:
        listing.write_text(listing.read_text() + "no-such-image\n")
        needles = ("'no-such-image' not found",)
    out = tmp_path / "shards"
    assert_one_line_error(kdcli_run("prepare", "multieye", raw, "--out", out, "--size", "32", ok=False), *needles)
    assert not out.exists()


def test_synth_unlabeled_pool_is_prepared_as_unlabeled_paired_eyes(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "shards"
    kdcli_run("synth", "multieye", raw, "--paired", "--unlabeled", "15", "--per-class", "3", "--size", "16")
    names = {m: (raw / folder / "train" / "unlabeled.txt").read_text().split() for m, (folder, _) in LAYOUT.items()}
    assert len(names["fundus"]) == 15 and names["fundus"] == names["oct"]
    labelled = (raw / "assemble" / "train" / "large9cls.txt").read_text().split()[::2]
    assert not set(names["fundus"]) & set(labelled)
    kdcli_run("prepare", "multieye", raw, "--out", out, "--size", "16")
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["pairing"] == "paired" and meta["unlabeled"]["fundus"]["train"] == 15
    view = PairedView(ShardStore(out), "train", "fundus", "oct", unlabeled=True)
    assert (view.labels == -1).sum() == 15 and not view.notes
