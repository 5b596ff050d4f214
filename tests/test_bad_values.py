"""Bad option values are refused before any work starts: one `error:` line naming the option (and the config
file it came from), a non-zero exit, nothing written — never a traceback or an untrained checkpoint."""

from __future__ import annotations

import pytest
from conftest import TINY_MODEL, kdcli_run
from test_prepare_multieye import assert_one_line_error

TEACH = ["--modality", "oct", "--model", TINY_MODEL, "--workers", "0", "--epochs", "1"]


@pytest.mark.parametrize(("flags", "needles"), [
    (["--epochs", "0"], ("epochs=0", "at least 1")),
    (["--epochs", "-3"], ("epochs=-3",)),
    (["--batch-size", "0"], ("batch_size=0",)),
    (["--lr", "-1"], ("lr=-1.0", "above 0")),
    (["--lr", "0"], ("lr=0.0",)),
    (["--workers", "-2"], ("workers=-2",)),
    (["--patience", "-1"], ("patience=-1",)),
    (["--set", "ema=1.0"], ("ema=1.0", "[0, 1)")),
    (["--set", "accumulate=0"], ("accumulate=0",)),
    (["--set", "grad_clip=-1"], ("grad_clip=-1.0",)),
    (["--set", "patience=2.5"], ("patience: expected int, got '2.5'",)),
    (["--set", "patience=three"], ("patience: expected int, got 'three'",)),
    (["--set", "balanced=maybe"], ("balanced: expected bool, got 'maybe'",)),
    (["--set", "lr=inf"], ("lr=inf",)),
    (["--set", "lr=nan"], ("lr=nan",)),
])
def test_bad_engine_values_are_one_line_and_write_nothing(multieye_shards, tmp_path, flags, needles):
    out = tmp_path / "oct.pt"
    result = kdcli_run("teach", "--data", multieye_shards, *TEACH, "--out", out, *flags, ok=False)
    assert_one_line_error(result, *needles)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("text", "needles"), [
    ("epochs: three\n", ("epochs: expected int, got 'three' in ",)),
    ("lr: -0.5\n", ("lr=-0.5", " in ")),
    ("engine:\n  batch_size: 0\n", ("batch_size=0", " in ")),
])
def test_a_bad_config_value_names_the_key_and_the_file(multieye_shards, tmp_path, text, needles):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    result = kdcli_run("teach", "--data", multieye_shards, "--modality", "oct", "--model", TINY_MODEL, "--workers", "0",
                       "--out", tmp_path / "oct.pt", "--config", config, ok=False)
    assert_one_line_error(result, *needles, str(config))
    assert not (tmp_path / "oct.pt").exists() and not (tmp_path / "oct.config.json").exists()


def test_a_flag_overrides_a_bad_config_value(multieye_shards, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("epochs: 0\n")
    kdcli_run("teach", "--data", multieye_shards, *TEACH, "--batch-size", "16", "--out", tmp_path / "oct.pt",
              "--config", config)


@pytest.mark.parametrize(("flags", "needles"), [
    (["--size", "0"], ("--size 0", "8 to 8192")),
    (["--size", "-4"], ("--size -4",)),
    (["--workers", "0"], ("--workers 0", "at least 1")),
    (["--shard-size", "-1"], ("--shard-size -1",)),
])
def test_bad_prepare_values_are_one_line_and_write_nothing(multieye_raw, tmp_path, flags, needles):
    out = tmp_path / "shards"
    assert_one_line_error(kdcli_run("prepare", "multieye", multieye_raw, "--out", out, *flags, ok=False), *needles)
    assert not list(tmp_path.iterdir())
