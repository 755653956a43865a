"""What README.md and docs/*.md name exists: every repository path, every `flaminko.*` module or
attribute, and every option of every `flaminko` command line in their shell blocks."""

import functools
import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PATH = re.compile(r"(?<![\w/.-])((?:flaminko|tests|examples|benchmarks|docs|checks|\.ci)/[\w./*-]*[\w*])")
MODULE = re.compile(r"(?<![\w/.-])(flaminko(?:\.\w+)+)")
# Paths the pages name inside transformers' own repository, not this one.
TRANSFORMERS_PATHS = {"tests/generation/test_utils.py"}


def text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def shell_commands(page: Path) -> list[str]:
    """The command lines of a page's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text(page), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def flaminko_invocations(command: str) -> list[tuple[list[str], list[str]]]:
    """([subcommand words], [--options]) for each `flaminko ...` / `-m flaminko.cli ...` in a command line."""
    invocations = []
    for part in re.split(r"&&|\|", command):
        words = shlex.split(part, comments=False)
        for start, word in enumerate(words):
            if word == "flaminko" or (word == "flaminko.cli" and words[start - 1] == "-m"):
                rest = words[start + 1 :]
                subcommand = rest[:1]
                if subcommand == ["convert"] and len(rest) > 1:
                    subcommand = rest[:2]
                invocations.append((subcommand, [w.split("=")[0] for w in rest if w.startswith("--")]))
                break
    return invocations


@functools.cache
def help_text(subcommand: tuple[str, ...]) -> str:
    result = subprocess.run([sys.executable, "-m", "flaminko.cli", *subcommand, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"flaminko {' '.join(subcommand)} --help: {result.stderr[-2000:]}"
    return result.stdout


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_repository_path_a_page_names_exists(page):
    missing = []
    for path in set(PATH.findall(text(page))):
        path = path.split("::")[0].rstrip(".")
        written = f"--out {path}" in text(page)  # what a command on the page writes
        if path not in TRANSFORMERS_PATHS and not written and not list(ROOT.glob(path)):
            missing.append(path)
    assert not missing, missing


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_flaminko_module_or_name_a_page_names_imports(page):
    missing = []
    for dotted in set(MODULE.findall(text(page))):
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                found = importlib.import_module(".".join(parts[:cut]))
                break
            except ModuleNotFoundError:
                continue
        for name in parts[cut:]:
            found = getattr(found, name, None)
        if found is None:
            missing.append(dotted)
    assert not missing, missing


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_option_of_a_flaminko_command_line_exists(page):
    unknown = []
    for command in shell_commands(page):
        for subcommand, options in flaminko_invocations(command):
            accepted = help_text(tuple(subcommand))
            unknown += [f"flaminko {' '.join(subcommand)} {option}" for option in options if not re.search(rf"{re.escape(option)}\b", accepted)]
    assert not unknown, unknown
