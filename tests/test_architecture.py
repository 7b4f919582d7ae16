"""The library's shape: it never imports the lab, its imports form no cycle, and it imports late only optional
heavy dependencies (each with a reason on the line)."""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "postquant"
# Optional dependencies imported inside the functions that need them (extras in pyproject.toml), and scipy,
# a dependency whose solvers take ~300 modules that `import postquant` should not pay for, and numba (~0.4 s,
# and it loads scipy), a dependency that only SQuant's CPU stages need.
OPTIONAL = {
    "onnx",
    "onnxscript",
    "ml_dtypes",
    "onnxruntime",
    "matplotlib",
    "transformers",
    "gguf",
    "compressed_tensors",
    "accelerate",
    "scipy",
    "numba",
}


@functools.cache
def _modules() -> dict[str, Path]:
    mods = {}
    for path in LIBRARY.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _imports(name: str, path: Path) -> list[tuple[str, int, bool, ast.stmt]]:
    """(imported module, line, inside a function, node) for every import outside ``if TYPE_CHECKING``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, int, bool, ast.stmt]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, in_function, child) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                mods = _modules()
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    found.append((full if full in mods else base, child.lineno, in_function, child))
            visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    visit(ast.parse(path.read_text()), False)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {name: set() for name in mods}
    for name, path in mods.items():
        for target, *_ in _imports(name, path):
            if target in mods and target != name:
                graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def test_importing_the_library_loads_no_lab_module():
    code = (
        "import sys, postquant\n"
        "postquant.quantize, postquant.save, postquant.load, postquant.result, postquant.requirements\n"
        "import postquant.io, postquant.mixed.apply, postquant.mixed.report, postquant.reconstruct.engine\n"
        "import postquant.pipeline, postquant.eval, postquant.calib\n"
        "bad = [m for m in sys.modules if m.startswith('postquant_lab') or m.split('.')[-1] in ('zoo', 'study')]\n"
        "bad += [m for m in ('scipy', 'transformers', 'onnx', 'matplotlib') if m in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_the_library_never_names_the_lab():
    for name, path in _modules().items():
        if name == "postquant.__main__":  # the program entry: runs the lab's command line
            continue
        lab = [line for target, line, *_ in _imports(name, path) if target.startswith("postquant_lab")]
        assert not lab, f"{path.relative_to(ROOT)}:{lab[0]} imports postquant_lab"


def test_no_import_cycle_in_the_library():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("name", sorted(_modules()))
def test_late_imports_are_optional_dependencies_with_a_reason(name):
    path = _modules()[name]
    lines = path.read_text().splitlines()
    for target, line, in_function, node in _imports(name, path):
        if not in_function:
            continue
        where = f"{path.relative_to(ROOT)}:{line}"
        assert target.split(".")[0] in OPTIONAL, f"{where}: late import of {target} (import it at the top)"
        text = "\n".join(lines[node.lineno - 1 : (node.end_lineno or node.lineno)])
        reason = "#" in text or lines[node.lineno - 2].strip().startswith("#")
        assert reason, f"{where}: say on the line why {target} is imported late"
