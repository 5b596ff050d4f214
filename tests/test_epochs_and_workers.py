"""The epoch reaches DataLoader workers: augmentation and partners change between epochs, any number of workers
gives the same run bit for bit, and a run interrupted with Ctrl-C then resumed equals an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TINY_MODEL, kdcli_run
from torch.utils.data import DataLoader

from kdcli.data.transforms import train_augmentation
from kdcli.data.views import ModalityView, UnpairedPartnerView, collate
from kdcli.engine.checkpoint import load_checkpoint
from kdcli.shards.reader import ShardStore


def epochs_of(view, workers: int, epochs: int = 2) -> list[dict]:
    """Each epoch's single batch (the whole view, in order) through a persistent-worker loader, as the engine
    builds it; `set_epoch` is called in the parent only."""
    loader = DataLoader(view, batch_size=len(view), num_workers=workers, collate_fn=collate,
                        persistent_workers=workers > 0)
    batches = []
    for epoch in range(epochs):
        view.set_epoch(epoch)
        batches.extend(loader)
    return batches


@pytest.mark.parametrize("workers", [0, 2])
def test_augmentation_changes_between_epochs_in_workers_too(multieye_shards, workers):
    store = ShardStore(multieye_shards)
    view = ModalityView(store, "train", "fundus", train_augmentation(32, "light"), seed=0)
    first, second = epochs_of(view, workers)
    changed = [not torch.equal(a, b) for a, b in zip(first["image"], second["image"], strict=True)]
    assert sum(changed) >= 0.9 * len(changed)  # a few items may draw no crop, flip or rotation in both epochs
    reference = epochs_of(view, 0)  # the draws are the parent's, whatever process makes them
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(reference, [first, second], strict=True))


@pytest.mark.parametrize("workers", [0, 2])
def test_unpaired_partner_changes_between_epochs(multieye_shards, workers):
    store = ShardStore(multieye_shards)
    student = ModalityView(store, "train", "fundus", train_augmentation(32, "light"), seed=0)
    partner = ModalityView(store, "train", "oct", train_augmentation(32, "light"), seed=1)
    view = UnpairedPartnerView(student, partner, seed=0)
    first, second = epochs_of(view, workers)
    assert not torch.equal(first["teacher_index"], second["teacher_index"])
    assert torch.equal(first["teacher_label"], first["label"])  # still class-matched
    reference = epochs_of(view, 0)
    assert torch.equal(reference[1]["teacher_index"], second["teacher_index"])


def _teach_args(shards, out, workers: int, epochs: int = 3) -> list[str]:
    return ["teach", "--data", str(shards), "--modality", "fundus", "--out", str(out), "--epochs", str(epochs),
            "--batch-size", "8", "--workers", str(workers), "--model", TINY_MODEL, "--lr", "3e-3",
            "--head", "linear"]


def _weights(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).model


@pytest.mark.slow
def test_zero_one_and_two_workers_give_identical_weights(multieye_shards, tmp_path):
    runs = {}
    for workers in (0, 1, 2):
        out = tmp_path / f"w{workers}.pt"
        kdcli_run(*_teach_args(multieye_shards, out, workers))
        runs[workers] = _weights(tmp_path / f"w{workers}.last.pt")
    for workers in (1, 2):
        assert all(torch.equal(runs[0][k], runs[workers][k]) for k in runs[0]), f"{workers} workers differ"


@pytest.mark.slow
def test_sigint_during_teach_with_workers_then_resume_equals_uninterrupted(multieye_shards, tmp_path):
    epochs = 4
    whole = tmp_path / "whole.pt"
    kdcli_run(*_teach_args(multieye_shards, whole, 2, epochs))

    cut = tmp_path / "cut.pt"
    # the same intra-op thread count as this process, which trains the other runs: CPU reductions split over
    # another number of threads round differently
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    process = subprocess.Popen([sys.executable, "-m", "kdcli", *_teach_args(multieye_shards, cut, 2, epochs)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    metrics = tmp_path / "cut.metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if (tmp_path / "cut.last.pt").is_file():  # epoch 1 is saved (published atomically): interrupt epoch 2
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGINT)  # the parent only, as Ctrl-C's handler sees it; workers go with it
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130, output
    done = len(metrics.read_text().splitlines())
    assert 1 <= done < epochs, output

    kdcli_run(*_teach_args(multieye_shards, cut, 2, epochs), "--resume")
    a, b = _weights(tmp_path / "whole.last.pt"), _weights(tmp_path / "cut.last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows_whole = [json.loads(r) for r in (tmp_path / "whole.metrics.jsonl").read_text().splitlines()]
    rows_cut = [json.loads(r) for r in metrics.read_text().splitlines()]
    assert [r["train_loss"] for r in rows_whole] == [r["train_loss"] for r in rows_cut]
