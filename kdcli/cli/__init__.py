"""kdcli's command line. Thin on purpose: each command parses options, calls one library function and
prints. Heavy libraries (torch, timm, h5py) are imported inside the commands, so `--help` and shell
completion stay fast.

One module per command group; this one builds the app and registers them, in the order `--help` lists."""

from __future__ import annotations

from typing import Annotated

import typer

from kdcli.cli import bench, demo, deploy, evaluate, explain, info, prepare, synth, train

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Distil a multi-modal teacher into a single-modality student, from raw data to "
                       "evaluated, explained models.")
app.add_typer(synth.synth_app, name="synth")
app.add_typer(prepare.prepare_app, name="prepare")
app.add_typer(bench.bench_app, name="bench")
TOP_LEVEL = (info.inspect, train.teach, train.distill, train.embed, evaluate.evaluate, explain.explain,
             evaluate.compare, deploy.predict, deploy.export, info.methods, info.completions, demo.demo)
for _command in TOP_LEVEL:
    app.command()(_command)


def show_version(value: bool) -> None:
    if value:
        from kdcli.provenance import version_line

        typer.echo(version_line())
        raise typer.Exit()


@app.callback()
def root(version: Annotated[bool, typer.Option("--version", is_eager=True, callback=show_version,
                                               help="Print kdcli's version (and torch's, timm's) and exit.")]
         = False) -> None:
    """Distil a multi-modal teacher into a single-modality student, from raw data to evaluated, explained
    models."""


def main() -> None:
    from kdcli.completion import enable_shell_completion

    enable_shell_completion()  # add_completion=False leaves Typer's shells unregistered; TAB needs them
    app(prog_name="kdcli")
