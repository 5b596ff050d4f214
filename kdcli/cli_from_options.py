"""The `kdcli prepare <source>` and `kdcli synth <generator>` commands, generated from the options each source and
generator declares once (a dataclass whose docstring is the command's help and whose fields carry `help`
metadata), so adding a source is its file plus one registry line, with no hand-written command.

Light on purpose, like the registries: a group lists its commands from the registry's names and help lines, and
imports a source's module (numpy, cv2, nibabel...) only to build the one command being run, shown or completed.

Field metadata: "help" (the option's help), optionally "flag" (the flag, when it is not --field-name),
"metavar" and "hidden". A field without a default is a required option.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from enum import Enum, StrEnum
from pathlib import Path
from typing import Annotated, Any, ClassVar

import typer
import typer.main
from typer.core import TyperCommand, TyperGroup

from kdcli.registry import Registry

RAW = "raw"
OUT = "out"


class Compression(StrEnum):
    none = "none"
    lzf = "lzf"
    gzip = "gzip"


# ------------------------------------------------------------------------------------------- fields -> options
def option_parameter(name: str, annotation: Any, default: Any, info: Any) -> inspect.Parameter:
    default = inspect.Parameter.empty if default is dataclasses.MISSING else default
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[annotation, info])


def field_default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def options_parameters(options_cls: type) -> list[inspect.Parameter]:
    """One Typer option per dataclass field, in field order."""
    hints = typing.get_type_hints(options_cls)
    parameters = []
    for field in dataclasses.fields(options_cls):
        meta = field.metadata
        flags = (meta["flag"],) if "flag" in meta else ()
        info = typer.Option(*flags, help=meta.get("help"), metavar=meta.get("metavar"),
                            hidden=meta.get("hidden", False))
        parameters.append(option_parameter(field.name, hints[field.name], field_default(field), info))
    return parameters


def is_required(parameter: inspect.Parameter) -> bool:
    return parameter.default is inspect.Parameter.empty


def argument_parameter(name: str, help: str) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                             annotation=Annotated[Path, typer.Argument(help=help)])


def plain(value: Any) -> Any:
    """What a source receives (and dataset.json records): strings for paths and choices."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    return value


def option_values(options: Any) -> dict[str, Any]:
    """The options given, by field name; None (not given) is left out so the source's own default applies."""
    values = {field.name: plain(getattr(options, field.name)) for field in dataclasses.fields(options)}
    return {name: value for name, value in values.items() if value is not None}


def build_command(name: str, callback: Callable[..., Any], parameters: list[inspect.Parameter], help: str,
                  wrap: Callable) -> TyperCommand:
    """A Typer command whose signature is `parameters` (Typer reads it through inspect.signature)."""
    callback.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    single = typer.Typer(add_completion=False)
    single.command(name, help=inspect.cleandoc(help))(wrap(callback))
    return typer.main.get_command(single)  # a Typer with one command is that command


# ------------------------------------------------------------------------------------------------- the groups
class LazyGroup(TyperGroup):
    """A command group listing `builders`' commands by name and help line; each is built when resolved (run,
    --help, completing its options). Listings (group --help, TAB on the group) see light stand-ins."""

    builders: ClassVar[dict[str, Callable[[], TyperCommand]]] = {}
    listed: ClassVar[dict[str, str]] = {}  # name -> help line, from the registry

    def __init__(self, *, commands: dict | None = None, **attrs: Any) -> None:
        stand_ins = {name: TyperCommand(name=name, help=help) for name, help in self.listed.items()}
        super().__init__(commands={**stand_ins, **(commands or {})}, **attrs)
        self.built: set[str] = set()

    def resolve_command(self, ctx: Any, args: list[str]) -> tuple[str | None, Any, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        if name in self.builders and name not in self.built:
            self.commands[name] = command = self.builders[name]()
            self.built.add(name)
        return name, command, rest


def lazy_group(registry: Registry, builder: Callable[[str], TyperCommand]) -> type[LazyGroup]:
    names = registry.names()
    return type("GeneratedGroup", (LazyGroup,), {
        "builders": {name: (lambda name=name: builder(name)) for name in names},
        "listed": {name: registry.help(name) for name in names},
    })


# ------------------------------------------------------------------------------------------------------ prepare
COMMON_PREPARE = ("out", "size", "workers", "resume", "overwrite", "shard_size", "compression", "allow_leakage",
                  "part")


def prepare_common(source_cls: type) -> tuple[list[inspect.Parameter], list[inspect.Parameter]]:
    """The options every `prepare <source>` has: those before the source's own, and those after."""
    overwrite_help = ("Replace this task's samples if --out already has them." if source_cls.appends
                      else "Replace an existing --out (only once the new one is done).")
    before = [
        option_parameter("out", Path | None, None, typer.Option(
            "--out", "-o", help="Shard directory to create (default: shards/SOURCE, or $KDCLI_SHARDS/SOURCE).")),
        option_parameter("size", int, source_cls.default_size, typer.Option(
            help="Stored image side in pixels (pad to square, then resize; smaller images are upsampled: `kdcli "
                 "synth` draws 128 px phantoms, so give them --size 128, or 64 for a quick CPU run).")),
        option_parameter("workers", int, 1, typer.Option(help="Parallel processes.")),
        option_parameter("resume", bool, False, typer.Option(
            help="Finish an interrupted prepare; finished shards are kept.")),
        option_parameter("overwrite", bool, False, typer.Option(help=overwrite_help)),
        option_parameter("shard_size", int, 0, typer.Option(
            help="Records per HDF5 shard (0: the source's default; a volume or slide is many samples).")),
        option_parameter("compression", Compression, Compression.none, typer.Option(
            help="HDF5 compression of the pixel arrays.")),
    ]
    after = [option_parameter("allow_leakage", bool, False, typer.Option(
        help="Keep patients whose records sit in several splits (refused otherwise); counted in dataset.json."))]
    if not source_cls.appends:  # parts write disjoint shares of one new dataset; an appended set is one run
        after.append(option_parameter("part", str | None, None, typer.Option(
            help="I/N: write only the I-th of N disjoint shares (cluster array jobs); then `kdcli prepare merge "
                 "OUT`.")))
    return before, after


def prepare_parameters(source_cls: type) -> list[inspect.Parameter]:
    """RAW, the source's required options, the common ones, the source's others, then leakage and parts."""
    own = options_parameters(source_cls.Options)
    before, after = prepare_common(source_cls)
    return [argument_parameter(RAW, source_cls.raw_help), *[p for p in own if is_required(p)], *before,
            *[p for p in own if not is_required(p)], *after]


def prepare_command(name: str, run_prepare: Callable, wrap: Callable) -> TyperCommand:
    from kdcli.defaults import default_prepare_out
    from kdcli.sources import SOURCES

    source_cls = SOURCES.get(name)

    def prepare_source(**values: Any) -> None:
        common = {key: values.pop(key) for key in COMMON_PREPARE if key in values}
        raw = values.pop(RAW)
        out = common.pop("out") or default_prepare_out(name)
        source_options = source_cls.command_options(option_values(source_cls.Options(**values)), out)
        run_prepare(name, raw, out, common.pop("size"), common.pop("workers"), common.pop("resume"),
                    common.pop("overwrite"), common.pop("shard_size"), common.pop("compression"), source_options,
                    append=source_cls.appends, **common)

    return build_command(name, prepare_source, prepare_parameters(source_cls), source_cls.Options.__doc__, wrap)


def add_prepare_commands(prepare_app: typer.Typer, run_prepare: Callable, wrap: Callable) -> None:
    """`prepare <source>` for every registered source; `run_prepare(source, raw, out, size, workers, resume,
    overwrite, shard_size, compression, source_options, append=, allow_leakage=, part=)` does the work."""
    from kdcli.sources import SOURCES

    prepare_app.info.cls = lazy_group(SOURCES, lambda name: prepare_command(name, run_prepare, wrap))


# -------------------------------------------------------------------------------------------------------- synth
def synth_command(name: str, run_synth: Callable, wrap: Callable, log: Callable[[str], None]) -> TyperCommand:
    from kdcli.synth import SYNTHS

    options_cls = SYNTHS.get(name).Options

    def synth_generator(**values: Any) -> None:
        out = values.pop(OUT)
        options = options_cls(**values)
        summary = run_synth(name, out, **{f.name: getattr(options, f.name) for f in dataclasses.fields(options)})
        for line in options.report(summary, out):
            log(line)

    parameters = [argument_parameter(OUT, options_cls.out_help), *options_parameters(options_cls)]
    return build_command(name, synth_generator, parameters, options_cls.__doc__, wrap)


def add_synth_commands(synth_app: typer.Typer, run_synth: Callable, wrap: Callable,
                       log: Callable[[str], None]) -> None:
    """`synth <generator>` for every registered generator; `run_synth(name, out, **options)` returns its
    summary, which the options' `report` turns into the lines `log` prints."""
    from kdcli.synth import SYNTHS

    synth_app.info.cls = lazy_group(SYNTHS, lambda name: synth_command(name, run_synth, wrap, log))
