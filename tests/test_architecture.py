"""The house stays layered: the import graph of the project's own modules, read from the source with ``ast``, has no
cycle (in ``monai_diffusion`` and in the fork's ``generative``), and inside ``monai_diffusion`` every import points
down the layers of the architecture guide (LAYERS below), not even a function-local one pointing up.

The graph counts module-level and function-local imports, absolute and relative ones (``from . import x`` included),
and leaves out what an ``if TYPE_CHECKING:`` block imports (that never runs). An import names the most specific
project module it loads: ``from pkg import mod`` is an edge to ``pkg.mod`` when that is a module, otherwise to
``pkg``; ``import pkg.mod.name`` to the longest prefix that is a module. Imports of anything outside the package
(torch, monai, the other package) are not edges.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# package name -> the folder that holds the package folder (what goes on sys.path)
PACKAGES = {"monai_diffusion": REPO, "generative": REPO / "GenerativeModels"}

# monai_diffusion's layers, lowest first: a module may import its own layer (without a cycle) and the layers below.
# A name is the first part of the module path under monai_diffusion (``settings`` covers the package ``settings.*``);
# ``__init__`` is the package ``monai_diffusion`` itself.
LAYERS: list[tuple[str, frozenset[str]]] = [
    ("ground", frozenset({"errors", "fileio", "geometry", "memory"})),
    ("settings", frozenset({"settings"})),
    # conditioning (schedulers, the Conditioner, projections) is what models and the training stages share, and
    # pointcloud (volumes <-> points in physical units) what sampling writes with: both need only the ground floor
    ("data and networks", frozenset({"data", "synthetic", "losses", "models", "checkpoints", "runtime",
                                     "conditioning", "pointcloud"})),
    ("the loop and its parts", frozenset({"engine", "sampling", "pictures", "tracking"})),
    # generate: the sampler that the CLI and evaluation rebuild from a stage-2 checkpoint
    # bundle: a run exported as a MONAI bundle (its inference.json runs pipeline.DiffusionPipeline)
    ("stages and tools", frozenset({"stage1", "stage2", "pipeline", "evaluation", "generate", "bundle"})),
    ("entry points", frozenset({"plan", "cli", "3d_ldm", "__init__", "__main__"})),
]


# ------------------------------------------------------------------------------------------------ the graph builder
def module_files(src_root: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """Every module of ``package`` under ``src_root``: dotted name -> (file, whether it is a package's __init__)."""
    out: dict[str, tuple[Path, bool]] = {}
    for path in sorted((src_root / package).rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(src_root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_package)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """The import statements anywhere in ``tree`` (functions and classes included), less ``if TYPE_CHECKING:`` bodies
    (their ``else:`` branch runs, so it counts)."""
    found: list[ast.Import | ast.ImportFrom] = []
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))
    return sorted(found, key=lambda n: n.lineno)


def _known_prefix(name: str, known: set[str]) -> str | None:
    parts = name.split(".")
    while parts:
        if ".".join(parts) in known:
            return ".".join(parts)
        parts.pop()
    return None


def imported_modules(module: str, is_package: bool, tree: ast.AST, known: set[str]) -> list[tuple[str, int]]:
    """(project module, line) for each import in ``tree`` of ``module`` that loads a module in ``known``."""
    out: list[tuple[str, int]] = []
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            targets = [_known_prefix(alias.name, known) for alias in node.names]
        else:
            if node.level:  # relative: from the module's package, up level - 1 packages
                package = module.split(".") if is_package else module.split(".")[:-1]
                if node.level - 1 > len(package) - 1:
                    raise ValueError(f"{module}, line {node.lineno}: the relative import goes above the top package")
                base = ".".join(package[: len(package) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else _known_prefix(base, known)
                       for alias in node.names]
        out += [(target, node.lineno) for target in targets if target is not None and target != module]
    return out


def import_graph(src_root: Path, package: str) -> tuple[dict[str, dict[str, int]], dict[str, Path]]:
    """The import graph of ``package``: module -> {imported project module: first line that imports it}, and each
    module's file."""
    modules = module_files(src_root, package)
    known = set(modules)
    graph: dict[str, dict[str, int]] = {}
    for name, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges: dict[str, int] = {}
        for target, line in imported_modules(name, is_package, tree, known):
            edges.setdefault(target, line)
        graph[name] = edges
    return graph, {name: path for name, (path, _) in modules.items()}


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The groups of modules that reach each other (Tarjan's algorithm, iterative), each sorted; singletons too."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    groups: list[list[str]] = []
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
                    work.append((child, iter(sorted(graph.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                groups.append(sorted(group))
    return groups


def _shortest_cycle(graph: dict[str, dict[str, int]], start: str, within: set[str]) -> list[str]:
    """The shortest chain start -> ... -> start inside ``within`` (breadth first)."""
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph[node]):
            if child == start:
                chain = [node]
                while chain[-1] != start:
                    chain.append(came_from[chain[-1]])
                return [*reversed(chain), start]
            if child in within and child not in came_from:
                came_from[child] = node
                queue.append(child)
    raise AssertionError(f"{start} is in a strongly connected group but no cycle goes through it")


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """For each group of modules that import each other in a circle, the shortest cycle through each member
    (duplicates dropped), as chains ``[a, b, ..., a]``."""
    cycles: list[list[str]] = []
    seen: set[frozenset[tuple[str, str]]] = set()
    for group in strongly_connected(graph):
        if len(group) == 1:
            continue
        for start in group:
            chain = _shortest_cycle(graph, start, set(group))
            key = frozenset(zip(chain, chain[1:]))
            if key not in seen:
                seen.add(key)
                cycles.append(chain)
    return cycles


def describe_chain(chain: list[str], graph: dict[str, dict[str, int]], files: dict[str, Path], root: Path) -> str:
    """``a -> b -> a`` with the file and line of each import."""
    steps = [f"{a} ({files[a].relative_to(root)}:{graph[a][b]})" for a, b in zip(chain, chain[1:])]
    return " -> ".join([*steps, chain[-1]])


def layer_of(module: str, package: str, layers: list[tuple[str, frozenset[str]]]) -> int | None:
    """The index of the layer of ``module`` (a module of ``package``), or None where the table does not place it."""
    if module != package and not module.startswith(package + "."):
        raise ValueError(f"{module} is not a module of {package}")
    name = module[len(package) + 1:].split(".")[0] if module != package else "__init__"
    return next((i for i, (_, names) in enumerate(layers) if name in names), None)


def unplaced(graph: dict[str, dict[str, int]], package: str, layers: list[tuple[str, frozenset[str]]]) -> list[str]:
    return sorted(m for m in graph if layer_of(m, package, layers) is None)


def upward_imports(graph: dict[str, dict[str, int]], files: dict[str, Path], root: Path, package: str,
                   layers: list[tuple[str, frozenset[str]]]) -> list[str]:
    """One line for each import of a module that stands in a higher layer than the importing one (file paths relative
    to ``root``)."""
    out = []
    for module in sorted(graph):
        low = layer_of(module, package, layers)
        for target, line in sorted(graph[module].items()):
            high = layer_of(target, package, layers)
            if low is not None and high is not None and high > low:
                out.append(f"{files[module].relative_to(root)}:{line}: {module} (layer {low + 1}, {layers[low][0]}) imports "
                           f"{target} (layer {high + 1}, {layers[high][0]})")
    return out


# ------------------------------------------------------------------------------------------- the project's own rules
@pytest.fixture(scope="module", params=sorted(PACKAGES))
def package_graph(request):
    package = request.param
    graph, files = import_graph(PACKAGES[package], package)
    return package, graph, files


def test_the_graph_reads_the_packages(package_graph):
    """The builder found the package's modules and their imports (a builder that finds nothing passes every rule)."""
    package, graph, files = package_graph
    assert len(graph) >= 10 and package in graph, sorted(graph)
    assert sum(len(edges) for edges in graph.values()) >= len(graph) // 2, graph
    assert all(path.is_file() for path in files.values())


def test_no_import_cycle(package_graph):
    package, graph, files = package_graph
    root = PACKAGES[package]
    cycles = [describe_chain(chain, graph, files, root) for chain in find_cycles(graph)]
    assert not cycles, f"import cycles in {package} (break each, e.g. by moving what both need lower):\n" + "\n".join(
        cycles)


def test_every_app_module_has_a_layer():
    graph, _ = import_graph(PACKAGES["monai_diffusion"], "monai_diffusion")
    missing = unplaced(graph, "monai_diffusion", LAYERS)
    assert not missing, (f"modules of monai_diffusion without a layer: {missing}; place each in a layer of LAYERS "
                         f"in tests/{Path(__file__).name}")


def test_app_imports_only_point_down_the_layers():
    graph, files = import_graph(PACKAGES["monai_diffusion"], "monai_diffusion")
    upward = upward_imports(graph, files, PACKAGES["monai_diffusion"], "monai_diffusion", LAYERS)
    assert not upward, "imports that point UP the layers of monai_diffusion (move the shared code down):\n" + "\n".join(
        upward)


# --------------------------------------------------------------------------------- the builder on a known package
def _write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


TOY = {
    "toy/__init__.py": "from .top import run\n",
    "toy/low.py": "import os\n\nfrom typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from toy.top import run\n"
                  "else:\n    from . import base\n",
    "toy/base.py": "import numpy\n",
    "toy/top.py": "from toy import low\nfrom toy.sub import deep as d\n\n\ndef run():\n    from .sub.deep import f\n"
                  "    return f\n",
    "toy/sub/__init__.py": "",
    "toy/sub/deep.py": "from .. import base\nimport toy.sub.leaf.x\n\n\nclass C:\n    def m(self):\n"
                       "        from ..low import thing\n        return thing\n",
    "toy/sub/leaf.py": "from ..sub import deep\n",
    "toy/mid.py": "import toy.low\n\n\ndef late():\n    import toy.top\n    return toy.top\n",
}
TOY_LAYERS = [("low", frozenset({"low", "base"})), ("middle", frozenset({"mid", "sub"})),
              ("top", frozenset({"top", "__init__"}))]


def test_builder_resolves_every_import_form(tmp_path):
    graph, files = import_graph(_write_package(tmp_path, TOY), "toy")
    assert set(files) == {"toy", "toy.low", "toy.base", "toy.top", "toy.sub", "toy.sub.deep", "toy.sub.leaf",
                          "toy.mid"}
    assert graph["toy"] == {"toy.top": 1}  # from .top import run
    assert graph["toy.low"] == {"toy.base": 8}  # the TYPE_CHECKING import is left out, its else branch counts
    assert graph["toy.base"] == {}  # numpy is not a project module
    # from toy import low (a module); from toy.sub import deep; the function-local relative import of the same module
    assert graph["toy.top"] == {"toy.low": 1, "toy.sub.deep": 2}
    # from .. import base; import toy.sub.leaf.x -> its longest module prefix; a method's from ..low import thing
    assert graph["toy.sub.deep"] == {"toy.base": 1, "toy.sub.leaf": 2, "toy.low": 7}
    assert graph["toy.sub.leaf"] == {"toy.sub.deep": 1}
    assert graph["toy.mid"] == {"toy.low": 1, "toy.top": 5}  # the function-local import counts


def test_builder_finds_a_known_cycle_and_names_its_lines(tmp_path):
    graph, files = import_graph(_write_package(tmp_path, TOY), "toy")
    assert find_cycles(graph) == [["toy.sub.deep", "toy.sub.leaf", "toy.sub.deep"]]  # one circle, named once
    text = describe_chain(find_cycles(graph)[0], graph, files, tmp_path)
    assert text == "toy.sub.deep (toy/sub/deep.py:2) -> toy.sub.leaf (toy/sub/leaf.py:1) -> toy.sub.deep"
    # top imports low; once low imports mid inside a function and mid imports top, the three make a circle
    (tmp_path / "toy" / "low.py").write_text("def f():\n    from . import mid\n    return mid\n")
    (tmp_path / "toy" / "mid.py").write_text("from toy import top\n")
    graph, files = import_graph(tmp_path, "toy")
    chains = find_cycles(graph)
    assert ["toy.low", "toy.mid", "toy.top", "toy.low"] in chains, chains


def test_builder_ignores_type_checking_imports_for_cycles(tmp_path):
    files = {"tc/__init__.py": "", "tc/a.py": "from tc import b\n",
             "tc/b.py": "import typing\n\nif typing.TYPE_CHECKING:\n    from tc import a\n"}
    graph, _ = import_graph(_write_package(tmp_path, files), "tc")
    assert graph["tc.b"] == {} and find_cycles(graph) == []
    (tmp_path / "tc" / "b.py").write_text("def f():\n    from tc import a\n    return a\n")
    graph, _ = import_graph(tmp_path, "tc")
    assert find_cycles(graph) == [["tc.a", "tc.b", "tc.a"]]  # the same import, run inside a function: a cycle


def test_an_upward_import_and_an_unplaced_module_are_reported(tmp_path):
    graph, files = import_graph(_write_package(tmp_path, TOY), "toy")
    assert unplaced(graph, "toy", TOY_LAYERS) == []
    upward = upward_imports(graph, files, tmp_path, "toy", TOY_LAYERS)
    # low (layer 1) never imports up: its upward import sits under TYPE_CHECKING; mid's function-local one counts
    assert upward == [
        "toy/mid.py:5: toy.mid (layer 2, middle) imports toy.top (layer 3, top)",
    ]
    (tmp_path / "toy" / "base.py").write_text("def f():\n    import toy.sub.deep\n")
    (tmp_path / "toy" / "new.py").write_text("")
    graph, files = import_graph(tmp_path, "toy")
    assert "toy/base.py:2: toy.base (layer 1, low) imports toy.sub.deep (layer 2, middle)" in upward_imports(
        graph, files, tmp_path, "toy", TOY_LAYERS)
    assert unplaced(graph, "toy", TOY_LAYERS) == ["toy.new"]


def test_a_relative_import_above_the_top_package_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"toy\.low, line 1: the relative import goes above the top package"):
        import_graph(_write_package(tmp_path, {"toy/__init__.py": "", "toy/low.py": "from .. import x\n"}), "toy")
