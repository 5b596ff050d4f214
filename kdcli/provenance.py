"""Where a checkpoint came from, recorded in its meta and its config.json: the command line, the versions of
kdcli, Python, torch, timm and CUDA, the machine, and the git commit when kdcli runs from a checkout.

Versions are read from package metadata (no import), so `kdcli --version` stays fast; a checkout's commit
comes from `git` run in kdcli's own source folder, and is marked dirty when its tracked files have changes."""

from __future__ import annotations

import functools
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from kdcli import __version__

SOURCE = Path(__file__).resolve().parent.parent  # the folder holding the kdcli package


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def version_line() -> str:
    """`kdcli --version`: kdcli's version and the versions it runs with."""
    parts = [f"{name} {package_version(name) or 'not installed'}" for name in ("torch", "timm")]
    return f"kdcli {__version__} ({', '.join(parts)}, python {platform.python_version()})"


@functools.cache
def git_commit(folder: Path = SOURCE) -> dict[str, Any] | None:
    """{'commit': sha, 'dirty': bool} when `folder` is inside a git work tree; None otherwise or without git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        top = Path(git("rev-parse", "--show-toplevel")).resolve()
        if top != folder.resolve():  # kdcli installed somewhere inside another project's repository
            return None
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed, `kdcli ...` whichever way it was started (console script, python -m kdcli)."""
    argv = list(sys.argv if argv is None else argv)
    if argv and (Path(argv[0]).name in ("kdcli", "__main__.py") or argv[0].endswith("kdcli/__main__.py")):
        argv[0] = "kdcli"
    return shlex.join(argv)


def cuda_info() -> dict[str, Any]:
    """CUDA as torch was built with and as this machine has it (torch is loaded by then: training runs)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return {"cuda": None}
    info: dict[str, Any] = {"cuda": torch.version.cuda, "cudnn": None, "gpu": None}
    if torch.cuda.is_available():
        info["cudnn"] = torch.backends.cudnn.version()
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    return {
        "command": command_line(argv),
        "kdcli": __version__, "python": platform.python_version(),
        "torch": package_version("torch"), "timm": package_version("timm"), **cuda_info(),
        "platform": platform.platform(), "host": platform.node(),
        "git": git_commit(),
    }
