"""The package's layout holds: no import circles between its modules, and no room imports a room above it.

Imports are read from the source (every import statement, also inside functions and `if TYPE_CHECKING:`), nothing is
imported. A room is a folder of recaption/; the modules at the top of recaption/ are the front door (`__init__`,
`api`, `cli`) or the base everything may use (config, errors, redact, ...)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "recaption"
TOP = {"recaption", "recaption.api", "recaption.cli"}
# room -> the rooms it may import (besides itself and base). train and eval stand side by side: the trainer
# evaluates while it trains, eval loads the trainer's exports; a circle of modules between them still fails.
ALLOWED = {
    "base": set(),
    "sources": set(),
    "captioners": set(),
    "job": {"captioners", "sources"},
    "train": {"captioners", "eval", "job", "sources"},
    "eval": {"captioners", "job", "sources", "train"},
    "outputs": {"captioners", "job", "sources"},
    "demo": {"captioners", "eval", "job", "outputs", "sources", "train"},
    "bench": {"captioners", "demo", "eval", "job", "outputs", "sources", "train"},
    "top": {"bench", "captioners", "demo", "eval", "job", "outputs", "sources", "train"},
}


def modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        rel = f.relative_to(PACKAGE.parent).with_suffix("")
        out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = f
    return out


def room(mod: str) -> str:
    if mod in TOP:
        return "top"
    parts = mod.split(".")
    return parts[1] if (PACKAGE / parts[1]).is_dir() else "base"


def import_graph() -> dict[str, set[str]]:
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(max(node.level - 1, 0)):
                    base = base.rpartition(".")[0]
                source = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
                targets = [f"{source}.{a.name}" for a in node.names] + [source]
            else:
                continue
            for target in targets:
                if target.split(".")[0] != "recaption":
                    continue
                found = resolve(target)
                # a module importing its own package's __init__ is not an edge (the __init__ only re-exports)
                if found and found != mod and not mod.startswith(found + "."):
                    graph[mod].add(found)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_circles():
    found = circles(import_graph())
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_imports_point_down():
    up = []
    for mod, targets in import_graph().items():
        here = room(mod)
        for target in targets:
            there = room(target)
            if here == "top" or there in (here, "base") or there in ALLOWED.get(here, set()):
                continue
            up.append(f"{mod} ({here}) imports {target} ({there})")
    assert not up, "imports that point up (or across, where ALLOWED says no):\n" + "\n".join(sorted(up))


def test_every_room_is_in_the_table_and_says_what_it_is():
    for folder in sorted(p for p in PACKAGE.iterdir() if (p / "__init__.py").exists()):
        assert folder.name in ALLOWED, f"recaption/{folder.name}/ is a room the layout test does not know"
        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text()))
        assert doc and len(doc.splitlines()) == 1, f"recaption/{folder.name}/__init__.py needs a one-line docstring"


def test_no_room_shadows_a_name_of_the_api():
    """Importing `recaption.x.y` binds `recaption.x` to the room: a room named like an API function (`recaption.run`)
    would replace that function for everyone once any of its modules is imported."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    api = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
            api = set(ast.literal_eval(node.value))
    rooms = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert not rooms & api, f"rooms named like the API's names: {sorted(rooms & api)}"
