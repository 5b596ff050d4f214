"""Shell completion scripts for kdcli, generated without shell detection.

Typer's `--show-completion`/`--install-completion` ask shellingham which shell is running, which fails in
CI and Docker, and kdcli hides them anyway (`add_completion=False`). Here the shell is always named by the
caller. The scripts are thin shims: at each TAB they re-run `kdcli` with `_KDCLI_COMPLETE=complete_<shell>`
(Typer keeps Click 7's `<instruction>_<shell>` order), so they never go stale when commands change; only
the shim itself is generated here.

Both helpers below touch Typer internals, re-exported by the non-underscore module `typer.completion`,
which has offered them since well before typer 0.12 (checked against typer 0.29.2). Everything else in
kdcli uses public Typer API only.
"""

from __future__ import annotations

import re

import typer.completion

PROG_NAME = "kdcli"
COMPLETE_VAR = "_KDCLI_COMPLETE"
SHELLS = ("bash", "zsh", "fish")
FILES = {"bash": "kdcli.bash", "zsh": "_kdcli", "fish": "kdcli.fish"}


def enable_shell_completion() -> None:
    """Register Typer's bash/zsh/fish/powershell completers with its vendored Click.

    Typer only does this while building the hidden `--install-completion` option, so with
    `add_completion=False` every `_KDCLI_COMPLETE=...` request fails with "Shell bash not supported." and
    TAB silently does nothing. Call this before running the app. Cheap: a few dict inserts, no imports
    beyond what `import typer` already loaded."""
    typer.completion.completion_init()


def completion_script(shell: str) -> str:
    """The completion script for `shell` (bash, zsh or fish), ending in a newline."""
    if shell not in SHELLS:
        raise ValueError(f"unsupported shell {shell!r}; choose one of {', '.join(SHELLS)}")
    # Pure string formatting, unlike the completer classes' source(), which also spawns bash to check
    # its version.
    script = typer.completion.get_completion_script(prog_name=PROG_NAME, complete_var=COMPLETE_VAR,
                                                     shell=shell)
    if shell == "zsh":
        script = _zsh_autoload_friendly(script)
    header = f"# kdcli {shell} completion; regenerate: kdcli completions {shell} > completions/{FILES[shell]}"
    if script.startswith("#compdef"):
        # `#compdef` must stay the first line: compinit reads only that one.
        first, _, rest = script.partition("\n")
        return f"{first}\n{header}\n{rest.lstrip()}\n"
    return f"{header}\n{script}\n"


_ZSH_COMPDEF = re.compile(rf"^compdef (?P<function>\w+) {PROG_NAME}$", re.MULTILINE)


def _zsh_autoload_friendly(script: str) -> str:
    """Make Typer's zsh script work both sourced and autoloaded from `$fpath/_kdcli` (fastapi/typer#1864).

    Typer's script defines `_kdcli_completion` and ends with `compdef _kdcli_completion kdcli`. Installed as
    `$fpath/_kdcli`, compinit turns the file into the body of an autoloaded `_kdcli`, so the first TAB only
    defines a function and re-registers it, and completion silently shows nothing (files at best). Name
    the function after the file and, when autoloaded, call it right away; when sourced, register it.
    The `loadautofunc` test is the one Click 8 and yargs use."""
    match = _ZSH_COMPDEF.search(script)
    if match is None or f"{match['function']}()" not in script:
        # Typer changed its template: fail loudly (tests/test_cli_basics.py) rather than ship a dud.
        raise RuntimeError("unexpected zsh completion template from typer; update kdcli/completion.py")
    function = f"_{PROG_NAME}"
    body = script[:match.start()].replace(f"{match['function']}()", f"{function}()").rstrip()
    if not body.startswith("#compdef"):
        body = f"#compdef {PROG_NAME}\n\n{body}"
    return (f"{body}\n\n"
            f'if [[ "${{zsh_eval_context[-1]}}" == loadautofunc ]]; then\n'
            f"  # autoloaded from $fpath: this is the first TAB, answer it now\n"
            f'  {function} "$@"\n'
            f"else\n"
            f"  # sourced: let compinit call it on later TABs\n"
            f"  compdef {function} {PROG_NAME}\n"
            f"fi")
