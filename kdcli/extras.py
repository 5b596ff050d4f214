"""Optional dependencies, grouped as pyproject's extras ([wsi], [cxr], [mri]): a lab installs only the stack its
modality needs, and a step that needs a missing one stops in one line naming the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from kdcli.errors import KdcliError


class MissingExtra(KdcliError):
    """An optional package a step needs is not installed (or will not import)."""


def require(module: str, extra: str, needed_for: str) -> ModuleType:
    """`module`, imported; else MissingExtra: "<needed_for> needs <package>: pip install 'kdcli[<extra>]'"."""
    try:
        return importlib.import_module(module)
    except (ImportError, OSError) as exc:  # OSError: a wheel whose shared library will not load
        package = module.split(".")[0]
        missing = getattr(exc, "name", None) in (module, package)
        reason = "" if missing else f" ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        message = f"{needed_for} needs the {package} package{reason}: pip install 'kdcli[{extra}]'"
        raise MissingExtra(message) from None
