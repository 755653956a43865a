"""Invariant 10: the house is one-way. The files shipped as remote code import only torch,
transformers (and what transformers itself needs) and each other; nothing there reaches up into
flaminko's conversion, training or CLI."""

import ast
import sys
from pathlib import Path

import pytest

import flaminko
from flaminko.release import REMOTE_CODE

SHIPPED = tuple(name.removesuffix(".py") for name in REMOTE_CODE)
# transformers' own dependencies, present wherever it is installed.
ALLOWED = {"torch", "transformers", "packaging", "numpy", "PIL"}


@pytest.mark.parametrize("module", SHIPPED)
def test_shipped_files_import_only_torch_transformers_and_each_other(module):
    tree = ast.parse((Path(flaminko.__file__).parent / f"{module}.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert node.level == 1 and node.module in SHIPPED, f"{module} imports .{node.module}"
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
            for name in names:
                root = name.split(".")[0]
                assert root in ALLOWED or root in sys.stdlib_module_names, f"{module} imports {name}"
