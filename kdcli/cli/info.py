"""`kdcli inspect`, `methods` and `completions`: what a dataset, the method registry and the shell scripts hold."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from kdcli.cli.common import console, friendly_errors


@friendly_errors
def inspect(
    data: Annotated[Path, typer.Argument(help="Shard directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    verify: Annotated[bool, typer.Option(help="Re-hash every shard and compare with dataset.json.")] = False,
) -> None:
    """Counts per split, modality and class; shapes; content hash."""
    from kdcli.inspect import inspect_dataset

    report = inspect_dataset(data, verify=verify)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{data} — {report['source']}, {report['pairing']}, {report['samples']} samples")
    table.add_column("modality")
    table.add_column("shape")
    for split in ("train", "dev", "test"):
        table.add_column(split, justify="right")
    for modality, info in report["modalities"].items():
        per_split = report["per_class"].get(modality, {})
        table.add_row(modality, "x".join(map(str, info["shape"])),
                      *[str(report["counts"][modality].get(s, 0)) for s in ("train", "dev", "test")])
        names = report["label_names"] or [f"{t}:{c}" for t, info in report["tasks"].items()
                                          for c in info["classes"]]
        if modality in report["unlabeled"]:
            names = [*names, "unlabeled"]
        for name in names:
            table.add_row("", f"  {name}", *[str(per_split.get(s, {}).get(name, 0)) for s in ("train", "dev", "test")])
    out = console(stderr=False)
    out.print(table)
    out.print(f"hash {report['content_hash']}" + ("  (verified)" if verify else ""))
    from kdcli.shards.quality import lines as quality_lines

    for line in quality_lines(report["data_warnings"]):
        typer.echo(f"data warning: {line}")  # unwrapped: one line per kind, as prepare printed it



@friendly_errors
def methods(as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False) -> None:
    """List distillation methods and their parameters (the papers' defaults)."""
    from kdcli.methods import METHODS
    from kdcli.methods.base import params_table

    listing = {}
    for name in METHODS.names():
        cls = METHODS.get(name)
        listing[name] = {"help": METHODS.help(name), "tasks": list(cls.tasks), "terms": list(cls.terms),
                         "needs_teacher": cls.needs_teacher, "pairing": cls.pairing, "unlabeled": cls.unlabeled,
                         "params": {p: d for p, d, _ in params_table(cls.Params)}}
    if as_json:
        typer.echo(json.dumps(listing, indent=2))
        return
    for name, info in listing.items():
        typer.echo(f"{name:<12} {info['help']}")
        typer.echo(f"{'':<14}tasks: {', '.join(info['tasks'])}; terms: {', '.join(info['terms'])}; unlabeled "
                   f"samples: {'distillation terms' if info['unlabeled'] else 'not used'}")
        for key, default in info["params"].items():
            typer.echo(f"{'':<14}-p {key}={default}")



class Shell(StrEnum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"


@friendly_errors
def completions(shell: Annotated[Shell, typer.Argument(help="bash, zsh or fish.")]) -> None:
    """Print the shell completion script (the files in completions/ are this output)."""
    from kdcli.completion import completion_script

    typer.echo(completion_script(shell.value), nl=False)
