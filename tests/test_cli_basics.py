"""The CLI's cheap promises: shipped completion scripts are current and answer real shells, `--help` and
completion stay free of heavy libraries, `methods` lists the papers' defaults, and the method registry
fails with a one-line usage error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import kdcli_run

from kdcli.completion import FILES, SHELLS, completion_script
from kdcli.errors import UsageError
from kdcli.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
COMPLETIONS = ROOT / "completions"
HEAVY = {"torch", "timm", "h5py", "polars", "cv2", "numpy", "sklearn", "albumentations", "matplotlib",
         "pytorch_grad_cam", "pandas", "pyarrow", "torchvision"}
SUBCOMMANDS = {"synth", "prepare", "inspect", "teach", "distill", "evaluate", "explain", "predict", "export", "methods",
               "completions", "demo"}
NO_PROTOCOL = ("kdcli answered no completion request: with add_completion=False Typer never registers its "
               "shells, so kdcli.cli.main() must call kdcli.completion.enable_shell_completion() first")

# Runs kdcli exactly as `python -m kdcli ARGS` does, then reports which heavy packages got imported.
PROBE = f"""
import json, runpy, sys
try:
    runpy.run_module("kdcli", run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as exc:
    code = exc.code or 0
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({sorted(HEAVY)!r}))
sys.stderr.write("\\nPROBE " + json.dumps({{"heavy": heavy, "exit": code}}) + "\\n")
"""


def _env(**extra: str) -> dict[str, str]:
    # This checkout first, whatever is installed; and no completion variables leaking in from the caller.
    env = {k: v for k, v in os.environ.items() if not k.endswith("_COMPLETE") and "COMP_" not in k}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return {**env, **extra}


@pytest.fixture(scope="module")
def kdcli_on_path(tmp_path_factory) -> dict[str, str]:
    """Environment whose PATH starts with a `kdcli` that is `python -m kdcli` from this checkout.

    Sturdier than the installed console script (pyenv shims, stale installs, other checkouts) and the
    same code path: both run kdcli.cli.main()."""
    bin_dir = tmp_path_factory.mktemp("bin")
    wrapper = bin_dir / "kdcli"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m kdcli "$@"\n')
    wrapper.chmod(0o755)
    env = _env()
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


def _probe(args: list[str], **env: str) -> tuple[subprocess.CompletedProcess, list[str], int]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True,
                          env=_env(**env), cwd=ROOT, timeout=60)
    line = next((x for x in reversed(proc.stderr.splitlines()) if x.startswith("PROBE ")), None)
    assert line, f"probe did not finish:\n{proc.stderr}"
    report = json.loads(line.removeprefix("PROBE "))
    return proc, report["heavy"], report["exit"]


# ------------------------------------------------------------------------------------- shipped scripts
@pytest.mark.parametrize("shell", SHELLS)
def test_shipped_completion_scripts_are_current(shell: str) -> None:
    path = COMPLETIONS / FILES[shell]
    regenerate = f"regenerate with: kdcli completions {shell} > completions/{FILES[shell]}"
    assert path.is_file(), f"{path} is missing; {regenerate}"
    assert path.read_text() == completion_script(shell), f"{path} is stale; {regenerate}"


def test_completions_command_prints_the_script() -> None:
    result = kdcli_run("completions", "zsh")
    assert result.output == completion_script("zsh")


def test_unknown_shell_is_refused() -> None:
    with pytest.raises(ValueError, match="bash, zsh, fish"):
        completion_script("tcsh")


def test_zsh_script_starts_with_compdef_and_defines_the_autoload_name() -> None:
    script = completion_script("zsh")
    assert script.splitlines()[0] == "#compdef kdcli"  # compinit reads only the first line
    assert "\n_kdcli() {" in script and "loadautofunc" in script


# --------------------------------------------------------------------------------- real shells, real TAB
def test_env_var_protocol_answers(kdcli_on_path: dict[str, str]) -> None:
    proc = subprocess.run(["kdcli"], capture_output=True, text=True, timeout=60,
                          env={**kdcli_on_path, "_KDCLI_COMPLETE": "complete_bash", "COMP_WORDS": "kdcli prep",
                               "COMP_CWORD": "1"})
    assert proc.returncode == 0 and proc.stdout.split() == ["prepare"], f"{NO_PROTOCOL}\n{proc.stderr}"


def test_installed_console_script_answers() -> None:
    # The shell runs whatever `kdcli` is on PATH; an entry point that bypasses main() (e.g.
    # "kdcli.cli:app") would never register the completers.
    with open(ROOT / "pyproject.toml", "rb") as f:
        assert tomllib.load(f)["project"]["scripts"]["kdcli"] == "kdcli.cli:main"
    installed = shutil.which("kdcli")
    if installed is None:
        pytest.skip("no kdcli console script on PATH (run `pip install -e .`)")
    proc = subprocess.run([installed], capture_output=True, text=True, timeout=60,
                          env=_env(_KDCLI_COMPLETE="complete_bash", COMP_WORDS="kdcli prep", COMP_CWORD="1"))
    assert proc.returncode == 0 and proc.stdout.split() == ["prepare"], f"{NO_PROTOCOL}\n{proc.stderr}"


BASH_DRIVER = r"""
source completions/kdcli.bash
spec=$(complete -p kdcli) || exit 3
func=${spec##*-F }; func=${func%% *}
for line in "$@"; do
  read -ra COMP_WORDS <<< "$line"
  [[ $line == *" " ]] && COMP_WORDS+=("")
  COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
  COMPREPLY=()
  "$func" kdcli "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
  echo "== $line"
  printf '%s\n' "${COMPREPLY[@]}"
done
"""


def _sections(text: str) -> dict[str, set[str]]:
    sections: dict[str, set[str]] = {}
    current: set[str] = set()
    for line in text.splitlines():
        if line.startswith("== "):
            current = sections.setdefault(line[3:], set())
        elif line:
            current.add(line.split("\t")[0])
    return sections


def test_bash_completes_subcommands(kdcli_on_path: dict[str, str]) -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    lines = ["kdcli prep", "kdcli ", "kdcli prepare mul", "kdcli distill --meth"]
    proc = subprocess.run([bash, "--norc", "--noprofile", "-c", BASH_DRIVER, "bash", *lines], cwd=ROOT,
                          capture_output=True, text=True, env=kdcli_on_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = _sections(proc.stdout)
    assert got["kdcli prep"] == {"prepare"}, NO_PROTOCOL
    assert got["kdcli "] >= SUBCOMMANDS
    assert got["kdcli prepare mul"] == {"multieye"}
    assert got["kdcli distill --meth"] == {"--method"}


ZSH_DRIVER = r"""
# Stand-ins for the completion system, so this runs without a terminal: _arguments prints what it got.
_arguments() { print -r -- "$@" }
compdef() { print -r -- "compdef $*" }
words=(kdcli prep); CURRENT=2
if [[ $1 == autoload ]]; then
  fpath=($PWD/completions $fpath)
  autoload -Uz _kdcli
else
  source completions/_kdcli
fi
_kdcli
"""


@pytest.mark.parametrize("how", ["autoload", "source"])
def test_zsh_completes_when_autoloaded_or_sourced(kdcli_on_path: dict[str, str], how: str) -> None:
    zsh = shutil.which("zsh")
    if zsh is None:
        pytest.skip("zsh is not installed")
    proc = subprocess.run([zsh, "-f", "-c", ZSH_DRIVER, "zsh", how], cwd=ROOT, capture_output=True,
                          text=True, env=kdcli_on_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    # Autoloaded, the very first TAB must already complete (typer's own script only registers itself).
    assert '(("prepare":' in proc.stdout, f"{NO_PROTOCOL}\n{proc.stdout}{proc.stderr}"
    if how == "source":
        assert "compdef _kdcli kdcli" in proc.stdout


def test_fish_completes_subcommands(kdcli_on_path: dict[str, str]) -> None:
    fish = shutil.which("fish")
    if fish is None:
        pytest.skip("fish is not installed")
    script = 'source completions/kdcli.fish; for l in $argv; echo "== $l"; complete -C "$l"; end'
    proc = subprocess.run([fish, "--no-config", "-c", script, "kdcli prep", "kdcli prepare mul"], cwd=ROOT,
                          capture_output=True, text=True, env=kdcli_on_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = _sections(proc.stdout)
    assert got["kdcli prep"] == {"prepare"}, NO_PROTOCOL
    assert got["kdcli prepare mul"] == {"multieye"}


# ------------------------------------------------------------------------------------------ stays light
def test_help_is_light() -> None:
    proc, heavy, code = _probe(["--help"])
    assert code == 0, proc.stderr
    assert "distill" in proc.stdout
    assert heavy == [], f"`kdcli --help` imported {heavy}; import them inside the command instead"


def test_python_m_kdcli_help_exits_zero() -> None:
    proc = subprocess.run([sys.executable, "-m", "kdcli", "--help"], capture_output=True, text=True,
                          env=_env(), cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "completions" in proc.stdout


def test_completions_command_is_light() -> None:
    proc, heavy, code = _probe(["completions", "bash"])
    assert code == 0, proc.stderr
    assert proc.stdout == completion_script("bash")
    assert heavy == [], f"`kdcli completions bash` imported {heavy}"


@pytest.mark.parametrize(("shell", "env"), [
    ("bash", {"COMP_WORDS": "kdcli distill --", "COMP_CWORD": "2"}),
    ("zsh", {"_TYPER_COMPLETE_ARGS": "kdcli prepare "}),
])
def test_completion_request_is_light(shell: str, env: dict[str, str]) -> None:
    proc, heavy, code = _probe([], _KDCLI_COMPLETE=f"complete_{shell}", **env)
    assert code == 0 and proc.stdout.strip(), f"{NO_PROTOCOL}\n{proc.stderr}"
    assert heavy == [], f"a {shell} completion request imported {heavy}; TAB would lag"


# ------------------------------------------------------------------------------- shared training options
def test_teach_and_distill_take_the_one_training_options_definition() -> None:
    import typer.main

    from kdcli.cli import app
    from kdcli.cli.options import TRAINING_OPTIONS

    commands = typer.main.get_command(app).commands

    def shared(name: str) -> list[tuple]:
        return [(p.name, p.opts, p.secondary_opts, p.help, p.default, p.show_default)
                for p in commands[name].params if p.name in TRAINING_OPTIONS]

    assert [row[0] for row in shared("teach")] == list(TRAINING_OPTIONS)
    assert shared("teach") == shared("distill")
    assert [p.name for p in commands["distill"].params][:5] == ["data", "teacher", "student", "method", "task"]


def test_training_options_refuse_a_command_without_room_for_them() -> None:
    from kdcli.cli.options import with_training_options

    def lacks_options(data: str | None = None) -> None:
        """No **options: the shared flags would reach it as unexpected keywords."""

    with pytest.raises(TypeError, match=r"lacks_options needs a \*\*options parameter"):
        with_training_options(lacks_options)


# --------------------------------------------------------------------------------------------- methods
def test_kdcli_run_fails_naming_the_command_and_showing_its_output() -> None:
    with pytest.raises(AssertionError, match="kdcli methods --nope exited 2") as failure:
        kdcli_run("methods", "--nope")
    assert "No such option" in str(failure.value)  # the command's own message, not only its exit code
    assert kdcli_run("methods", "--nope", ok=False).exit_code == 2


def test_methods_json_lists_papers_defaults() -> None:
    result = kdcli_run("methods", "--json")
    listing = json.loads(result.stdout)
    assert {"supervised", "kd", "coda"} <= set(listing)
    coda = listing["coda"]["params"]
    assert (coda["alpha"], coda["beta"], coda["temperature"]) == (0.6, 0.05, 10.0)
    assert "temperature" in listing["kd"]["params"]
    assert all(info["help"] for info in listing.values())


# -------------------------------------------------------------------------------------------- registry
def test_registry_rejects_duplicates_and_bad_targets() -> None:
    registry = Registry("widget")
    registry.add("a", "json:dumps", "first")
    with pytest.raises(ValueError, match="registered twice"):
        registry.add("a", "json:loads")
    with pytest.raises(ValueError, match="module:attribute"):
        registry.add("b", "json.dumps")


def test_registry_resolves_lazily_and_names_known_entries() -> None:
    registry = Registry("widget")
    registry.add("dump", "json:dumps", "serialise")
    registry.add("load", "json:loads")
    assert registry.get("dump") is json.dumps
    assert "dump" in registry and registry.names("l*") == ["load"] and registry.help("dump") == "serialise"
    with pytest.raises(UsageError, match="unknown widget 'nope'; known: dump, load") as info:
        registry.get("nope")
    assert info.value.exit_code == 2


def test_unknown_method_is_a_usage_error_before_any_heavy_import() -> None:
    from kdcli.methods import METHODS

    known = "bidirectional, coda, cvi, dkd, kd, mil, multilabel, protokd, sall, segmentation, supervised"
    with pytest.raises(UsageError, match=f"known: {known}"):
        METHODS.get("nope")


def test_distill_unknown_method_is_one_error_line(multieye_shards: Path, tmp_path: Path) -> None:
    result = kdcli_run("distill", "--data", str(multieye_shards), "--student", "fundus",
                       "--method", "nope", "--out", str(tmp_path / "s.pt"), ok=False)
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        "error: unknown method 'nope'; known: bidirectional, coda, cvi, dkd, kd, mil, multilabel, protokd, sall, "
        "segmentation, supervised"]
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_set_reaches_keys_that_also_have_a_flag_and_bad_choices_write_nothing(multieye_shards: Path,
                                                                            tmp_path: Path) -> None:
    from kdcli.engine.checkpoint import load_checkpoint

    common = ["teach", "--data", str(multieye_shards), "--modality", "fundus", "--model", "test_resnet",
              "--epochs", "1", "--batch-size", "8", "--workers", "0"]
    result = kdcli_run(*common, "--out", str(tmp_path / "a.pt"), "--set", "seed=5")
    assert load_checkpoint(tmp_path / "a.pt").meta["config"]["seed"] == 5  # --seed unset must not erase it
    for choice in ("amp=sometimes", "channels_last=maybe", "deterministic=never"):
        out = tmp_path / f"{choice.split('=')[0]}.pt"
        result = kdcli_run(*common, "--out", str(out), "--set", choice, ok=False)
        assert result.exit_code == 2 and result.output.startswith(f"error: {choice.split('=')[0]}=")
        assert list(tmp_path.glob(f"{out.stem}*")) == []
