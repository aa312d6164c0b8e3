"""Structure: the modules of ``hyperbagel_core`` import each other without a circle.

The graph is read from the source with ``ast``: every import statement counts, module-level and inside
functions (a deferred import that only dodges a circle is still a circle). Importing ``a.b.c`` from outside
package ``a.b`` also runs ``a/b/__init__.py``, so that package is an edge too. The graph must be a DAG; then
a fresh interpreter imports every module in dependency order (dependencies first) and checks that no import
reaches a module still executing (the runtime shape of a circle) and that each import loads nothing the
graph does not predict.
"""
import json
import subprocess
import sys
from pathlib import Path

from tests.import_scan import import_statements

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "hyperbagel_core"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, set[str]]:
    """{module: modules of the package it imports}, for every .py file under hyperbagel_core."""
    files = {_module_name(p): p for p in sorted(CORE.rglob("*.py"))}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for mod, names in import_statements(path, package):
            # `from pkg import sub` imports the submodule; `from mod import name` the module
            targets.update({f"{mod}.{n}" if f"{mod}.{n}" in files else mod for n in names} or {mod})
        deps = set()
        for t in targets:
            while t and t not in files:  # `import a.b.c` names the module a.b.c; attributes are cut off
                t = t.rpartition(".")[0]
            if not t or t == name:
                continue
            deps.add(t)
            deps.update(a for a in _ancestors(t) if a in files and a not in _ancestors(name) and a != name)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def dependency_order(graph: dict[str, set[str]]) -> list[str]:
    order, done = [], set()

    def visit(m):
        if m in done:
            return
        done.add(m)
        for d in sorted(graph[m]):
            visit(d)
        order.append(m)

    for m in sorted(graph):
        visit(m)
    return order


def test_import_graph_has_no_circle():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import circle in hyperbagel_core: " + " -> ".join(cycle)


def test_the_graph_sees_deferred_and_package_imports():
    graph = import_graph()
    # a deferred import (inside a function) and a package's __init__ reached through one of its modules
    assert "hyperbagel_core.pipeline" in graph["hyperbagel_core"]
    assert {"hyperbagel_core.distill", "hyperbagel_core.distill.sampling"} <= graph["hyperbagel_core.pipeline"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


_IMPORTER = r"""
import builtins, importlib, importlib.util, json, sys
order, graph = json.loads(sys.argv[1]), {k: set(v) for k, v in json.loads(sys.argv[2]).items()}
circles = []
real_import = builtins.__import__

def ancestors(name):
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}

def checked_import(name, globals=None, locals=None, fromlist=(), level=0):
    importer = (globals or {}).get("__name__", "")
    package = (globals or {}).get("__package__") or ""
    if importer.startswith("hyperbagel_core"):
        target = importlib.util.resolve_name("." * level + name, package) if level else name
        for t in [target] + [f"{target}.{f}" for f in fromlist or () if f != "*"]:
            mod = sys.modules.get(t)
            spec = getattr(mod, "__spec__", None)
            if spec is not None and getattr(spec, "_initializing", False) and t not in ancestors(importer):
                circles.append(f"{importer} imports {t} while {t} is still executing")
    return real_import(name, globals, locals, fromlist, level)

builtins.__import__ = checked_import

def reach(names):
    seen, todo = set(), list(names)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    return seen

unexpected = []
for m in order:
    before = {k for k in sys.modules if k.startswith("hyperbagel_core")}
    importlib.import_module(m)
    new = {k for k in sys.modules if k.startswith("hyperbagel_core")} - before
    extra = new - reach({m} | (ancestors(m) & set(graph)))
    if extra:
        unexpected.append(f"importing {m} loaded {sorted(extra)}, which the import graph does not predict")
print(json.dumps({"circles": circles, "unexpected": unexpected}))
"""


def test_every_module_imports_in_dependency_order():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "no dependency order exists; import circle: " + " -> ".join(cycle)
    order = dependency_order(graph)
    out = subprocess.run([sys.executable, "-c", _IMPORTER, json.dumps(order),
                          json.dumps({k: sorted(v) for k, v in graph.items()})],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert not report["circles"], "\n".join(report["circles"])
    assert not report["unexpected"], "\n".join(report["unexpected"])
