"""torchrun with 2 CPU processes (gloo) through the CLI gives the single-process result."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdcli.engine.checkpoint import load_checkpoint
from kdcli.engine.distributed import Ranks, RankShard

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_rank_shards_are_disjoint_and_cover_the_single_process_stream():
    base = list(range(11))
    shards = [list(RankShard(base, Ranks(rank, 2))) for rank in range(2)]
    assert shards == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]] and len(RankShard(base, Ranks(0, 2))) == 5


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(multieye_shards, tmp_path):
    # test_vit has no BatchNorm, so 2 ranks x 8 images average to exactly the gradient of 1 x 16 images.
    common = ["teach", "--data", str(multieye_shards), "--modality", "fundus", "--model", "test_vit",
              "--head", "linear", "--epochs", "2", "--workers", "0", "--lr", "1e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    single = subprocess.run([sys.executable, "-m", "kdcli", *common, "--batch-size", "16",
                             "--out", str(tmp_path / "one.pt")], capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())]
    ddp = subprocess.run([*launcher, "-m", "kdcli", *common, "--batch-size", "8", "--out", str(tmp_path / "two.pt")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = load_checkpoint(tmp_path / "one.pt"), load_checkpoint(tmp_path / "two.pt")
    assert two.meta["best"]["epoch"] == one.meta["best"]["epoch"]
    a = torch.cat([v.flatten().float() for v in one.model.values()])
    b = torch.cat([two.model[k].flatten().float() for k in one.model])
    # Gradients agree to float rounding; AdamW turns a rounding-level gradient into a +-lr step, so a handful of
    # near-zero-gradient weights may differ by one step, everything else must agree closely.
    close = torch.isclose(a, b, atol=1e-5, rtol=1e-4)
    assert close.float().mean() > 0.99 and (a - b).abs().max() < 3e-3
    loss = lambda path: [json.loads(r)["train_loss"] for r in path.read_text().splitlines()]  # noqa: E731
    assert loss(tmp_path / "two.metrics.jsonl") == pytest.approx(loss(tmp_path / "one.metrics.jsonl"), rel=1e-3)
    assert load_checkpoint(tmp_path / "two.last.pt").meta["world_size"] == 2
    rows = (tmp_path / "two.metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2  # rank 0 alone wrote the log
    assert ddp.stderr.count("epoch   1/2") == 1  # and alone printed progress
    assert ddp.stderr.count("teach fundus -> ") == 1  # one start-up line per run, not per rank
    assert ddp.stderr.count("best dev score") == 1
    assert "threads 1 (OMP_NUM_THREADS)" in ddp.stderr
