"""The package's import graph: no circle, and no import of an omoe module hidden inside a function;
and its sizes: no source file over 400 lines, no function over 80.

The graph is read from the source (``ast``, by scripts/architecture.py, which also draws the floors
of docs/architecture.md), with the imports at module level AND those inside functions, so an import
that a function defers still counts: a circle that only a local import closes is a circle all the
same. Every import goes to the importer's own floor or a lower one (the floors: FLOORS there).
"""

from __future__ import annotations

import ast
import importlib.util
import itertools
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Third-party libraries that a function may import for itself: optional extras (peft, trl,
# bitsandbytes, matplotlib, sklearn, tensorboard), version-dependent torch.distributed APIs, and
# transformers, which takes seconds to import (`import omoe` and `omoe --help` do not load it).
LOCAL_OK = ("transformers", "peft", "trl", "bitsandbytes", "matplotlib", "sklearn", "torch.distributed",
            "torch.utils.tensorboard")  # fmt: skip


def _load_script():
    spec = importlib.util.spec_from_file_location("architecture", SRC.parent / "scripts" / "architecture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


arch = _load_script()
import_graph, find_cycle = arch.import_graph, arch.find_cycle


def _describe(graph, cycle: list[str]) -> str:
    steps = []
    for a, b in itertools.pairwise(cycle):
        inside, line = graph[a][b]
        steps.append(f"{a} -> {b} (line {line}{', inside a function' if inside else ''})")
    return "; ".join(steps)


def test_the_package_has_no_import_cycle_counting_imports_inside_functions():
    graph = import_graph(SRC)
    assert len(graph) > 50 and "omoe.layers.moe" in graph  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {_describe(graph, cycle)}"


def test_no_module_imports_from_a_floor_above_its_own():
    assert not arch.upward_imports(import_graph(SRC))


def test_an_import_from_a_higher_floor_is_reported():
    graph = {"omoe.layers.moe": {"omoe.cli.main": (True, 7)}, "omoe.cli.main": {}}
    assert arch.upward_imports(graph) == ["omoe.layers.moe (floor 2) imports omoe.cli.main (floor 8), line 7"]


def test_functions_import_only_optional_or_slow_third_party_libraries():
    hidden = []
    for path in sorted((SRC / "omoe").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for f in ast.walk(tree):
            if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(f):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    mods = [node.module or "."]
                else:
                    continue
                for mod in mods:
                    if not any(mod == ok or mod.startswith(ok + ".") for ok in LOCAL_OK):
                        hidden.append(
                            f"{path.relative_to(SRC)}:{node.lineno} imports {mod} inside {f.name}()"
                        )
    assert not hidden, "imports to move to module level:\n" + "\n".join(hidden)


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


@pytest.mark.parametrize("where", ["module", "function"])
def test_a_cycle_is_found_whether_its_import_is_at_module_level_or_inside_a_function(tmp_path, where):
    closing = "from pkg.a import f\n" if where == "module" else "def g():\n    from pkg.a import f\n"
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n\ndef f():\n    pass\n",
        "pkg/b.py": "from .sub import c\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": closing,
    })  # fmt: skip
    graph = import_graph(tmp_path)
    assert graph["pkg.a"] == {"pkg.b": (False, 1)}
    assert graph["pkg.b"] == {"pkg.sub.c": (False, 1)}  # relative import resolved
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]
    _write(tmp_path, {"pkg/sub/c.py": "import os\n"})
    assert find_cycle(import_graph(tmp_path)) is None


# Issue 14's sizes: a file a reader can hold, a function that fits on a screen.
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 80


def too_long(root: Path) -> list[str]:
    """Every ``.py`` under ``root`` over :data:`MAX_FILE_LINES` lines, and every function (``def``
    line to its last line, docstring included, decorators not) over :data:`MAX_FUNCTION_LINES`."""
    found = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(root).as_posix()
        if (n := len(text.splitlines())) > MAX_FILE_LINES:
            found.append(f"{rel}: {n} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{rel}:{node.lineno} {node.name}() {length} lines")
    return found


def test_no_source_file_is_over_400_lines_and_no_function_over_80():
    offenders = too_long(SRC / "omoe")
    assert not offenders, (
        f"over {MAX_FILE_LINES} lines a file or {MAX_FUNCTION_LINES} a function:\n" + "\n".join(offenders)
    )


def test_a_file_over_400_lines_and_a_function_over_80_are_reported(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(80))  # def line + 80 = 81 lines
    _write(tmp_path, {
        "pkg/long_def.py": f"@decorator\ndef f():\n{body}",
        "pkg/ok_def.py": "def g():\n" + "".join(f"    y{i} = {i}\n" for i in range(79)),
        "pkg/long_file.py": "z = 0\n" * 401,
        "pkg/ok_file.py": "z = 0\n" * 400,
    })  # fmt: skip
    assert too_long(tmp_path) == ["pkg/long_def.py:2 f() 81 lines", "pkg/long_file.py: 401 lines"]
