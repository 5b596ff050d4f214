"""prepare on BraTS phantoms of every release's naming: layout quirks, normalisation, slice selection, splits,
rebuilding label volumes, and one-line errors (or notes with skip_bad) for damaged cases."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import polars as pl
import pytest

from kdcli.errors import KdcliError
from kdcli.prepare import PrepareOptions, prepare
from kdcli.sources.brats import BratsSource, label_volume, patient_of, write_label_nifti
from kdcli.synth.brats import synth_brats

SIZE = 32
SEQUENCE_FILES = {  # naming -> kdcli name -> file suffix, as the releases spell them
    "2018-2021": {"t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "flair": "_flair", "seg": "_seg"},
    "2023": {"t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "flair": "-t2f", "seg": "-seg"},
}


@pytest.fixture(scope="module")
def raws(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """naming -> (raw folder, synth summary). 2023 with seed 1 has follow-up scans (-001, -002)."""
    root = tmp_path_factory.mktemp("brats_raw")
    made = {}
    for naming, cases, seed in (("2018", 5, 0), ("2019", 4, 0), ("2020", 5, 0), ("2021", 6, 0), ("2023", 8, 1)):
        made[naming] = (root / naming, synth_brats(root / naming, cases=cases, size=SIZE, naming=naming, seed=seed))
    return made


def run(raw: Path, out: Path, size: int = SIZE, **source_options):
    return prepare(PrepareOptions(source="brats", raw=raw, out=out, size=size, source_options=source_options))


def load(out: Path) -> tuple[dict, pl.DataFrame, dict]:
    return (json.loads((out / "dataset.json").read_text()), pl.read_parquet(out / "manifest.parquet"),
            json.loads((out / "records.json").read_text()))


def stored(out: Path, record: str, manifest: pl.DataFrame) -> dict[str, np.ndarray]:
    """Every stored array of one record, slices in position order, plus `position` and `label`."""
    rows = manifest.filter(pl.col("record") == record).sort("position")
    arrays: dict[str, list] = {}
    for row in rows.iter_rows(named=True):
        with h5py.File(out / "shards" / row["shard"], "r") as handle:
            assert handle["id"][row["index"]].decode() == row["id"] == f"{record}:{row['position']:03d}"
            for name in ("t1", "t1ce", "t2", "flair", "seg"):
                arrays.setdefault(name, []).append(handle[name][row["index"]])
    result = {name: np.stack(values) for name, values in arrays.items()}
    result["position"], result["label"] = rows["position"].to_numpy(), rows["label"].to_numpy()
    return result


def nifti(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def brain_and_tumour(raw: Path, case: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per axial slice: holds brain (any sequence nonzero), holds tumour; computed here, independently."""
    brain = np.any([nifti(raw / case["files"][n]) != 0 for n in ("t1", "t1ce", "t2", "flair")], axis=0)
    tumour = nifti(raw / case["files"]["seg"]) > 0
    return brain.any(axis=(0, 1)), tumour.any(axis=(0, 1))


@pytest.mark.parametrize("naming", ["2018", "2019", "2020", "2021", "2023"])
def test_every_naming_prepares_with_kdcli_labels(raws, naming, tmp_path):
    raw, synth = raws[naming]
    result = run(raw, tmp_path / "out")
    meta, manifest, records = load(tmp_path / "out")
    style = "2023" if naming == "2023" else "2018-2021"
    et_value = 3 if naming == "2023" else 4
    assert meta["source"] == "brats" and meta["task"] == "segmentation" and meta["pairing"] == "paired"
    assert meta["classes"] == ["background", "necrotic core", "oedema", "enhancing tumour"]
    assert meta["modalities"] == {n: {"shape": [SIZE, SIZE, 1], "dtype": "float16"}
                                  for n in ("t1", "t1ce", "t2", "flair")}
    assert meta["targets"] == {"seg": {"shape": [SIZE, SIZE, 1], "dtype": "uint8", "kind": "mask", "role": "target"}}
    assert set(manifest["modality"]) == {"flair+t1+t1ce+t2"}  # the label volume is not a modality
    assert meta["extra"]["naming"] == [style]
    assert meta["extra"]["label_values"] == {style: {"0": 0, "1": 1, "2": 2, str(et_value): 3}}
    assert meta["extra"]["regions"] == {"wt": [1, 2, 3], "tc": [1, 3], "et": [3]}
    assert meta["extra"]["modality_order"] == ["t1", "t1ce", "t2", "flair"]
    ids = sorted(c["id"] for c in synth["cases"])
    assert sorted(records) == ids and sorted(manifest["record"].unique()) == ids
    for case in synth["cases"]:
        info = records[case["id"]]
        assert info["et_value"] == et_value and info["naming"] == style
        assert info["label_file"] == Path(case["files"]["seg"]).name
        assert info["shape"] == list(nib.load(str(raw / case["files"]["seg"])).shape)
        np.testing.assert_allclose(info["affine"], nib.load(str(raw / case["files"]["t1"])).affine)
        # Stored labels are kdcli indices: the release's ET value appears as 3 and never as itself.
        arrays = stored(tmp_path / "out", case["id"], manifest)
        seg = arrays["seg"]
        assert seg.dtype == np.uint8 and set(np.unique(seg)) <= {0, 1, 2, 3}
        original = nifti(raw / case["files"]["seg"])
        assert (3 in np.unique(seg)) == (et_value in np.unique(original))
        assert np.array_equal(arrays["label"], original[:, :, arrays["position"]].any(axis=(0, 1)).astype(int))
        assert arrays["t1ce"].dtype == np.float16 and arrays["t1ce"].shape[1:] == (SIZE, SIZE, 1)
    quirk = [note for note in result.notes if "W39_1998.09.19_Segm.nii" in note]
    if naming == "2020":
        last = synth["cases"][-1]["id"]
        assert Path(synth["cases"][-1]["files"]["seg"]).name == "W39_1998.09.19_Segm.nii"  # the phantom's quirk
        assert len(quirk) == 1 and last in quirk[0]
        assert records[last]["label_file"] == "W39_1998.09.19_Segm.nii"
    else:
        assert not quirk


def test_2023_follow_ups_share_a_patient_and_a_split(raws, tmp_path):
    raw, synth = raws["2023"]
    ids = [c["id"] for c in synth["cases"]]
    follow_ups = [i for i in ids if not i.endswith("-000")]
    assert follow_ups, "the phantom should hold follow-up scans"
    assert patient_of("BraTS-GLI-00012-001") == "BraTS-GLI-00012" and patient_of("BraTS2021_00012") == "BraTS2021_00012"
    for seed in range(6):  # scans only read headers: many seeds are cheap
        records = BratsSource(seed=seed, ratios="0.4,0.3,0.3").scan(raw).records
        split_of_group: dict[str, set[str]] = {}
        for record in records:
            assert record.group == record.id.rsplit("-", 1)[0]
            split_of_group.setdefault(record.group, set()).add(record.split)
        assert all(len(splits) == 1 for splits in split_of_group.values()), split_of_group
        assert {r.split for r in records} == {"train", "dev", "test"}
    run(raw, tmp_path / "out")
    _, manifest, _ = load(tmp_path / "out")
    per_group = manifest.group_by("group").agg(pl.col("split").n_unique().alias("splits"), pl.col("record").n_unique())
    assert per_group["splits"].max() == 1
    assert per_group["record"].max() >= 2  # some patient really has several scans


def test_z_score_crop_and_identity_resize(raws, tmp_path):
    """With size == the crop's square side, stored slices are exactly the z-scored, cropped, padded raw slices."""
    raw, synth = raws["2021"]
    case = synth["cases"][0]
    volumes = {n: nib.load(str(raw / case["files"][n])).get_fdata(dtype=np.float32)
               for n in ("t1", "t1ce", "t2", "flair")}
    brain = np.any([v != 0 for v in volumes.values()], axis=0)
    xs, ys = np.flatnonzero(brain.any(axis=(1, 2))), np.flatnonzero(brain.any(axis=(0, 2)))
    crop = [int(xs[0]), int(xs[-1]) + 1, int(ys[0]), int(ys[-1]) + 1]
    side = max(crop[1] - crop[0], crop[3] - crop[2])
    assert side != SIZE  # so the other tests really exercise resizing
    splits = tmp_path / "splits.csv"
    splits.write_text("case,split\n" + "".join(f"{c['id']},{'test' if c is case else 'train'}\n"
                                               for c in synth["cases"]))
    run(raw, tmp_path / "out", size=side, splits=str(splits))
    _, manifest, records = load(tmp_path / "out")
    info = records[case["id"]]
    assert info["crop"] == crop and info["side"] == side and info["size"] == side
    pad = [(side - (crop[1] - crop[0])) // 2, (side - (crop[3] - crop[2])) // 2]
    assert info["pad"] == pad
    arrays = stored(tmp_path / "out", case["id"], manifest)
    assert list(arrays["position"]) == list(np.flatnonzero(brain.any(axis=(0, 1))))  # test split: every brain slice
    stack_brain = np.any([arrays[n][..., 0] != 0 for n in volumes], axis=0)
    for name, volume in volumes.items():
        stack = arrays[name][..., 0].astype(np.float32)
        inside = stack[stack_brain]
        # Every brain slice is here, so the stack's brain is the whole brain: mean 0, std 1 (float16 rounding).
        assert abs(inside.mean()) < 0.01 and abs(inside.std() - 1) < 0.01, (name, inside.mean(), inside.std())
        assert np.all(stack[~stack_brain] == 0)
        expected = np.zeros_like(volume)
        expected[brain] = (volume[brain] - volume[brain].mean()) / volume[brain].std()
        window = expected[crop[0]:crop[1], crop[2]:crop[3]][:, :, arrays["position"]].transpose(2, 0, 1)
        got = stack[:, pad[0]:pad[0] + crop[1] - crop[0], pad[1]:pad[1] + crop[3] - crop[2]]
        np.testing.assert_allclose(got, window, atol=2e-2, rtol=2e-3)
        outside = stack.copy()
        outside[:, pad[0]:pad[0] + crop[1] - crop[0], pad[1]:pad[1] + crop[3] - crop[2]] = 0
        assert not outside.any()  # padding is zeros
    # label_volume undoes crop, padding and the index mapping exactly when no resize happened.
    slices = {int(z): seg for z, seg in zip(arrays["position"], arrays["seg"], strict=True)}
    rebuilt = label_volume(info, slices)
    original = nifti(raw / case["files"]["seg"])
    assert rebuilt.shape == original.shape and rebuilt.dtype == np.uint8
    assert np.array_equal(rebuilt, original)
    assert 4 in np.unique(rebuilt) and 3 not in np.unique(rebuilt)  # kdcli 3 back to the release's ET 4


def test_train_keeps_tumour_slices_and_a_share_of_empty_ones(raws, tmp_path):
    raw, synth = raws["2021"]
    by_id = {c["id"]: c for c in synth["cases"]}
    kept_per_fraction = {}
    for fraction in (0.0, 0.5):
        out = tmp_path / f"out{fraction}"
        run(raw, out, empty_slices=fraction, ratios="0.5,0.25,0.25")
        _, manifest, records = load(out)
        splits = dict(manifest.select("record", "split").unique().iter_rows())
        assert set(splits.values()) == {"train", "dev", "test"}
        for record, split in splits.items():
            brain, tumour = brain_and_tumour(raw, by_id[record])
            positions = sorted(manifest.filter(pl.col("record") == record)["position"].to_list())
            assert positions == records[record]["slices"]
            brain_slices = set(np.flatnonzero(brain))
            tumour_slices = set(np.flatnonzero(tumour))
            empty_slices = brain_slices - tumour_slices
            assert tumour_slices and empty_slices  # the phantom has both kinds
            if split == "train":
                assert tumour_slices <= set(positions)
                assert len(set(positions) & empty_slices) == round(fraction * len(empty_slices))
                assert set(positions) <= brain_slices
            else:
                assert set(positions) == brain_slices  # whole volumes for evaluation
            kept_per_fraction.setdefault(fraction, {})[record] = positions
    assert kept_per_fraction[0.0] != kept_per_fraction[0.5]
    # The share is seeded per case: a second run keeps the very same slices.
    run(raw, tmp_path / "again", empty_slices=0.5, ratios="0.5,0.25,0.25")
    _, manifest, _ = load(tmp_path / "again")
    again = {r: sorted(manifest.filter(pl.col("record") == r)["position"].to_list()) for r in kept_per_fraction[0.5]}
    assert again == kept_per_fraction[0.5]


@pytest.mark.parametrize("form", ["csv", "json"])
def test_splits_file_is_honoured(raws, tmp_path, form):
    raw, synth = raws["2021"]
    ids = [c["id"] for c in synth["cases"]]
    wanted = {ids[0]: "test", ids[1]: "dev", **{i: "train" for i in ids[2:]}}
    if form == "csv":
        path = tmp_path / "splits.csv"
        path.write_text("case,split\n" + "".join(f"{i},{'val' if s == 'dev' else s}\n" for i, s in wanted.items()))
    else:
        path = tmp_path / "splits.json"
        path.write_text(json.dumps({"train": ids[2:], "validation": [ids[1]], "test": [ids[0]]}))
    run(raw, tmp_path / "out", splits=str(path))
    _, manifest, _ = load(tmp_path / "out")
    assert dict(manifest.select("record", "split").unique().iter_rows()) == wanted


def test_splits_file_must_match_the_cases(raws, tmp_path):
    raw, synth = raws["2021"]
    ids = [c["id"] for c in synth["cases"]]
    missing = tmp_path / "missing.csv"
    missing.write_text("case,split\n" + "".join(f"{i},train\n" for i in ids[1:]))
    with pytest.raises(KdcliError, match=ids[0]):
        run(raw, tmp_path / "out", splits=str(missing))
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("case,split\n" + "".join(f"{i},train\n" for i in [*ids, "BraTS2021_99999"]))
    with pytest.raises(KdcliError, match="BraTS2021_99999"):
        run(raw, tmp_path / "out", splits=str(unknown))
    bad_split = tmp_path / "bad.csv"
    bad_split.write_text("case,split\n" + "".join(f"{i},holdout\n" for i in ids))
    with pytest.raises(KdcliError, match="holdout"):
        run(raw, tmp_path / "out", splits=str(bad_split))
    cut = tmp_path / "cut.json"  # two scans of one patient in two splits would leak that patient
    raw23, synth23 = raws["2023"]
    ids23 = [c["id"] for c in synth23["cases"]]
    follow_up = next(i for i in ids23 if i.endswith("-001"))
    first = follow_up[:-3] + "000"
    cut.write_text(json.dumps({"train": [i for i in ids23 if i != first], "test": [first]}))
    with pytest.raises(KdcliError, match=patient_of(first)):
        run(raw23, tmp_path / "out", splits=str(cut))
    assert not (tmp_path / "out").exists()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float(np.logical_and(a, b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def test_label_volume_round_trip_after_resizing_and_nifti_writer(raws, tmp_path):
    raw, synth = raws["2023"]
    case = next(c for c in synth["cases"] if 3 in c["labels"])  # every region present
    record = case["id"]
    tested = [c["id"] for c in synth["cases"] if patient_of(c["id"]) == patient_of(record)]
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"test": tested, "train": [c["id"] for c in synth["cases"] if c["id"] not in tested]}))
    run(raw, tmp_path / "out", splits=str(splits))
    _, manifest, records = load(tmp_path / "out")
    info = records[record]
    assert info["side"] != SIZE and info["et_value"] == 3
    arrays = stored(tmp_path / "out", record, manifest)
    rebuilt = label_volume(info, {int(z): s for z, s in zip(arrays["position"], arrays["seg"], strict=True)})
    original = nifti(raw / case["files"]["seg"])
    assert rebuilt.shape == original.shape and set(np.unique(rebuilt)) <= {0, 1, 2, 3}
    for region, values in {"wt": (1, 2, 3), "tc": (1, 3), "et": (3,)}.items():
        truth, got = np.isin(original, values), np.isin(rebuilt, values)
        assert truth.any(), region
        assert dice(truth, got) > 0.9, (region, dice(truth, got))
    # Slices not given stay background; a wrong map is refused rather than silently misplaced.
    assert not label_volume(info, {}).any()
    with pytest.raises(ValueError):
        label_volume(info, {0: np.full((SIZE, SIZE), 7, np.uint8)})

    target = tmp_path / "pred" / f"{record}.nii.gz"
    write_label_nifti(target, rebuilt, info)
    image = nib.load(str(target))
    assert image.shape == tuple(info["shape"]) and image.get_data_dtype() == np.uint8
    np.testing.assert_allclose(image.affine, nib.load(str(raw / case["files"]["t1"])).affine, atol=1e-5)
    assert np.array_equal(np.asarray(image.dataobj), rebuilt)
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temporary file left behind
    with pytest.raises(ValueError):
        write_label_nifti(target, rebuilt[:, :, :-1], info)


# ---------------------------------------------------------------- damaged input


def _files(case_dir: Path) -> dict[str, Path]:
    """kdcli name -> file of a 2021-style case folder."""
    return {name: case_dir / f"{case_dir.name}{suffix}.nii.gz"
            for name, suffix in SEQUENCE_FILES["2018-2021"].items()}


def _rewrite(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None) -> None:
    image = nib.load(str(path))
    data = np.asarray(image.dataobj) if data is None else data
    nib.save(nib.Nifti1Image(data, image.affine if affine is None else affine), str(path))


def _drop_t2(case_dir: Path) -> None:
    _files(case_dir)["t2"].unlink()


def _drop_seg(case_dir: Path) -> None:
    _files(case_dir)["seg"].unlink()


def _shape(case_dir: Path) -> None:
    path = _files(case_dir)["flair"]
    _rewrite(path, np.asarray(nib.load(str(path)).dataobj)[:, :, :-2])


def _affine(case_dir: Path) -> None:
    path = _files(case_dir)["flair"]
    moved = nib.load(str(path)).affine.copy()
    moved[0, 3] += 2.0
    _rewrite(path, affine=moved)


def _label_5(case_dir: Path) -> None:
    path = _files(case_dir)["seg"]
    labels = np.asarray(nib.load(str(path)).dataobj).copy()
    labels[labels == 2] = 5
    _rewrite(path, labels)


def _not_nifti(case_dir: Path) -> None:
    _files(case_dir)["t1"].write_text("<html>403 Forbidden</html>\n")


def _truncated(case_dir: Path) -> None:
    path = _files(case_dir)["t1ce"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with gzip.open(path) as handle:  # precondition: the header still reads, only the voxel data is cut
        assert len(handle.read(352)) == 352


def _duplicate(case_dir: Path) -> None:
    path = _files(case_dir)["t1"]
    nib.save(nib.load(str(path)), str(path.with_name(path.name.removesuffix(".gz"))))  # .nii beside its .nii.gz


DAMAGE = {
    "missing sequence": (_drop_t2, "missing sequence t2"),
    "missing label": (_drop_seg, "missing label (expected"),
    "shape mismatch": (_shape, "shape"),
    "affine mismatch": (_affine, "affine"),
    "label value 5": (_label_5, "5"),
    "not nifti": (_not_nifti, "_t1.nii.gz"),
    "truncated gz": (_truncated, "_t1ce.nii.gz"),
    "two files for one sequence": (_duplicate, "two files for t1"),
}


@pytest.fixture(scope="module")
def small_2021(tmp_path_factory) -> tuple[Path, list[str]]:
    raw = tmp_path_factory.mktemp("small") / "raw"
    summary = synth_brats(raw, cases=4, size=SIZE, naming="2021", seed=3)
    return raw, [c["id"] for c in summary["cases"]]


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_case_fails_in_one_line_naming_the_case_or_is_skipped(small_2021, tmp_path, damage):
    clean, ids = small_2021
    raw = tmp_path / "raw"
    shutil.copytree(clean, raw)
    bad = ids[1]
    damage_fn, needle = DAMAGE[damage]
    damage_fn(raw / bad)
    out = tmp_path / "out"
    with pytest.raises(KdcliError) as caught:
        run(raw, out)
    message = str(caught.value)
    assert f"case {bad}" in message and needle in message, message
    assert "\n" not in message and "Traceback" not in message
    assert not out.exists()  # a failed prepare never leaves something that looks finished

    result = run(raw, out, skip_bad=True)
    notes = [note for note in result.notes if bad in note]
    assert len(notes) == 1 and notes[0].startswith("skipped"), result.notes
    _, manifest, records = load(out)
    assert sorted(manifest["record"].unique()) == sorted(set(ids) - {bad})
    assert bad not in records or records[bad] == {"skipped": records[bad]["skipped"]}


def test_empty_or_foreign_folder_is_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "empty" / "notes").mkdir()
    (tmp_path / "empty" / "notes" / "readme.txt").write_text("nothing here")
    for skip_bad in (False, True):
        with pytest.raises(KdcliError) as caught:
            run(empty, tmp_path / "out", skip_bad=skip_bad)
        message = str(caught.value)
        assert str(empty) in message and "no BraTS cases" in message and "_t1ce" in message and "-t1c" in message
        assert "\n" not in message
    with pytest.raises(KdcliError, match="not found"):
        run(tmp_path / "absent", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_every_case_bad_with_skip_bad_is_still_an_error(small_2021, tmp_path):
    clean, ids = small_2021
    raw = tmp_path / "raw"
    shutil.copytree(clean, raw)
    for case in ids:
        _drop_seg(raw / case)
    with pytest.raises(KdcliError, match="skipped"):
        run(raw, tmp_path / "out", skip_bad=True)


def test_truncated_uncompressed_file_is_caught_by_the_scan(raws, tmp_path):
    """A cut .nii (the 2020 release is uncompressed) is found from its size, before any shard is written."""
    clean, synth = raws["2020"]
    raw = tmp_path / "raw"
    shutil.copytree(clean, raw)
    case = synth["cases"][2]
    path = raw / case["files"]["t2"]
    assert path.name.endswith("_t2.nii")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(KdcliError) as caught:
        BratsSource().scan(raw)
    assert f"case {case['id']}" in str(caught.value) and "truncated" in str(caught.value) and path.name in str(
        caught.value)
    scan = BratsSource(skip_bad=True).scan(raw)
    assert case["id"] not in {r.id for r in scan.records} and len(scan.records) == len(synth["cases"]) - 1
    assert any(note.startswith(f"skipped case {case['id']}") for note in scan.notes)


def test_worker_processes_write_the_same_dataset(raws, tmp_path):
    """read() depends only on the record and the options (slice shares are seeded by a stable hash, not hash())."""
    raw, _ = raws["2021"]
    metas = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        prepare(PrepareOptions(source="brats", raw=raw, out=out, size=SIZE, workers=workers,
                               source_options={"empty_slices": 0.5}))
        metas.append(load(out))
    assert metas[0][0]["content_hash"] == metas[1][0]["content_hash"]
    assert metas[0][2] == metas[1][2]


def test_slice_share_does_not_depend_on_the_interpreter_hash_seed(raws):
    """Spawned workers (and reruns) get another str hash salt; the kept slices must not change with it."""
    import os
    import subprocess
    import sys

    raw, _ = raws["2021"]
    code = ("import json, sys; from kdcli.sources.brats import BratsSource; src = BratsSource(empty_slices=0.5, "
            "ratios='1,0,0'); print(json.dumps({r.id: src.read(r, 16)[0]['slices'] for r in src.scan(sys.argv[1])"
            ".records}))")
    runs = []
    for salt in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": salt, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-c", code, str(raw)], env=env, capture_output=True, text=True,
                              check=True)
        runs.append(json.loads(done.stdout))
    assert runs[0] == runs[1] and len(runs[0]) == 6
