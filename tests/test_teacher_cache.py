"""distill --cache-teacher: the teacher runs once, later runs read its outputs, stale caches are refused."""

from __future__ import annotations

import h5py
import numpy as np
import torch
from conftest import FAST, kdcli_run
from test_prepare_multieye import assert_one_line_error

from kdcli.engine.checkpoint import load_checkpoint
from kdcli.train import load_model


def test_cache_is_built_once_then_read_and_holds_the_teachers_outputs(multieye_shards, oct_teacher, tmp_path,
                                                                    monkeypatch):
    import shutil

    data = tmp_path / "shards"
    shutil.copytree(multieye_shards, data)
    args = ["distill", "--data", data, "--teacher", oct_teacher, "--student", "fundus", "--method", "coda",
            *FAST, "--cache-teacher"]
    kdcli_run(*args, "--out", tmp_path / "a.pt")
    (cache,) = (data / "cache").glob("teacher-*.h5")
    teacher = load_model(load_checkpoint(oct_teacher))
    from kdcli.data.views import ModalityView
    from kdcli.shards.reader import ShardStore

    inputs = ModalityView(ShardStore(data), "train", "oct")
    with torch.no_grad():
        expected = teacher(torch.stack([inputs[i]["image"] for i in range(3)]))
    with h5py.File(cache, "r") as handle:
        assert handle["teacher/logits"].shape == (len(inputs), 9) and handle["teacher/sims"].shape[1:] == (2, 22)
        assert np.allclose(handle["teacher/logits"][:3], expected["logits"].numpy(), atol=1e-4)

    from kdcli.models.classifier import Classifier

    def no_teacher_calls(self, images):
        if self.spec["in_chans"] == 1:  # the OCT teacher: must come from the cache now
            raise AssertionError("teacher ran although its outputs are cached")
        return original(self, images)

    original = Classifier.forward
    monkeypatch.setattr(Classifier, "forward", no_teacher_calls)
    kdcli_run(*args, "--out", tmp_path / "b.pt")

    monkeypatch.setattr(Classifier, "forward", original)
    with h5py.File(cache, "r+") as handle:
        handle.attrs["data_hash"] = "sha256:other"
    assert_one_line_error(kdcli_run(*args, "--out", tmp_path / "c.pt", ok=False), str(cache), "other shard contents",
                          "delete it")
