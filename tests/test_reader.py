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
