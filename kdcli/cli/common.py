"""Plumbing every command shares: one-line errors instead of tracebacks, stderr logging, thread choice and the
small parsers of repeatable KEY=VALUE and comma-list options. Light imports only (see kdcli/cli/__init__.py)."""

from __future__ import annotations

import functools
from typing import Any

import typer

from kdcli.errors import KdcliError, is_disk_full


def err(message: str) -> None:
    typer.echo(message, err=True)


def system_error_line(exc: BaseException) -> str:
    """One line for an OS-level failure the library layers did not name already: the file when known, a full
    disk said as such, never a multi-line library message."""
    where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
    if is_disk_full(exc):
        return f"{where}no space left on device — free some space, then rerun"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return where + text.splitlines()[0]


def chosen_threads(threads: int | None, workers: int = 0) -> Any:
    """A block run with --threads (or OMP_NUM_THREADS, or the free CPUs) torch threads."""
    from kdcli.engine.threads import choose_threads, torch_threads

    return torch_threads(choose_threads(threads or 0, workers))


def rank_zero_log() -> Any:
    """`err` on rank 0, silence on the others: under torchrun one line per run, not one per process."""
    import os

    return err if int(os.environ.get("RANK", "0")) == 0 else (lambda message: None)


def friendly_errors(function):
    """KdcliError and OS errors become one `error:` line and a non-zero exit, never a traceback."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except KdcliError as exc:
            err(f"error: {exc}")
            raise typer.Exit(exc.exit_code) from None
        except (OSError, MemoryError) as exc:
            err(f"error: {system_error_line(exc)}")
            raise typer.Exit(1) from None
        except Exception as exc:  # a library's own error type around a full disk (polars, torch, h5py)
            if not is_disk_full(exc):
                raise
            err(f"error: {system_error_line(exc)}")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err("interrupted; finished outputs are intact (rerun with --resume where offered)")
            raise typer.Exit(130) from None

    return wrapper


def command(typer_app: typer.Typer, name: str | None = None):
    """Register a command of a group (synth, prepare, bench) with friendly errors; kdcli/cli/__init__.py
    registers the top-level ones."""
    return lambda function: typer_app.command(name)(friendly_errors(function))


def parse_params(values: list[str] | None) -> dict[str, str] | None:
    if not values:
        return None
    params = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--param")
        params[key.strip()] = value.strip()
    return params


def parse_list(text: str | None, name: str, kind: type = str) -> tuple:
    if not text:
        return ()
    try:
        return tuple(kind(item.strip()) for item in text.split(",") if item.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r}: expected a comma-separated list", param_hint=name) from None


def console(stderr: bool = True):
    from rich.console import Console

    return Console(stderr=stderr)
