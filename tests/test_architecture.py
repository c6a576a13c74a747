"""The house rules of the package tree, checked on the source: imports go downwards only (so there is
no import circle), and no function grows past 80 lines."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 80

# Bottom to top: a module may import modules of its own layer or below, never above. A module's
# layer is that of the longest prefix naming it or a package holding it.
LAYERS = [
    ("bltdist.errors", "bltdist.atomic", "bltdist.config", "bltdist.flops", "bltdist.memtrack", "bltdist.kernels"),
    ("bltdist.patching.tokens", "bltdist.patching.rules", "bltdist.patching"),
    ("bltdist.model",),
    ("bltdist.kernels.", "bltdist.model_dir", "bltdist.metrics", "bltdist.data", "bltdist.patching.entropy",
     "bltdist.patching.store", "bltdist.patching.patcher", "bltdist.tokenizer"),
    ("bltdist.parallel",),
    ("bltdist.training",),
    ("bltdist.train", "bltdist.plan", "bltdist.convert", "bltdist.patch", "bltdist.patching.cli", "bltdist.generate",
     "bltdist.evaluate", "bltdist.scaling", "bltdist"),
]  # fmt: skip


def module_files() -> dict[str, Path]:
    files = {}
    for root, package in ((REPO / "src" / "bltdist", "bltdist"), (REPO / "kernels", "bltdist.kernels")):
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join((package, *parts[:-1])) if parts[-1] == "__init__" else ".".join((package, *parts))
            files[name] = path
    return files


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The bltdist modules ``name`` imports anywhere in its file (functions included)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # "from package import module" imports the module; "from module import name" the module.
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names)
    return {module for module in found if module in modules and module != name}


def layer_of(name: str) -> int:
    """The layer of the longest prefix that names ``name`` or a package holding it."""
    matches = [
        (len(prefix), index)
        for index, layer in enumerate(LAYERS)
        for prefix in layer
        if name == prefix or name.startswith(prefix if prefix.endswith(".") else prefix + ".")
    ]
    assert matches, f"{name} has no layer in tests/test_architecture.py; add it where it belongs"
    return max(matches)[1]


def test_every_import_goes_down_the_layers():
    files = module_files()
    upward = [
        f"{name} (layer {layer_of(name)}) imports {imported} (layer {layer_of(imported)})"
        for name, path in files.items()
        for imported in sorted(imports_of(name, path, set(files)))
        if layer_of(imported) > layer_of(name)
    ]
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_no_import_circle():
    files = module_files()
    graph = {name: imports_of(name, path, set(files)) for name, path in files.items()}
    visiting, done, circles = [], set(), []

    def visit(name: str) -> None:
        if name in done:
            return
        if name in visiting:
            circles.append(" -> ".join([*visiting[visiting.index(name) :], name]))
            return
        visiting.append(name)
        for imported in sorted(graph[name]):
            visit(imported)
        visiting.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    assert not circles, "import circles:\n" + "\n".join(circles)


@pytest.mark.parametrize("root", ["src", "kernels"])
def test_no_function_longer_than_80_lines(root):
    long = [
        f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in (REPO / root).rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, "functions to split:\n" + "\n".join(long)
