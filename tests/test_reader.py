"""The shard reader's fast paths (raw chunk reads for uncompressed shards, batched reads) return exactly what
h5py's own indexing returns, writable, for compressed and uncompressed shards alike."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

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
