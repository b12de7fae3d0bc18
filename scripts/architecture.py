"""The package's floors, read from its imports: the diagrams of docs/architecture.md.

    .venv/bin/python scripts/architecture.py           # print one Mermaid diagram per floor
    .venv/bin/python scripts/architecture.py --write   # put them into docs/architecture.md

The import graph is read from the source with ``ast``: imports at module level and inside
functions alike (a deferred import still ties two modules). :data:`FLOORS` is the design: a module
may import from its own floor and the floors below, never from above; tests/test_architecture.py
holds the code to it (no cycle, no upward import).
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DOC = ROOT / "docs" / "architecture.md"

# (title, module prefixes), ground floor first. A module belongs to the floor of its longest prefix.
FLOORS = (
    ("ground: errors, names, options, helpers", ("omoe.errors", "omoe.version", "omoe.registry", "omoe.utils",
                                                 "omoe.options", "omoe.yamlio")),
    ("layers: the adapter math (pure torch)", ("omoe.layers",)),
    ("config, models and the optimizer", ("omoe.config", "omoe.models", "omoe.optim")),
    ("injection into Hugging Face models, and the data", ("omoe.tuners", "omoe.data")),
    ("the package's face", ("omoe",)),
    ("training, evaluation, integrations", ("omoe.train", "omoe.eval", "omoe.integrations")),
    ("experiments, analysis, benchmarks", ("omoe.experiment", "omoe.analysis", "omoe.bench")),
    ("the command line", ("omoe.cli",)),
)  # fmt: skip


# ---------------------------------------------------------------------------- the graph
def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: set[str]) -> list[tuple[str, bool, int]]:
    """``(imported module, inside a function?, line)`` for every import of a module of ``name``'s
    top package; ``from pkg import sub`` names the submodule where ``sub`` is one."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)}  # fmt: skip
    top = name.split(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == top and target != name:
                found.append((target, id(node) in local, node.lineno))
    return found


def import_graph(root: Path = SRC) -> dict[str, dict[str, tuple[bool, int]]]:
    """module -> {imported module: (inside a function?, line)} for every ``.py`` under ``root``."""
    paths = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, dict[str, tuple[bool, int]]] = {}
    for name, path in paths.items():
        edges = graph.setdefault(name, {})
        for target, inside, line in _imports(path, name, set(paths)):
            if target in paths:
                edges.setdefault(target, (inside, line))
    return graph


def find_cycle(graph: dict[str, dict]) -> list[str] | None:
    """One import circle as ``[a, b, ..., a]``, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


# ---------------------------------------------------------------------------- the floors
def floor_of(module: str) -> int:
    """Index into :data:`FLOORS` of ``module`` (longest matching prefix)."""
    best = max(
        ((len(p), i) for i, (_, prefixes) in enumerate(FLOORS) for p in prefixes
         if module == p or module.startswith(p + ".")),
        default=None,
    )  # fmt: skip
    if best is None:
        raise KeyError(f"{module} is on no floor; add its package to FLOORS in scripts/architecture.py")
    return best[1]


def upward_imports(graph) -> list[str]:
    """Every import of a module on a higher floor than the importer's."""
    return [f"{a} (floor {floor_of(a) + 1}) imports {b} (floor {floor_of(b) + 1}), line {line}"
            for a, edges in sorted(graph.items()) for b, (_, line) in sorted(edges.items())
            if floor_of(b) > floor_of(a)]  # fmt: skip


def _node(module: str) -> str:
    return module.removeprefix("omoe.") or "omoe"


def _ident(name: str) -> str:
    return re.sub(r"\W", "_", name)


def mermaid(graph, index: int) -> str:
    """Floor ``index``'s modules and their imports: within the floor module by module, to lower
    floors package by package (``models/``). A package's ``__init__`` (a face that hands names on)
    is drawn only where its floor has nothing else."""
    faces = {m for m in graph if any(o.startswith(m + ".") for o in graph)}
    on_floor = sorted(m for m in graph if floor_of(m) == index)
    mods = [m for m in on_floor if m not in faces] or on_floor

    def lower_name(module: str) -> str:
        parts = module.split(".")
        return f"{parts[1]}/" if len(parts) > 2 or module in faces - {"omoe"} else _node(module)

    lines = ["```mermaid", "flowchart TD"]
    lines += [f'  {_ident(_node(m))}["{_node(m)}"]' for m in mods]
    lower: set[tuple[str, str]] = set()
    for m in mods:
        for target in sorted(graph[m]):
            if target in mods:
                lines.append(f"  {_ident(_node(m))} --> {_ident(_node(target))}")
            elif 0 < floor_of(target) < index or floor_of(target) == 0 < index <= 1:
                lower.add((_node(m), lower_name(target)))  # the ground floor only under floor 2: all use it
    lines += [f'  {_ident("low_" + pkg)}(["{pkg}"]):::lower' for pkg in sorted({p for _, p in lower})]
    lines += [f"  {_ident(m)} -.-> {_ident('low_' + pkg)}" for m, pkg in sorted(lower)]
    lines += ["  classDef lower fill:#eee,stroke:#999,color:#555", "```"]
    return "\n".join(lines)


def diagrams(graph=None) -> dict[int, str]:
    graph = graph or import_graph()
    return {i: mermaid(graph, i) for i in range(len(FLOORS))}


def write(doc: Path = DOC) -> None:
    """Replace each ``<!-- floor N -->`` ... ``<!-- /floor -->`` block of ``doc`` by floor N's diagram."""
    text = doc.read_text(encoding="utf-8")
    for i, diagram in diagrams().items():
        text = re.sub(
            rf"<!-- floor {i + 1} -->\n.*?<!-- /floor -->",
            lambda _, d=diagram, n=i + 1: f"<!-- floor {n} -->\n{d}\n<!-- /floor -->",
            text, flags=re.S,
        )  # fmt: skip
    doc.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"update the diagrams in {DOC.relative_to(ROOT)}")
    args = parser.parse_args()
    graph = import_graph()
    problems = upward_imports(graph)
    cycle = find_cycle(graph)
    if cycle:
        problems.append("import cycle: " + " -> ".join(cycle))
    if args.write:
        write()
        print(f"wrote the diagrams of {DOC.relative_to(ROOT)}")
    else:
        for i, diagram in diagrams(graph).items():
            print(f"## Floor {i + 1}: {FLOORS[i][0]}\n\n{diagram}\n")
    for p in problems:
        print("problem:", p)


if __name__ == "__main__":
    main()
