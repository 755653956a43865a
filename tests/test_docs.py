"""What README.md and docs/*.md name exists: every repository path, every `flaminko.*` module or
attribute, and every option of every `flaminko` command line in their shell blocks; and their Python
blocks run, on tiny local backbones in place of the Hub names, unless the page marks one as not run
and says why."""

import functools
import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# ASCII: repository paths are ASCII, and a Korean particle written right after one is not part of it.
PATH = re.compile(r"(?<![\w/.-])((?:flaminko|tests|examples|benchmarks|docs|checks|\.ci)/[\w./*-]*[\w*])", re.ASCII)
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


# A page marks a Python block the tests do not run with this comment on the line before it, giving why.
NOT_RUN = re.compile(r"<!-- not run by the tests: (.+?) -->\n```python\n")
# The Hub names of the snippets, and what stands in for them here (tiny local backbones, built below).
HUB_NAMES = {'"openai/clip-vit-large-patch14"': "vision", '"EleutherAI/polyglot-ko-1.3b"': "gpt_neox", '"ViT-L-14"': "vision"}


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """(number, code) of each Python block the tests run."""
    page_text = text(page)
    skipped = {match.end() for match in NOT_RUN.finditer(page_text)}
    blocks = re.finditer(r"```python\n(.*?)```", page_text, flags=re.S)
    return [(number, match.group(1)) for number, match in enumerate(blocks) if match.start(1) not in skipped]


SNIPPETS = [(page, number, code) for page in PAGES for number, code in python_blocks(page)]


def test_every_python_block_not_run_says_why():
    for page in PAGES:
        marked = len(NOT_RUN.findall(text(page)))
        assert len(re.findall(r"```python\n", text(page))) == len(python_blocks(page)) + marked, page.name
        assert all(reason.strip() for reason in NOT_RUN.findall(text(page)))


@pytest.fixture(scope="module")
def snippet_folder(backbones, tmp_path_factory):
    """A working folder as a page's reader has it after `flaminko demo` and a training run: a saved
    model at flaminko-demo/run/final and runs/ko/final, caption tables test.tsv and train.tsv."""
    from conftest import build_model, noise_image

    folder = tmp_path_factory.mktemp("reader")
    model, processor = build_model(backbones)
    for saved in ("flaminko-demo/run/final", "runs/ko/final"):
        model.save_pretrained(folder / saved)
        processor.save_pretrained(folder / saved)
    for table, rows in (("test.tsv", range(4)), ("train.tsv", range(4, 14))):
        lines = ["image\tcaption"]
        for row in rows:
            noise_image(row).save(folder / f"{row}.png")
            lines.append(f"{row}.png\t빨간색 원" if row % 2 else f"{row}.png\t파란색 네모")
        (folder / table).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.mark.parametrize("page, number, code", SNIPPETS, ids=[f"{page.name}#{number}" for page, number, _ in SNIPPETS])
def test_python_block_runs(page, number, code, snippet_folder, backbones, monkeypatch):
    from conftest import build_model, noise_image

    for hub_name, family in HUB_NAMES.items():
        code = code.replace(hub_name, repr(str(backbones[family])))
    monkeypatch.chdir(snippet_folder)
    model, processor = build_model(backbones)
    images = {name: noise_image(seed) for seed, name in enumerate(["image", "image_a", "image_b", "query_image", "other_image", "demo_image"])}
    size = model.config.vision_config.image_size
    lang_x = processor.tokenizer(["<image>Output:"], return_tensors="pt")
    names = {
        **images,
        "model": model,
        "processor": processor,
        "batch": processor(text="<image>Output:", images=[images["image"]]),
        "catalogue_images": [noise_image(seed) for seed in range(10, 14)],
        "frames": [noise_image(seed) for seed in range(20, 22)],
        "vision_x": torch.randn(1, 1, 1, 3, size, size),
        "lang_x": lang_x,
    }
    exec(compile(code, f"{page.name} block {number}", "exec"), names)
