"""The shard reader's fast paths (raw chunk reads for uncompressed shards, batched reads) return exactly what
h5py's own indexing returns, writable, for compressed and uncompressed shards alike."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from conftest import reseal_dataset

from kdcli.data.views import ModalityView
from kdcli.prepare import PrepareOptions, prepare
from kdcli.shards.reader import ShardStore


@pytest.fixture(scope="module", params=[None, "lzf"])
def shards(request, multieye_raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("reader") / f"shards-{request.param}"
    prepare(PrepareOptions(source="multieye", raw=multieye_raw, out=out, size=32, shard_size=16,
                           compression=request.param))
    return out


def test_read_and_read_many_match_h5py(shards):
    store = ShardStore(shards)
    rows = store.rows("train", "oct")
    shard = rows["shard"][0]
    with h5py.File(shards / "shards" / shard, "r") as handle:
        truth = handle["oct"][:]
    for index in range(len(truth)):
        sample = store.read(shard, index, "oct")
        assert np.array_equal(sample, truth[index]) and sample.flags.writeable
    order = np.array([3, 0, 3, 7, 1])
    assert np.array_equal(store.read_many(shard, order, "oct"), truth[order])
    assert np.array_equal(store.read_many(shard, np.arange(2, 6), "oct"), truth[2:6])


def test_batched_view_gives_the_per_item_images(shards):
    view = ModalityView(ShardStore(shards), "train", "oct")
    indices = [5, 0, len(view) - 1, 2]
    batch = view.__getitems__(indices)
    for position, i in enumerate(indices):
        assert torch.equal(batch["image"][position], view[i]["image"])
    assert batch["image"].is_contiguous(memory_format=torch.channels_last)  # NHWC memory, no transposing copy


def test_read_many_fills_a_callers_buffer(shards):
    store = ShardStore(shards)
    shard = store.rows("train", "oct")["shard"][0]
    with h5py.File(shards / "shards" / shard, "r") as handle:
        truth = handle["oct"][:]
    for order in (np.array([3, 0, 3, 7, 1]), np.arange(2, 6)):  # scattered reads, and one slice
        buffer = np.zeros((len(order), *truth.shape[1:]), truth.dtype)
        assert store.read_many(shard, order, "oct", out=buffer) is buffer
        assert np.array_equal(buffer, truth[order])


def test_batch_buffers_are_reused_only_once_released(shards):
    view = ModalityView(ShardStore(shards), "train", "oct")
    first = view.__getitems__([0, 1, 2, 3])
    kept = first["image"].clone()
    second = view.__getitems__([4, 5, 6, 7])  # `first` is still held: a different buffer
    assert first["image"].data_ptr() != second["image"].data_ptr() and torch.equal(first["image"], kept)
    pointer = first["image"].data_ptr()
    del first
    third = view.__getitems__([8, 9, 10, 11])  # released: its buffer comes back
    assert third["image"].data_ptr() == pointer
    assert torch.equal(third["image"], torch.stack([view[i]["image"] for i in (8, 9, 10, 11)]))
    assert torch.equal(second["image"], torch.stack([view[i]["image"] for i in (4, 5, 6, 7)]))


def test_augmented_batches_match_the_items_and_repeat_per_epoch(shards):
    from kdcli.data.transforms import train_augmentation

    view = ModalityView(ShardStore(shards), "train", "oct", train_augmentation(24), seed=3)
    indices = [6, 1, len(view) - 1, 2]
    batch = view.__getitems__(indices)
    assert batch["image"].shape == (4, 1, 24, 24)
    for position, i in enumerate(indices):  # the per-item path (used with target arrays) draws the same
        difference = (batch["image"][position].int() - view[i]["image"].int()).abs().max()
        assert difference <= 1
    again = view.__getitems__(indices)["image"].clone()
    view.set_epoch(1)
    assert torch.equal(batch["image"], again) and not torch.equal(view.__getitems__(indices)["image"], again)


def test_paired_unpaired_and_cached_batches_match_their_items(multieye_shards):
    """Distillation's views assemble whole batches too; every field matches the per-item path."""
    from kdcli.data.transforms import train_augmentation
    from kdcli.data.views import PairedView, UnpairedPartnerView
    from kdcli.engine.teacher_cache import CachedTeacherView

    store = ShardStore(multieye_shards)
    size = store.meta.modalities["fundus"]["shape"][0]
    student = ModalityView(store, "train", "fundus", train_augmentation(size), seed=1)
    partner = ModalityView(store, "train", "oct", train_augmentation(size), seed=2)
    unpaired = UnpairedPartnerView(student, partner, seed=4)
    paired = PairedView(store, "train", "fundus", "fundus", train_augmentation(size), train_augmentation(size), 5)
    logits = np.arange(len(partner) * 3, dtype=np.float32).reshape(-1, 3)
    cached = CachedTeacherView(unpaired, {"teacher": {"logits": logits}})
    indices = [3, 0, len(student) - 1, 5]
    for view in (unpaired, paired, cached):
        view.set_epoch(2)
        batch = view.__getitems__(indices)
        assert isinstance(batch, dict)
        for position, i in enumerate(indices):
            item = view[i]
            for key in ("label", "teacher_label", "teacher_index", "index"):
                assert int(batch[key][position]) == int(item[key]), key
            for key in ("image", "teacher_image"):
                assert (batch[key][position].int() - item[key].int()).abs().max() <= 1, key
        if view is cached:
            chosen = logits[batch["teacher_index"].numpy()]
            assert np.array_equal(batch["cached"]["teacher"]["logits"].numpy(), chosen)
    # both images of a pair take the same draws: the same modality twice gives the same pixels, every epoch
    for epoch in (0, 3):
        paired.set_epoch(epoch)
        batch = paired.__getitems__(indices)
        assert torch.equal(batch["image"], batch["teacher_image"])
        assert torch.equal(paired[indices[0]]["image"], paired[indices[0]]["teacher_image"])


def test_paired_view_matches_records_by_id_not_row(multieye_shards, tmp_path):
    """A teacher modality with an extra record (listed first) must not shift the pairs; unpairable data is
    refused in one line."""
    import shutil

    import polars as pl

    from kdcli.data.views import PairedView
    from kdcli.errors import KdcliError

    root = tmp_path / "shards"
    shutil.copytree(multieye_shards, root)
    manifest = pl.read_parquet(root / "manifest.parquet").filter(pl.col("split") == "train")
    fundus_rows, oct_rows = (manifest.filter(pl.col("modality") == m) for m in ("fundus", "oct"))
    count = min(fundus_rows.height, oct_rows.height) - 1
    fundus_rows = fundus_rows.head(count)
    # the OCT rows become the same records as the fundus ones (in reverse order), plus one OCT-only record first
    oct_rows = oct_rows.head(count + 1).with_columns(
        pl.Series("id", ["extra-oct-only", *reversed(fundus_rows["id"].to_list())]))
    oct_rows = oct_rows.with_columns(pl.col("id").alias("record"))
    pl.concat([oct_rows, fundus_rows]).write_parquet(root / "manifest.parquet")
    reseal_dataset(root)
    store = ShardStore(root)
    view = PairedView(store, "train", "fundus", "oct")
    for i in range(len(view)):
        j = int(view[i]["teacher_index"])
        assert view.teacher.ids[j] == view.student.ids[i]
        assert torch.equal(view.teacher[j]["image"], view[i]["teacher_image"])
    batch = view.__getitems__(list(range(len(view))))
    assert [view.teacher.ids[j] for j in batch["teacher_index"].tolist()] == view.student.ids

    pl.concat([fundus_rows, oct_rows.head(count)]).write_parquet(root / "manifest.parquet")  # one OCT image lost
    reseal_dataset(root)
    with pytest.raises(KdcliError, match="have no oct image"):
        PairedView(ShardStore(root), "train", "fundus", "oct")


@pytest.mark.parametrize("workers", [0, 1])
def test_batches_kept_by_the_consumer_are_never_overwritten(shards, workers):
    """Holding every batch of an epoch (as `list(loader)` does) must not let the pool reuse their buffers."""
    from torch.utils.data import DataLoader

    from kdcli.data.transforms import train_augmentation
    from kdcli.data.views import collate

    view = ModalityView(ShardStore(shards), "train", "oct", train_augmentation(24), seed=7)
    batches = list(DataLoader(view, batch_size=4, num_workers=workers, collate_fn=collate))
    assert len(batches) > view.buffers.keep  # more batches held than the pool keeps
    for batch in batches:
        for position, i in enumerate(batch["index"].tolist()):
            assert (batch["image"][position].int() - view[i]["image"].int()).abs().max() <= 1
