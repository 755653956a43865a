"""Invariant 10: the house is one-way and has no circles. The files shipped as remote code import only
torch, transformers (and what transformers itself needs) and each other; nothing there reaches up into
flaminko's conversion, training or CLI; and no module of the package imports, through others, itself."""

import ast
import sys
from pathlib import Path

import pytest

import flaminko
from flaminko.release import REMOTE_CODE

PACKAGE = Path(flaminko.__file__).parent
SHIPPED = tuple(name.removesuffix(".py") for name in REMOTE_CODE)
# transformers' own dependencies, present wherever it is installed.
ALLOWED = {"torch", "transformers", "packaging", "numpy", "PIL"}


@pytest.mark.parametrize("module", SHIPPED)
def test_shipped_files_import_only_torch_transformers_and_each_other(module):
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert node.level == 1 and node.module in SHIPPED, f"{module} imports .{node.module}"
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
            for name in names:
                root = name.split(".")[0]
                assert root in ALLOWED or root in sys.stdlib_module_names, f"{module} imports {name}"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that the file imports, at its top or inside a function: an import
    put off into a function still closes a circle, it only moves the failure to a later call."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                above = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*above, node.module] if node.module else above)
            # `from x import y` imports the module x.y where there is one, else a name of x.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def find_circle(imports: dict[str, set[str]]) -> list[str] | None:
    """One circle of the import graph as [a, b, ..., a], or None when there is none."""
    finished, path = set(), []

    def visit(module):
        path.append(module)
        for imported in sorted(imports[module]):
            if imported in path:
                return path[path.index(imported) :] + [imported]
            if imported not in finished:
                circle = visit(imported)
                if circle:
                    return circle
        finished.add(path.pop())
        return None

    for module in sorted(imports):
        if module not in finished:
            circle = visit(module)
            if circle:
                return circle
    return None


def test_no_module_of_the_package_imports_itself_through_others():
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    imports = {module: package_imports(path, set(files)) for module, path in files.items()}
    # A reader of imports that missed the relative ones would find no circle anywhere.
    assert imports["flaminko.modeling_flaminko"] >= {"flaminko.configuration_flaminko", "flaminko.checkpoint_mapping_flaminko"}
    circle = find_circle(imports)
    assert circle is None, "import circle: " + " -> ".join(circle)
