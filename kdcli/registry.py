"""Name -> implementation registries that can be listed without importing the implementations.

Entries are "module:attribute" strings resolved on first use, so `kdcli --help` and shell completion
never pay for torch, timm or h5py (the habit timm uses for optional optimizers).
"""

from __future__ import annotations

import fnmatch
import importlib
from typing import Any

from kdcli.errors import UsageError


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, str] = {}
        self._help: dict[str, str] = {}

    def add(self, name: str, target: str, help: str = "") -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        if ":" not in target:
            raise ValueError(f"{self.kind} {name!r}: target must look like 'package.module:attribute'")
        self._entries[name] = target
        self._help[name] = help

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def help(self, name: str) -> str:
        return self._help[name]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> Any:
        if name not in self._entries:
            raise UsageError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        module_name, attribute = self._entries[name].split(":")
        return getattr(importlib.import_module(module_name), attribute)
