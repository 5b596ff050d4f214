"""The `prepare <source>` and `synth <generator>` commands are generated from each registry entry's options
dataclass: every registered source and generator is checked here, so a new registry line is tested without a new
test."""

from __future__ import annotations

import dataclasses
import inspect
import json
from enum import Enum
from pathlib import Path

import pytest
import typer.main
from conftest import kdcli_run

from kdcli.cli import app
from kdcli.cli_from_options import COMMON_PREPARE
from kdcli.sources import SOURCES
from kdcli.synth import SYNTHS


def resolved(group: str, name: str):
    """The real (built) command, as running or `--help` gets it."""
    root = typer.main.get_command(app)
    commands = root.commands[group]
    ctx = commands.make_context(group, [], parent=root.make_context("kdcli", [group], resilient_parsing=True),
                                resilient_parsing=True)
    return commands.resolve_command(ctx, [name])[1]


def flag_of(field: dataclasses.Field) -> str:
    return field.metadata.get("flag", "--" + field.name.replace("_", "-"))


def comparable(value):
    return value.value if isinstance(value, Enum) else value


def check_fields(command, options_cls: type) -> None:
    params = {p.name: p for p in command.params}
    assert options_cls.__doc__ and not options_cls.__doc__.startswith(options_cls.__name__ + "("), \
        f"{options_cls.__name__} needs a docstring: it is the command's help"
    assert command.help == inspect.cleandoc(options_cls.__doc__)
    for field in dataclasses.fields(options_cls):
        param = params[field.name]
        assert flag_of(field) in param.opts, (field.name, param.opts)
        assert param.help == field.metadata["help"], field.name
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        assert param.required == required, field.name
        if not required:
            assert comparable(param.default) == comparable(field.default), field.name


@pytest.mark.parametrize("name", SOURCES.names())
def test_prepare_command_offers_the_source_options_and_the_common_ones(name: str) -> None:
    source_cls = SOURCES.get(name)
    command = resolved("prepare", name)
    check_fields(command, source_cls.Options)
    common = set(COMMON_PREPARE) - ({"part"} if source_cls.appends else set())
    own = {f.name for f in dataclasses.fields(source_cls.Options)}
    assert {p.name for p in command.params} == {"raw"} | own | common, "an option neither common nor the source's"
    assert not own & common, f"{name} redeclares a common prepare option"
    params = {p.name: p for p in command.params}
    assert params["size"].default == source_cls.default_size
    assert params["raw"].help == source_cls.raw_help


@pytest.mark.parametrize("name", SYNTHS.names())
def test_synth_command_offers_the_generator_options_with_its_defaults(name: str) -> None:
    generator = SYNTHS.get(name)
    command = resolved("synth", name)
    check_fields(command, generator.Options)
    assert {p.name for p in command.params} == {"out"} | {f.name for f in dataclasses.fields(generator.Options)}
    # the generator keeps keyword defaults for library callers (bench, demo): they must agree with the command's
    signature = inspect.signature(generator).parameters
    for field in dataclasses.fields(generator.Options):
        assert field.name in signature, f"synth {name}: --{field.name} is no argument of the generator"
        assert signature[field.name].default == field.default, f"synth {name}: {field.name}'s defaults differ"
    assert generator.Options.out_help
    assert callable(generator.Options.report)


@pytest.mark.parametrize("group", ["prepare", "synth"])
def test_group_lists_every_registry_entry(group: str) -> None:
    registry = SOURCES if group == "prepare" else SYNTHS
    result = kdcli_run(group, "--help", terminal_width=200)
    for name in registry.names():
        assert name in result.output and registry.help(name)[:40] in result.output


def test_mistyped_source_is_refused_with_a_suggestion() -> None:
    result = kdcli_run("prepare", "brat", "raw", ok=False)
    assert result.exit_code == 2
    assert "brats" in result.output


def test_prepare_records_the_source_options_under_their_field_names(tmp_path: Path) -> None:
    """--split-seed reaches the source as `seed`, choices and paths as strings, unset options not at all."""
    raw, out = tmp_path / "raw", tmp_path / "shards"
    made = kdcli_run("synth", "multieye", raw, "--per-class", "3", "--size", "16")
    assert made.output.startswith(f"wrote 54 images to {raw}")  # 3 x 9 classes x 2 modalities: the report line
    kdcli_run("prepare", "multieye", raw, "--out", out, "--size", "16", "--median", "3")
    recorded = json.loads((out / "dataset.json").read_text())["prepare"]
    assert recorded["source_options"] == {"clahe": False, "median": 3}  # list_name not given: left out
    assert recorded["compression"] is None and recorded["size"] == 16


class Captured(Exception):
    pass


def captured_prepare(monkeypatch, *args: str):
    """The PrepareOptions a `prepare` command line hands to the library (which is stopped right there)."""
    seen = []

    def capture(options, progress_factory=None):
        seen.append(options)
        raise Captured

    monkeypatch.setattr("kdcli.prepare.prepare", capture)
    result = kdcli_run("prepare", *args, ok=False)
    assert isinstance(result.exception, Captured), result.output
    return seen[0]


def test_source_options_reach_the_source_by_field_name(monkeypatch, tmp_path: Path) -> None:
    options = captured_prepare(monkeypatch, "brats", str(tmp_path), "--out", str(tmp_path / "o"), "--split-seed",
                               "3", "--splits", str(tmp_path / "s.csv"), "--compression", "lzf")
    assert options.source_options == {"empty_slices": 0.2, "ratios": "0.7,0.1,0.2", "seed": 3, "skip_bad": False,
                                      "splits": str(tmp_path / "s.csv")}
    assert (options.size, options.compression, options.append, options.part) == (128, "lzf", False, None)
    options = captured_prepare(monkeypatch, "cxr", str(tmp_path), "--uncertain", "ignore", "--part", "2/3")
    assert options.source_options["uncertain"] == "ignore" and options.part == (2, 3)


def test_fundus_grading_appends_and_requires_labels_and_task(monkeypatch, tmp_path: Path) -> None:
    options = captured_prepare(monkeypatch, "fundus-grading", str(tmp_path), "--labels", "l.csv", "--task", "dr")
    assert options.append and options.source_options == {"labels": "l.csv", "task": "dr", "split_seed": 0}
    result = kdcli_run("prepare", "fundus-grading", tmp_path, "--task", "dr", ok=False)
    assert result.exit_code == 2 and "--labels" in result.output


def test_camelyon_thumbnails_go_under_the_default_out(monkeypatch, tmp_path: Path) -> None:
    """Without --out the thumbnails follow the default shard directory (the hand-written command put them in
    'None.partial/thumbnails')."""
    monkeypatch.setenv("KDCLI_SHARDS", str(tmp_path / "home"))
    options = captured_prepare(monkeypatch, "camelyon", str(tmp_path))
    assert options.out == tmp_path / "home" / "camelyon"
    assert options.source_options["thumbnails"] == str(tmp_path / "home" / "camelyon.partial" / "thumbnails")
    options = captured_prepare(monkeypatch, "camelyon", str(tmp_path), "--no-thumbnails")
    assert "thumbnails" not in options.source_options
