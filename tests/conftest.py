"""Shared fixtures: one tiny MultiEYE phantom, its shards and two quick checkpoints per test session; and
kdcli_run, the one way tests call the CLI."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from click.testing import Result

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a stray hub download must fail fast, not hang
os.environ.setdefault("OMP_NUM_THREADS", "2")

TINY_MODEL = "test_resnet"
FAST = ["--epochs", "2", "--batch-size", "16", "--workers", "0", "--model", TINY_MODEL, "--lr", "3e-3"]


@pytest.fixture(scope="session")
def multieye_raw(tmp_path_factory) -> Path:
    from kdcli.synth.multieye import synth_multieye

    root = tmp_path_factory.mktemp("raw") / "multieye"
    synth_multieye(root, per_class=5, size=32, seed=0)
    return root


@pytest.fixture(scope="session")
def multieye_shards(multieye_raw, tmp_path_factory) -> Path:
    from kdcli.prepare import PrepareOptions, prepare

    out = tmp_path_factory.mktemp("shards") / "multieye"
    prepare(PrepareOptions(source="multieye", raw=multieye_raw, out=out, size=32, shard_size=16))
    return out


@pytest.fixture(scope="session")
def cxr_phantom(tmp_path_factory) -> dict[str, Path]:
    """One NIH-layout CXR phantom (half the images with gaze and boxes) prepared at 48 px with its gaze and boxes,
    for every module that only reads it (the pipeline and explain tests); made once per session."""
    root = tmp_path_factory.mktemp("cxr-phantom")
    raw, shards = root / "raw", root / "shards"
    kdcli_run("synth", "cxr", raw, "--per-class", "3", "--size", "96", "--annotated-fraction", "0.5")
    kdcli_run("prepare", "cxr", raw, "--out", shards, "--size", "48", "--gaze", raw / "egd-cxr", "--boxes",
              raw / "BBox_List_2017.csv", "--egd-sigma", "10")
    return {"raw": raw, "shards": shards}


@pytest.fixture(scope="session")
def brats_phantom(tmp_path_factory) -> dict[str, Path]:
    """One 8-case BraTS phantom prepared at 32 px, shared by the modules that only read it; made once per session."""
    root = tmp_path_factory.mktemp("brats-phantom")
    raw, shards = root / "raw", root / "shards"
    kdcli_run("synth", "brats", raw, "--cases", "8", "--size", "32")
    kdcli_run("prepare", "brats", raw, "--out", shards, "--size", "32")
    return {"raw": raw, "shards": shards}


def kdcli_run(*args: object, ok: bool = True, env: dict[str, str] | None = None, **invoke: Any) -> Result:
    """Run `kdcli ARGS...` in-process (each argument str()-ed) and return its result. With ok (the default) the
    test fails unless it exited 0, showing the command's output; ok=False leaves the exit code to the caller.
    `invoke`: CliRunner.invoke's other keywords (terminal_width, ...)."""
    from typer.testing import CliRunner

    from kdcli.cli import app

    result = CliRunner().invoke(app, [str(arg) for arg in args], env=env, **invoke)
    if ok:
        assert result.exit_code == 0, f"kdcli {' '.join(map(str, args))} exited {result.exit_code}:\n{result.output}"
    return result


@pytest.fixture(scope="session")
def oct_teacher(multieye_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "oct.pt"
    kdcli_run("teach", "--data", multieye_shards, "--modality", "oct", "--out", out, *FAST)
    return out


@pytest.fixture(scope="session")
def fundus_student(multieye_shards, oct_teacher, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "fundus.pt"
    kdcli_run("distill", "--data", multieye_shards, "--teacher", oct_teacher, "--student", "fundus", "--method",
              "coda", "--out", out, *FAST)
    return out


def reseal_dataset(root: Path) -> None:
    """After a test edits a dataset's manifest on purpose (to build an odd but consistent dataset): make
    dataset.json's content hash and fingerprints.json describe the edited dataset, as prepare would have, so the
    integrity check on open (kdcli/shards/integrity.py) accepts it."""
    import json

    import h5py
    import polars as pl

    from kdcli.shards.format import content_hash
    from kdcli.shards.integrity import hashed_rows, write_fingerprints

    manifest = pl.read_parquet(root / "manifest.parquet")
    digests = {}
    for name in sorted(set(manifest["shard"].to_list())):
        with h5py.File(root / "shards" / name, "r") as handle:
            digests[name] = str(handle.attrs["digest"])
    meta = json.loads((root / "dataset.json").read_text())
    meta["content_hash"] = content_hash(digests, hashed_rows(manifest))
    (root / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    write_fingerprints(root, digests, meta["content_hash"])
