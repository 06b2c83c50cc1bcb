"""The project's imports run down the layer table of docs/ARCHITECTURE.md ("### Layers") and never close a
circle.

Every import statement of every module in `megatron_oapl/` and `launch/` counts, module-level and inside
functions alike (a lazy import is still a dependency: it only moves when the import happens). A module may
import from its own layer or a lower one. The table is parsed from the document, so the page and the code
cannot drift: a module the table does not cover, or an entry that names no file, fails here too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("megatron_oapl", "launch")
DOC = ROOT / "docs" / "ARCHITECTURE.md"
HEADING = "### Layers"

# (importing module, imported module) -> why that upward import is allowed. Keep it empty if at all possible.
UPWARD_EXCEPTIONS: dict[tuple[str, str], str] = {}


# --- the import graph ------------------------------------------------------------------------------------

def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages (a package is its __init__)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _project_module(name: str, modules: dict[str, Path]) -> str | None:
    """The project module `name` loads: itself, or the nearest enclosing one (`pkg.mod.attr` -> `pkg.mod`)."""
    parts = name.split(".")
    while parts and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts) if parts else None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, project module) for every import statement in `path`, relative imports resolved. Only the
    module an import names counts, not the parent packages Python also runs on the way."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module
            # `from pkg import sub` loads the submodule pkg.sub; `from pkg import name` loads pkg itself.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
            target = _project_module(name, modules)
            if target is not None and target != module:
                found.append((node.lineno, target))
    return found


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported project module: line of its first import}."""
    modules = project_modules()
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges = graph.setdefault(module, {})
        for line, target in imports_of(module, path, modules):
            edges.setdefault(target, line)
    return graph


# --- the layer table -------------------------------------------------------------------------------------

def layer_table() -> dict[str, int]:
    """Entry (as written in the table: `algo/`, `rollout/types.py`, `launch/`) -> layer number."""
    lines = DOC.read_text().splitlines()
    assert HEADING in lines, f"{DOC.relative_to(ROOT)} has no {HEADING!r} section"
    table: dict[str, int] = {}
    in_table = False
    for line in lines[lines.index(HEADING) + 1:]:
        if not line.startswith("|"):
            if in_table:
                break
            continue
        in_table = True
        cells = [c.strip() for c in line.strip("|").split("|")]
        if not cells[0].isdigit():  # the header and the |---| line
            continue
        for entry in re.findall(r"`([^`]+)`", cells[1]):
            assert entry not in table, f"{entry} appears twice in the layer table"
            table[entry] = int(cells[0])
    assert table, f"the {HEADING!r} section of {DOC.relative_to(ROOT)} has no table"
    return table


def _entry_module(entry: str) -> tuple[str, bool]:
    """(dotted name, is a package) of what an entry names: relative to megatron_oapl/, else to the repository
    root (`launch/`)."""
    for base in (ROOT / "megatron_oapl", ROOT):
        path = base / entry
        if path.is_file() and path.suffix == ".py":
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            return ".".join(parts), False
        if entry.endswith("/") and (path / "__init__.py").is_file():
            return ".".join(path.relative_to(ROOT).parts), True
    raise AssertionError(f"layer table entry {entry!r} names no module (`x.py`) or package (`x/`) under "
                         "megatron_oapl/ or the repository root")


def layers_of_modules() -> dict[str, tuple[int, str]]:
    """module -> (layer, the entry that gives it): the module's own entry, else its innermost package's."""
    modules, packages = {}, {}
    for entry, layer in layer_table().items():
        name, is_package = _entry_module(entry)
        (packages if is_package else modules)[name] = (layer, entry)
    layers = {}
    for module in project_modules():
        if module in modules:
            layers[module] = modules[module]
            continue
        parts = module.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in packages:
                layers[module] = packages[".".join(parts[:n])]
                break
    return layers


# --- the tests -------------------------------------------------------------------------------------------

def test_every_table_entry_names_a_module():
    for entry in layer_table():
        _entry_module(entry)


def test_every_module_has_a_layer():
    layers = layers_of_modules()
    missing = sorted(m for m in project_modules() if m not in layers)
    assert not missing, (f"modules without a layer in {DOC.relative_to(ROOT)} ({HEADING}): {', '.join(missing)}; "
                         "add each (or its package) to the table")


def test_no_import_runs_up():
    layers = layers_of_modules()
    modules = project_modules()
    upward = []
    for module, edges in import_graph().items():
        for target, line in edges.items():
            (low, low_entry), (high, high_entry) = layers[module], layers[target]
            if high > low and (module, target) not in UPWARD_EXCEPTIONS:
                upward.append(f"{modules[module].relative_to(ROOT)}:{line} imports {target} "
                              f"(layer {high}, `{high_entry}`) from layer {low} (`{low_entry}`)")
    assert not upward, "imports that run up the layer table:\n" + "\n".join(upward)


def test_upward_exceptions_are_still_needed():
    graph, layers = import_graph(), layers_of_modules()
    stale = [pair for pair in UPWARD_EXCEPTIONS
             if pair[1] not in graph.get(pair[0], {}) or layers[pair[1]][0] <= layers[pair[0]][0]]
    assert not stale, f"UPWARD_EXCEPTIONS no longer needed (remove them): {stale}"


def import_circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One circle (a -> b -> ... -> a) per strongly connected group of modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_circle_through(group, graph) for group in groups]


def _circle_through(group: list[str], graph: dict[str, dict[str, int]]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group (breadth first)."""
    start, members = group[0], set(group)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph.get(node, {})):
                if nxt not in members or nxt in came_from:
                    continue
                came_from[nxt] = node
                if nxt == start:
                    path = [start]
                    while path[-1] != start or len(path) == 1:
                        path.append(came_from[path[-1]])
                    return path[::-1]
                following.append(nxt)
        frontier = following
    raise AssertionError(f"no circle through {group}")


def test_no_import_circle():
    circles = import_circles(import_graph())
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_circle_finder_reports_a_circle():
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1, "d": 1}, "d": {}}
    assert import_circles(graph) == [["a", "b", "c", "a"]]
