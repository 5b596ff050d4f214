"""`kdcli synth ...`: phantom datasets in each dataset's real layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from kdcli.cli.common import err, friendly_errors
from kdcli.cli_from_options import add_synth_commands

synth_app = typer.Typer(no_args_is_help=True, help="Write phantom datasets in each dataset's real layout.")

def run_synth(name: str, out: Path, **options: Any) -> dict:
    """The generators reject impossible sizes and counts with ValueError: show it as a usage error."""
    from kdcli.synth import SYNTHS

    try:
        return SYNTHS.get(name)(out, **options)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


# `synth <generator>`: generated from each generator's options dataclass (kdcli/synth/<name>.py)
add_synth_commands(synth_app, run_synth, friendly_errors, err)
