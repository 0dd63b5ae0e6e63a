"""The package's import layering, read from the source with ``ast`` (nothing is imported).

Layers (a package imports only lower layers, plus the same-layer pairs in ``SAME_LAYER``):

    0  rlhf_jax (the __init__), rlhf_jax.config, rlhf_jax.provenance, rlhf_jax.devices (the devices programs are built for)
    1  rlhf_jax.losses (imports no other rlhf_jax package), rlhf_jax.models, rlhf_jax.data
    2  rlhf_jax.generation, rlhf_jax.tasks
    3  rlhf_jax.training
    4  rlhf_jax.rl
    5  rlhf_jax.evaluation (shared evaluation and plots), rlhf_jax.trainers (the trainers' table)
    6  rlhf_jax.sweeps, rlhf_jax.pipeline, rlhf_jax.cli, rlhf_jax.train_command
    7  rlhf_jax.compare (studies built from sweeps and the pipeline), rlhf_jax.plan (compiled plans of runs and sweeps)

Three checks over every ``.py`` file of rlhf_jax/, each parametrised by package (``-k data``):

* no import cycle between rlhf_jax modules (imports in functions count as edges; importing
  ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``, so those are edges too, except the
  importer's own enclosing packages, which are already initialising);
* every import (module-level or not) keeps to the layer table;
* no rlhf_jax import inside a function or method (nor ``importlib.import_module("rlhf_jax...")`` /
  ``__import__("rlhf_jax...")`` there): dependencies are visible at the top of each module.
  Function-level imports of heavy optional third-party packages (transformers, torch,
  matplotlib, pyarrow, trl, ...) are fine and not checked.

Test ids name the unit (``init`` is rlhf_jax/__init__.py), so a subset runs with e.g.
``pytest tests/test_layering.py -k "data or models or generation or tasks or losses"`` while
other packages are still being brought in line.
"""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "rlhf_jax"

# unit -> layer. A module belongs to the longest unit that prefixes its name. Units that do not
# exist yet (evaluation, sweeps) are placed so that they are checked as soon as they appear.
LAYERS: dict[str, int] = {
    "rlhf_jax": 0,
    "rlhf_jax.config": 0,
    "rlhf_jax.errors": 0,
    "rlhf_jax.provenance": 0,
    "rlhf_jax.devices": 0,
    "rlhf_jax.losses": 1,
    "rlhf_jax.models": 1,
    "rlhf_jax.data": 1,
    "rlhf_jax.generation": 2,
    "rlhf_jax.tasks": 2,
    "rlhf_jax.training": 3,
    "rlhf_jax.rl": 4,
    "rlhf_jax.evaluation": 5,
    "rlhf_jax.trainers": 5,
    "rlhf_jax.sweeps": 6,
    "rlhf_jax.pipeline": 6,
    "rlhf_jax.train_command": 6,
    "rlhf_jax.cli": 6,
    "rlhf_jax.overopt": 6,
    "rlhf_jax.plan": 7,
    "rlhf_jax.compare": 7,
}
# (importer, imported) pairs allowed inside one layer; any other same-layer import is a violation.
SAME_LAYER: frozenset[tuple[str, str]] = frozenset({
    ("rlhf_jax.provenance", "rlhf_jax.config"),
    ("rlhf_jax.config", "rlhf_jax.errors"),
    ("rlhf_jax.tasks", "rlhf_jax.generation"),
})
# units that import no other rlhf_jax unit at all, whatever its layer
ISOLATED: frozenset[str] = frozenset({"rlhf_jax.losses"})


@dataclasses.dataclass(frozen=True)
class Import:
    module: str          # importing module, e.g. "rlhf_jax.data.sources"
    path: str            # its file, relative to the repository root
    line: int
    text: str            # the import statement as written
    targets: tuple[str, ...]  # rlhf_jax modules it names (most specific existing module)
    function: str | None  # enclosing function/method, None at module level
    type_checking: bool  # under `if TYPE_CHECKING:` (no runtime edge)

    def where(self) -> str:
        inside = f" (inside {self.function})" if self.function else ""
        return f"{self.path}:{self.line}: `{self.text}`{inside}"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve_relative(module: str, package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _literal_import_call(node: ast.Call) -> str | None:
    """`importlib.import_module("rlhf_jax.x")` / `import_module(...)` / `__import__(...)` -> name."""
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if name in ("import_module", "__import__") and node.args:
        arg = node.args[0]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return arg.value
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def parse_imports(sources: dict[str, tuple[str, str, bool]]) -> list[Import]:
    """All rlhf_jax imports of ``sources`` = ``{module: (path, source text, is_package)}``."""
    modules = set(sources)

    def most_specific(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    out: list[Import] = []
    for module, (path, text, package) in sources.items():
        tree = ast.parse(text, filename=path)

        def add(node, names: list[str], function, tc):
            targets = tuple(dict.fromkeys(t for t in (most_specific(n) for n in names) if t))
            if targets:
                seg = ast.get_source_segment(text, node) or ast.dump(node)
                out.append(Import(module, path, node.lineno, " ".join(seg.split()), targets, function, tc))

        def visit(node, function: str | None, tc: bool):
            for child in ast.iter_child_nodes(node):
                fn, child_tc = function, tc
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    label = getattr(child, "name", "<lambda>")
                    fn = f"{function}.{label}" if function else label
                if isinstance(child, ast.Import):
                    add(child, [a.name for a in child.names if a.name.split(".")[0] == PACKAGE], fn, tc)
                elif isinstance(child, ast.ImportFrom):
                    base = (_resolve_relative(module, package, child.level, child.module)
                            if child.level else child.module or "")
                    if base.split(".")[0] == PACKAGE:
                        # `from a.b import c`: c is the module a.b.c if there is one, else a name in a.b
                        add(child, [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                                    for a in child.names], fn, tc)
                elif isinstance(child, ast.Call):
                    name = _literal_import_call(child)
                    if name and name.split(".")[0] == PACKAGE:
                        add(child, [name], fn, tc)
                if isinstance(child, ast.If) and _is_type_checking(child.test):
                    for stmt in child.body:
                        visit(ast.Module(body=[stmt], type_ignores=[]), fn, True)
                    for stmt in child.orelse:
                        visit(ast.Module(body=[stmt], type_ignores=[]), fn, tc)
                    continue
                visit(child, fn, child_tc)

        visit(tree, None, False)
    return out


def load_package(root: Path = ROOT) -> dict[str, tuple[str, str, bool]]:
    files = sorted((root / PACKAGE).rglob("*.py"))
    return {module_name(p, root): (str(p.relative_to(root)), p.read_text(encoding="utf-8"), is_package(p))
            for p in files}


def unit_of(module: str) -> str | None:
    """The LAYERS unit holding ``module`` (the bare package name is only ``rlhf_jax/__init__``)."""
    name = module
    while name != PACKAGE and name:
        if name in LAYERS:
            return name
        name = name.rpartition(".")[0]
    return PACKAGE if module == PACKAGE else None


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(imports: list[Import]) -> dict[str, dict[str, Import]]:
    """``{importer: {imported: first Import making that edge}}``, runtime edges only."""
    graph: dict[str, dict[str, Import]] = {}
    for imp in imports:
        if imp.type_checking:
            continue
        own = set(_ancestors(imp.module)) | {imp.module}
        for target in imp.targets:
            # importing a.b.c initialises a and a.b first (unless the importer is inside them)
            for dst in [p for p in _ancestors(target) if p not in own] + [target]:
                if dst != imp.module:
                    graph.setdefault(imp.module, {}).setdefault(dst, imp)
    return graph


def find_cycles(graph: dict[str, dict[str, Import]]) -> list[list[Import]]:
    """One cycle (as its list of edges) for each strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan; the graph has a few hundred nodes at most
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, {})):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)

    cycles = []
    for comp in sccs:
        members, start = set(comp), comp[0]
        # shortest path start -> ... -> start inside the component (BFS)
        prev: dict[str, str] = {}
        frontier, seen, end = [start], {start}, None
        while frontier and end is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph.get(v, {})):
                    if w == start:
                        end = v
                        break
                    if w in members and w not in seen:
                        seen.add(w)
                        prev[w] = v
                        nxt.append(w)
                if end is not None:
                    break
            frontier = nxt
        path = [end]
        while path[-1] != start:
            path.append(prev[path[-1]])
        path.reverse()  # start, ..., end
        cycles.append([graph[a][b] for a, b in zip(path, path[1:] + [start])])
    return cycles


def layer_violations(imports: list[Import]) -> list[str]:
    out = []
    for imp in imports:
        src = unit_of(imp.module)
        for target in imp.targets:
            dst = unit_of(target)
            if src is None or dst is None:
                missing = imp.module if src is None else target
                out.append(f"{imp.where()}: {missing} is not placed in LAYERS (tests/test_layering.py)")
                continue
            if src == dst:
                continue
            if src in ISOLATED:
                out.append(f"{imp.where()}: {src} imports no other rlhf_jax package (imports {dst})")
            elif LAYERS[dst] > LAYERS[src]:
                out.append(f"{imp.where()}: {src} (layer {LAYERS[src]}) imports the higher layer "
                           f"{dst} (layer {LAYERS[dst]})")
            elif LAYERS[dst] == LAYERS[src] and (src, dst) not in SAME_LAYER:
                out.append(f"{imp.where()}: {src} imports {dst}, a package of the same layer "
                           f"{LAYERS[src]} not listed in SAME_LAYER")
    return out


def function_level_imports(imports: list[Import]) -> list[str]:
    return [f"{imp.where()}: rlhf_jax import inside a function; move it to the top of the module"
            for imp in imports if imp.function is not None]


# --- the checks over the real package, one test per unit --------------------------------------

_SOURCES = load_package()
_IMPORTS = parse_imports(_SOURCES)
UNITS = sorted({u for u in (unit_of(m) for m in _SOURCES) if u} | set(LAYERS))


def _short(unit: str) -> str:
    return "init" if unit == PACKAGE else unit[len(PACKAGE) + 1:]


def _in_unit(module: str, unit: str) -> bool:
    return unit_of(module) == unit


def _fail(lines: list[str], what: str) -> None:
    if lines:
        pytest.fail(f"{len(lines)} {what}:\n" + "\n".join(lines), pytrace=False)


@pytest.mark.parametrize("unit", UNITS, ids=[_short(u) for u in UNITS])
def test_no_import_cycles(unit):
    lines = []
    for cycle in find_cycles(import_graph(_IMPORTS)):
        if any(_in_unit(e.module, unit) for e in cycle):
            chain = " -> ".join([e.module for e in cycle] + [cycle[0].module])
            lines.append(f"cycle {chain}:\n" + "\n".join(f"    {e.where()}" for e in cycle))
    _fail(lines, "import cycle(s)")


@pytest.mark.parametrize("unit", UNITS, ids=[_short(u) for u in UNITS])
def test_layer_contract(unit):
    _fail(layer_violations([i for i in _IMPORTS if _in_unit(i.module, unit)]), "layering violation(s)")


@pytest.mark.parametrize("unit", UNITS, ids=[_short(u) for u in UNITS])
def test_no_rlhf_jax_imports_inside_functions(unit):
    _fail(function_level_imports([i for i in _IMPORTS if _in_unit(i.module, unit)]),
          "function-level import(s)")


def test_every_module_is_placed_in_a_layer():
    assert _SOURCES, "no rlhf_jax sources found"
    _fail([f"{path}: module {m} is in no unit of LAYERS" for m, (path, _, _) in _SOURCES.items()
           if unit_of(m) is None], "unplaced module(s)")


# --- the checker itself, on small made-up packages -----------------------------------------------

def _fake(**modules: str) -> dict[str, tuple[str, str, bool]]:
    """``_fake(**{"rlhf_jax.data": src})``; a name whose source starts with "#pkg" is a package."""
    return {m: (m.replace(".", "/") + ("/__init__.py" if s.startswith("#pkg") else ".py"), s,
                s.startswith("#pkg")) for m, s in modules.items()}


def test_checker_resolves_absolute_relative_and_from_imports():
    src = _fake(**{
        "rlhf_jax": "#pkg\n",
        "rlhf_jax.data": "#pkg\nfrom rlhf_jax.data.sources import open_source\n",
        "rlhf_jax.data.sources": "from . import errors\nfrom .errors import DataError\n",
        "rlhf_jax.data.errors": "",
        "rlhf_jax.models": "#pkg\nimport rlhf_jax.data.errors\nfrom rlhf_jax import data\n",
    })
    got = {(i.module, i.line): i.targets for i in parse_imports(src)}
    assert got == {
        ("rlhf_jax.data", 2): ("rlhf_jax.data.sources",),
        ("rlhf_jax.data.sources", 1): ("rlhf_jax.data.errors",),
        ("rlhf_jax.data.sources", 2): ("rlhf_jax.data.errors",),
        ("rlhf_jax.models", 2): ("rlhf_jax.data.errors",),
        ("rlhf_jax.models", 3): ("rlhf_jax.data",),
    }
    # models -> data.errors also runs data/__init__; sources -> errors does not re-enter data/__init__
    graph = import_graph(parse_imports(src))
    assert set(graph["rlhf_jax.models"]) == {"rlhf_jax.data", "rlhf_jax.data.errors"}
    assert set(graph["rlhf_jax.data.sources"]) == {"rlhf_jax.data.errors"}


def test_checker_finds_a_cycle_through_a_function_level_import():
    src = _fake(**{
        "rlhf_jax.data": "#pkg\n",
        "rlhf_jax.data.sources": "def f():\n    from rlhf_jax.data.tfds_io import TfdsSource\n",
        "rlhf_jax.data.tfds_io": "from rlhf_jax.data.sources import RecordSource\n",
    })
    imports = parse_imports(src)
    (cycle,) = find_cycles(import_graph(imports))
    assert [e.module for e in cycle] == ["rlhf_jax.data.sources", "rlhf_jax.data.tfds_io"]
    assert cycle[0].where() == ("rlhf_jax/data/sources.py:2: `from rlhf_jax.data.tfds_io import "
                                "TfdsSource` (inside f)")
    (msg,) = function_level_imports(imports)
    assert msg.startswith("rlhf_jax/data/sources.py:2:")


def test_checker_finds_a_cycle_through_a_package_init():
    src = _fake(**{
        "rlhf_jax.generation": "#pkg\nfrom rlhf_jax.generation.engine import generate\n",
        "rlhf_jax.generation.engine": "from rlhf_jax.models import CausalLM\n",
        "rlhf_jax.generation.sampling": "",
        "rlhf_jax.models": "#pkg\nfrom rlhf_jax.generation.sampling import sample\n",
    })
    (cycle,) = find_cycles(import_graph(parse_imports(src)))
    assert {e.module for e in cycle} == {"rlhf_jax.generation", "rlhf_jax.generation.engine",
                                         "rlhf_jax.models"}


def test_checker_layer_rules():
    src = _fake(**{
        "rlhf_jax.losses": "#pkg\nfrom rlhf_jax.config import to_dict\n",
        "rlhf_jax.config": "",
        "rlhf_jax.data": "#pkg\nfrom rlhf_jax.models import ModelConfig\n",
        "rlhf_jax.models": "#pkg\nimport rlhf_jax.training\n",
        "rlhf_jax.training": "#pkg\nimport numpy\nfrom rlhf_jax.models import CausalLM\n",
        "rlhf_jax.tasks": "#pkg\nfrom rlhf_jax.generation import generate\n",
        "rlhf_jax.generation": "#pkg\nfrom rlhf_jax.tasks import get_task\n",
        "rlhf_jax.extra": "from rlhf_jax.data import DataConfig\n",
        "rlhf_jax.cli": "def main():\n    import importlib\n    importlib.import_module('rlhf_jax.rl')\n",
        "rlhf_jax.rl": "#pkg\nif TYPE_CHECKING:\n    from rlhf_jax.cli import main\n",
    })
    imports = parse_imports(src)
    found = {line.split(":")[0] for line in layer_violations(imports)}
    assert found == {"rlhf_jax/losses/__init__.py", "rlhf_jax/data/__init__.py",
                     "rlhf_jax/models/__init__.py", "rlhf_jax/generation/__init__.py",
                     "rlhf_jax/extra.py", "rlhf_jax/rl/__init__.py"}
    assert [m.split(":")[0] for m in function_level_imports(imports)] == ["rlhf_jax/cli.py"]
    # a TYPE_CHECKING import is checked for layering but is no runtime edge
    assert "rlhf_jax.rl" not in import_graph(imports)
