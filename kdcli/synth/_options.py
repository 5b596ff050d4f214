"""What the generators' options share: fields several `kdcli synth` commands offer with one help text, and the
link from a generator function to its options dataclass (from which kdcli/cli_from_options.py builds the command).

An options dataclass: its docstring is the command's help, its fields carry metadata={"help": ...} (optional
"flag", "metavar", "hidden"), `out_help` is the OUT argument's help, and `report(summary, out)` gives the lines
printed after the generator ran."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import field
from typing import Any

SIZE_HELP = ("Image side in pixels (`prepare` stores 224 px unless given --size: pass it this size, or "
             "smaller).")


def size_field(default: int) -> Any:
    return field(default=default, metadata={"help": SIZE_HELP})


def seed_field() -> Any:
    return field(default=0, metadata={"help": "Random seed; same seed, same bytes."})


def workers_field() -> Any:
    return field(default=1, metadata={"help": "Processes."})


def label_noise_field(help: str) -> Any:
    return field(default=0.0, metadata={"flag": "--label-noise", "metavar": "RHO", "help": help})


def takes(options_cls: type) -> Callable:
    """Mark a generator with the options `kdcli synth` offers for it (a subset of its keyword arguments)."""

    def mark(generator: Callable) -> Callable:
        generator.Options = options_cls  # type: ignore[attr-defined]
        return generator

    return mark
