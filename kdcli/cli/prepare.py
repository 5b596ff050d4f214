"""`kdcli prepare ...`: a raw download -> a shard directory, one command per source, and `merge`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from kdcli.cli.common import command, err, friendly_errors
from kdcli.cli_from_options import Compression, add_prepare_commands

prepare_app = typer.Typer(no_args_is_help=True, help="Turn a raw download into a shard directory.")


def parse_part(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    index, sep, count = value.partition("/")
    if not (sep and index.isdigit() and count.isdigit()) or not 1 <= int(index) <= int(count):
        raise typer.BadParameter(f"{value!r} is not I/N with 1 <= I <= N", param_hint="--part")
    return int(index), int(count)


def run_prepare(source: str, raw: Path, out: Path | None, size: int, workers: int, resume: bool, overwrite: bool,
                shard_size: int, compression: Compression, source_options: dict[str, Any],
                append: bool = False, part: str | None = None, allow_leakage: bool = False) -> None:
    from tqdm import tqdm

    from kdcli.defaults import default_prepare_out
    from kdcli.prepare import PrepareOptions, prepare
    from kdcli.shards.quality import lines as quality_lines

    out = out or default_prepare_out(source)
    options = PrepareOptions(source=source, raw=raw, out=out, size=size, workers=workers, resume=resume,
                             overwrite=overwrite, shard_size=shard_size,
                             compression=None if compression is Compression.none else compression.value,
                             source_options=source_options, append=append, part=parse_part(part),
                             allow_leakage=allow_leakage)
    bars: list = []

    def progress_factory(total: int):
        bar = tqdm(total=total, unit="img", desc=f"prepare {source}", file=sys.stderr, leave=False,
                   disable=None)  # None: silent when stderr is not a terminal (CI logs)
        bars.append(bar)
        return bar.update

    try:
        result = prepare(options, progress_factory)
    finally:
        for bar in bars:
            bar.close()
    for note in result.notes:
        err(f"note: {note}")
    for line in quality_lines(result.warnings):
        err(f"warning: {line}")
    if options.part:
        err(f"part {options.part[0]}/{options.part[1]} done ({result.written} shards written, {result.reused} "
            f"reused); when every part is done: kdcli prepare merge {out}")
        return
    counts = ", ".join(f"{m}: " + "/".join(str(c[s]) for s in ("train", "dev", "test"))
                       for m, c in result.meta.counts.items())
    err(f"prepared {out} ({counts} train/dev/test; {result.written} shards written, {result.reused} reused, "
        f"{result.seconds:.1f}s) {result.meta.content_hash[:19]}")


# `prepare <source>`: generated from each source's Options dataclass (kdcli/sources/<name>.py)
add_prepare_commands(prepare_app, run_prepare, friendly_errors)


@command(prepare_app, "merge")
def prepare_merge(
    out: Annotated[Path, typer.Argument(help="The --out every part was written for.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUT.")] = False,
) -> None:
    """Join the parts of `prepare ... --part I/N` into one dataset (one manifest, one hash)."""
    from kdcli.prepare import merge_parts

    meta = merge_parts(out, overwrite)
    err(f"merged into {out} ({sum(sum(c.values()) for c in meta.counts.values())} samples) {meta.content_hash[:19]}")
