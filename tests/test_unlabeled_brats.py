"""Unlabeled BraTS cases (validation data: four sequences, no label): prepare --unlabeled stores them as train
slices without label maps, teach never sees them, ProtoKD distils on them (KD and prototypes from the teacher's
own prediction, no segmentation loss)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import polars as pl
import pytest
import torch
from conftest import kdcli_run
from test_prepare_multieye import assert_one_line_error

from kdcli.shards.reader import ShardStore

SEG_QUICK = ["--epochs", "1", "--batch-size", "8", "--workers", "0", "--model", "plain-4-2", "--lr", "3e-3"]
UNLABELED_CASES = 3


def case_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and any(p.glob("*.nii*")))


def drop_labels(folder: Path, keep_in: Path | None = None) -> None:
    for label in folder.glob("*seg.nii*"):
        if keep_in is not None:
            keep_in.mkdir(parents=True, exist_ok=True)
            shutil.move(str(label), keep_in / label.name)
        else:
            label.unlink()


@pytest.fixture(scope="module")
def raws(tmp_path_factory) -> dict[str, Path]:
    """raw/: labelled cases of a `synth brats` phantom; unlabeled/: the last few of its cases, their labels moved
    to labels/<case>/."""
    root = tmp_path_factory.mktemp("unlabeled-brats")
    kdcli_run("synth", "brats", root / "raw", "--cases", 8 + UNLABELED_CASES, "--size", "32")
    (root / "unlabeled").mkdir()
    for folder in case_folders(root / "raw")[-UNLABELED_CASES:]:
        shutil.move(str(folder), root / "unlabeled" / folder.name)
        drop_labels(root / "unlabeled" / folder.name, keep_in=root / "labels" / folder.name)
    return {"raw": root / "raw", "unlabeled": root / "unlabeled", "root": root}


@pytest.fixture(scope="module")
def shards(raws) -> Path:
    out = raws["root"] / "shards"
    result = kdcli_run("prepare", "brats", raws["raw"], "--out", out, "--size", "32", "--unlabeled", raws["unlabeled"])
    assert f"unlabeled: {UNLABELED_CASES} case(s) from {raws['unlabeled']}" in result.output
    return out


def brain_slices(folder: Path) -> int:
    """Axial slices where any sequence is non-zero, straight from the NIfTI files."""
    volumes = [np.asanyarray(nib.load(str(path)).dataobj) for path in folder.glob("*.nii*")]
    return int(np.logical_or.reduce([v != 0 for v in volumes]).any(axis=(0, 1)).sum())


def test_unlabeled_cases_are_train_slices_without_label_maps(raws, shards):
    expected = sum(brain_slices(folder) for folder in case_folders(raws["unlabeled"]))  # every brain slice kept
    meta = json.loads((shards / "dataset.json").read_text())
    assert meta["unlabeled"] == {m: {"train": expected, "dev": 0, "test": 0} for m in ("t1", "t1ce", "t2", "flair")}
    report = json.loads(kdcli_run("inspect", shards, "--json").stdout)
    assert report["unlabeled"]["t1ce"]["train"] == expected
    assert report["per_class"]["t1ce"]["train"]["unlabeled"] == expected
    manifest = ShardStore(shards).manifest
    unlabeled = manifest.filter(~pl.col("labelled"))
    assert set(unlabeled["record"]) == {f.name for f in case_folders(raws["unlabeled"])}
    assert set(unlabeled["split"]) == {"train"} and set(unlabeled["label"]) == {-1}
    assert set(unlabeled["shard"]).isdisjoint(manifest.filter(pl.col("labelled"))["shard"])
    for shard in manifest["shard"].unique():
        with h5py.File(shards / "shards" / shard, "r") as handle:
            has_labels = "seg" in handle
        assert has_labels == ("-unlabeled-" not in shard), shard
    records = json.loads((shards / "records.json").read_text())
    for case in set(unlabeled["record"]):
        assert records[case]["unlabeled"] and "label_file" not in records[case]
    assert "(verified)" in kdcli_run("inspect", shards, "--verify").output


def test_the_labelled_part_is_the_dataset_prepared_without_them(raws, shards):
    """Adding unlabeled cases moves no labelled case to another split and changes none of their shards."""
    alone = raws["root"] / "labelled-only"
    kdcli_run("prepare", "brats", raws["raw"], "--out", alone, "--size", "32")
    assert json.loads((alone / "dataset.json").read_text())["unlabeled"] == {}
    columns = ["id", "group", "split", "label", "shard", "index", "position"]
    with_pool = ShardStore(shards).manifest.filter(pl.col("labelled")).select(columns).sort("id")
    assert with_pool.equals(pl.read_parquet(alone / "manifest.parquet").select(columns).sort("id"))
    for shard in with_pool["shard"].unique():
        with h5py.File(shards / "shards" / shard) as a, h5py.File(alone / "shards" / shard) as b:
            assert a.attrs["digest"] == b.attrs["digest"]


def test_a_case_without_label_is_refused_unless_its_folder_is_given_as_unlabeled(raws, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(raws["raw"], raw)
    shutil.copytree(raws["unlabeled"], raw / "Validation")  # a release's training and validation side by side
    assert_one_line_error(kdcli_run("prepare", "brats", raw, "--out", tmp_path / "refused", "--size", "32", ok=False),
                          "missing label", "--unlabeled DIR")
    result = kdcli_run("prepare", "brats", raw, "--out", tmp_path / "shards", "--size", "32", "--unlabeled",
                       raw / "Validation")
    assert json.loads((tmp_path / "shards" / "dataset.json").read_text())["unlabeled"]["t1"]["train"] > 0
    assert "note: unlabeled: 3 case(s)" in result.output


def test_a_label_file_in_the_unlabeled_folder_is_ignored_with_a_note(raws, tmp_path):
    pool = tmp_path / "pool"
    shutil.copytree(raws["unlabeled"], pool)
    first = case_folders(pool)[0]
    shutil.copy(next((raws["root"] / "labels" / first.name).glob("*seg.nii*")), first)
    result = kdcli_run("prepare", "brats", raws["raw"], "--out", tmp_path / "shards", "--size", "32", "--unlabeled",
                       pool)
    assert f"label files of 1 case(s) ignored (first: {first.name})" in result.output
    manifest = ShardStore(tmp_path / "shards").manifest
    assert set(manifest.filter(pl.col("record") == first.name)["label"]) == {-1}


def held_out_patient_setup(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """2023 naming: an unlabeled follow-up scan (timepoint -009) of a patient whose labelled case is in dev."""
    from kdcli.sources.brats import patient_of

    raw, pool = tmp_path / "raw23", tmp_path / "pool23"
    kdcli_run("synth", "brats", raw, "--cases", "5", "--size", "32", "--naming", "2023")
    folders = case_folders(raw)
    patient = patient_of(folders[0].name)
    rows = ["case,split", *(f"{f.name},{'dev' if patient_of(f.name) == patient else 'train'}" for f in folders)]
    (tmp_path / "splits.csv").write_text("\n".join(rows) + "\n")
    follow_up = pool / f"{patient}-009"
    follow_up.mkdir(parents=True)
    for path in folders[0].glob("*.nii*"):
        if "-seg." not in path.name:
            shutil.copy(path, follow_up / path.name.replace(folders[0].name, follow_up.name))
    return raw, pool, ["--splits", tmp_path / "splits.csv"]


@pytest.mark.parametrize("damage", ["also-labelled", "held-out-patient", "listed-in-dev", "missing-sequence"])
def test_bad_unlabeled_cases_are_refused_in_one_line(raws, tmp_path, damage):
    raw, pool, extra = raws["raw"], tmp_path / "pool", []
    shutil.copytree(raws["unlabeled"], pool)
    if damage == "also-labelled":
        labelled = case_folders(raw)[0]
        shutil.copytree(labelled, pool / labelled.name)
        drop_labels(pool / labelled.name)
        needles = (f"case {labelled.name} is both labelled", "unlabeled")
    elif damage == "held-out-patient":
        raw, pool, extra = held_out_patient_setup(tmp_path)
        needles = ("unlabeled record", "-009", "of split 'dev'")
    elif damage == "listed-in-dev":
        cases = [f.name for f in case_folders(raw)]
        listed = case_folders(pool)[0].name
        (tmp_path / "splits.csv").write_text("case,split\n" + "".join(f"{c},train\n" for c in cases[:-1])
                                             + f"{cases[-1]},dev\n{listed},dev\n")
        extra = ["--splits", tmp_path / "splits.csv"]
        needles = (f"unlabeled record {listed!r} is in split 'dev'",)
    else:
        victim = case_folders(pool)[0]
        next(victim.glob("*_flair.nii*")).unlink()
        needles = (f"case {victim.name}: missing sequence flair",)
    out = tmp_path / "shards"
    assert_one_line_error(kdcli_run("prepare", "brats", raw, "--out", out, "--size", "32", "--unlabeled", pool, *extra,
                                    ok=False),
                          *needles)
    assert not out.exists()


def test_slice_view_leaves_unlabeled_slices_out_unless_asked(shards):
    from kdcli.data.slices import SliceView

    store = ShardStore(shards)
    count = store.meta.unlabeled["t1ce"]["train"]
    labelled = SliceView(store, "train", ["t1ce"])
    every = SliceView(store, "train", ["t1ce"], ["t1", "t1ce", "t2", "flair"], augment=True, unlabeled=True)
    assert (labelled.labels >= 0).all() and len(every) == len(labelled) + count
    for i in np.flatnonzero(every.labels < 0)[:5]:
        item = every[int(i)]
        assert item["label"] == -1 and (item["mask"] == -1).all() and item["mask"].shape == (32, 32)
        assert item["teacher_image"].shape == (4, 32, 32)


class FixedUNet(torch.nn.Module):
    """A stand-in network returning given logits and features whatever the input."""

    def __init__(self, logits: torch.Tensor, features: torch.Tensor):
        super().__init__()
        self.logits, self.features = logits, features

    def forward(self, images):
        return {"logits": self.logits, "features": self.features}


def test_unlabeled_slices_reach_only_the_kd_and_prototype_terms():
    from kdcli.methods.protokd import ProtoKD, ProtoKDParams, prototype_terms
    from kdcli.methods.segmentation import segmentation_loss

    torch.manual_seed(0)
    n, classes, side = 4, 4, 8
    teacher_logits, teacher_features = torch.randn(n, classes, side, side), torch.randn(n, 6, side, side)
    method = ProtoKD(ProtoKDParams(), torch.nn.Identity(), FixedUNet(teacher_logits, teacher_features))
    logits = torch.randn(n, classes, side, side, requires_grad=True)
    features = torch.randn(n, 6, side, side, requires_grad=True)
    mask = torch.randint(0, classes, (n, side, side))
    label = torch.tensor([1, -1, 1, -1])
    mask[label < 0] = -1
    batch = {"mask": mask, "label": label, "teacher_image": torch.zeros(n, 4, side, side)}
    terms = method.loss(batch, {"logits": logits, "features": features})
    assert terms["_unlabeled"].item() == pytest.approx(0.5)
    unlabeled = label < 0
    for name in ("ce", "dice"):
        (grad,) = torch.autograd.grad(terms[name], logits, retain_graph=True)
        assert grad[unlabeled].abs().max() == 0 and grad[~unlabeled].abs().max() > 0, name
    (grad,) = torch.autograd.grad(terms["kd"], logits, retain_graph=True)
    assert grad[unlabeled].abs().max() > 0
    (grad,) = torch.autograd.grad(terms["proto"], features, retain_graph=True)
    assert grad[unlabeled].abs().max() > 0
    # the prototypes of unlabeled slices come from the teacher's own prediction, labelled ones from the truth
    from_teacher = torch.where(mask < 0, teacher_logits.argmax(1), mask)
    expected = prototype_terms(features, teacher_features, from_teacher, classes)["proto"]
    assert terms["proto"].item() == pytest.approx(ProtoKDParams().proto_weight * expected.item())
    # the segmentation terms: those of the labelled slices alone
    alone = segmentation_loss(logits[~unlabeled], mask[~unlabeled])
    assert terms["ce"].item() == pytest.approx(alone["ce"].item(), rel=1e-5)
    assert terms["dice"].item() == pytest.approx(alone["dice"].item(), rel=1e-5)


def test_a_batch_of_unlabeled_slices_alone_gives_finite_terms():
    from kdcli.methods.protokd import ProtoKD, ProtoKDParams

    torch.manual_seed(1)
    teacher = FixedUNet(torch.randn(2, 4, 8, 8), torch.randn(2, 6, 8, 8))
    method = ProtoKD(ProtoKDParams(), torch.nn.Identity(), teacher)
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    batch = {"mask": torch.full((2, 8, 8), -1), "label": torch.tensor([-1, -1]),
             "teacher_image": torch.zeros(2, 4, 8, 8)}
    terms = method.loss(batch, {"logits": logits, "features": torch.randn(2, 6, 8, 8, requires_grad=True)})
    assert terms["ce"].item() == 0 and terms["dice"].item() == 0 and terms["_unlabeled"].item() == 1
    assert all(torch.isfinite(v) for v in terms.values())
    sum(v for k, v in terms.items() if not k.startswith("_")).backward()
    assert torch.isfinite(logits.grad).all()


def test_labelled_pixels_of_one_class_alone_give_plain_cross_entropy():
    """Tumour-free slices beside unlabeled ones: the official class weights are all 0 there (NaN)."""
    from kdcli.methods.segmentation import weighted_cross_entropy

    torch.manual_seed(2)
    logits = torch.randn(3, 4, 8, 8)
    mask = torch.zeros(3, 8, 8, dtype=torch.long)
    mask[2] = -1
    value = weighted_cross_entropy(logits, mask)
    assert torch.isfinite(value)
    assert value.item() == pytest.approx(torch.nn.functional.cross_entropy(logits[:2], mask[:2]).item(), rel=1e-6)


@pytest.fixture(scope="module")
def teacher(shards) -> Path:
    path = shards.parent / "teacher.pt"
    # teach never sees unlabeled slices: a mask of -1 would break its one-hot Dice
    kdcli_run("teach", "--data", shards, "--modality", "t1,t1ce,t2,flair", "--out", path, *SEG_QUICK)
    return path


def metrics(path: Path) -> dict:
    return json.loads(path.with_name(path.name.replace(".pt", ".metrics.jsonl")).read_text().splitlines()[-1])


def test_protokd_distils_on_unlabeled_slices_at_the_ratio_and_not_with_no_unlabeled(shards, teacher, tmp_path):
    count = ShardStore(shards).meta.unlabeled["t1ce"]["train"]
    student = tmp_path / "protokd.pt"
    result = kdcli_run("distill", "--data", shards, "--teacher", teacher, "--student", "t1ce", "--method", "protokd",
                       "--out", student, "--unlabeled-ratio", "3", *SEG_QUICK)
    assert f"{count} unlabeled t1ce slices: distillation terms only, 3 per labelled slice" in result.output
    row = metrics(student)
    assert row["train_unlabeled"] == pytest.approx(0.75, abs=0.15)  # 3 unlabeled per labelled slice
    assert np.isfinite(row["train_ce"]) and np.isfinite(row["train_proto"])
    left_out = tmp_path / "protokd-no.pt"
    result = kdcli_run("distill", "--data", shards, "--teacher", teacher, "--student", "t1ce", "--method", "protokd",
                       "--out", left_out, "--no-unlabeled", *SEG_QUICK)
    assert f"--no-unlabeled: {count} unlabeled t1ce slices left out" in result.output
    assert metrics(left_out)["train_unlabeled"] == 0


def test_synth_brats_unlabeled_folder_is_prepared_as_unlabeled_training_cases(tmp_path):
    raw = tmp_path / "raw"
    made = kdcli_run("synth", "brats", raw, "--cases", "6", "--size", "32", "--unlabeled", "2")
    assert f"prepare with --unlabeled {raw / 'unlabeled'}" in made.output
    pool = case_folders(raw / "unlabeled")
    assert len(pool) == 2 and not any(list(p.glob("*seg.nii*")) for p in pool)
    out = tmp_path / "shards"
    kdcli_run("prepare", "brats", raw, "--out", out, "--size", "32", "--unlabeled", raw / "unlabeled")
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["unlabeled"]["t1ce"]["train"] > 0 and meta["unlabeled"]["t1ce"]["test"] == 0
    store = ShardStore(out)
    records = set(store.manifest.filter(~store.manifest["labelled"])["record"])
    assert records == {p.name for p in pool}
