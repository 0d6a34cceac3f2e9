"""The package's import graph: no cycles, the engine never imports the benchmark code (rock_dist.perf), and the data
packages depend one way, as the data flows (official files -> shards -> batches; docs/architecture.md): the
streaming pipeline (rock_dist.data), the engine and the model never import the synthetic renderers
(rock_dist.synthetic, tooling), the pipeline never imports the shard builder (rock_dist.shardbuild), and the builder
and the renderers take from rock_dist.data only the shard format's shared contract (constants, manifest, npy members).

Imports are read from the source with `ast` (nothing is imported), including the lazy ones inside functions, since
those run too, just later. A `from PACKAGE import NAME` counts as an import of the submodule PACKAGE.NAME when there
is one; a package's own `__init__` is not counted as imported by its submodules (Python runs it first anyway).
"""

from __future__ import annotations

import ast
from pathlib import Path

import rock_dist

PACKAGE_ROOT = Path(rock_dist.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        parts = ["rock_dist", *path.relative_to(PACKAGE_ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the rock_dist modules it imports anywhere in its source."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                graph[name].update(alias.name for alias in node.names if alias.name in modules)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                submodules = {f"{base}.{alias.name}" for alias in node.names} & modules.keys()
                graph[name].update(submodules)
                if len(submodules) < len(node.names) and base in modules:
                    graph[name].add(base)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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
            if len(component) > 1 or v in graph[v]:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_graph_reader_sees_lazy_imports_and_finds_cycles() -> None:
    graph = import_graph()
    assert "rock_dist.engine.step" in graph["rock_dist.engine.trainer"]
    assert "rock_dist.engine.evaluation" in graph["rock_dist.engine.trainer"]  # imported inside a method
    assert "rock_dist.engine.memory" in graph["rock_dist.bench"]  # `from rock_dist.engine import memory`
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"a"}, "b": set()}) == [["a"]]


def test_the_package_has_no_import_cycle() -> None:
    assert find_cycles(import_graph()) == []


# The modules of rock_dist.data that the shard builder writes and the pipeline reads: the builder and the renderers
# may import these, and nothing else of rock_dist.data.
SHARD_CONTRACT = frozenset({"rock_dist.data.constants", "rock_dist.data.manifest", "rock_dist.data.npy_member"})


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(graph: dict[str, set[str]], importers: tuple[str, ...], forbidden: str,
               allowed: frozenset[str] = frozenset()) -> dict[str, list[str]]:
    """module of the `importers` packages -> the modules of package `forbidden` (less `allowed`) that it imports."""
    found = {name: sorted(t for t in targets if in_package(t, forbidden) and t not in allowed)
             for name, targets in graph.items() if any(in_package(name, p) for p in importers)}
    return {name: targets for name, targets in found.items() if targets}


def test_the_layering_check_reports_a_forbidden_import() -> None:
    graph = {"rock_dist.data.pipeline": {"rock_dist.synthetic.rooms", "rock_dist.data.batch"},
             "rock_dist.shardbuild.nyuv2": {"rock_dist.data.constants", "rock_dist.data.transforms"},
             "rock_dist.datasets": {"rock_dist.synthetic"}}
    assert violations(graph, ("rock_dist.data",), "rock_dist.synthetic") == {
        "rock_dist.data.pipeline": ["rock_dist.synthetic.rooms"]}
    assert violations(graph, ("rock_dist.shardbuild",), "rock_dist.data", SHARD_CONTRACT) == {
        "rock_dist.shardbuild.nyuv2": ["rock_dist.data.transforms"]}
    assert violations(graph, ("rock_dist.model",), "rock_dist.synthetic") == {}


def test_the_engine_never_imports_the_benchmarks() -> None:
    assert violations(import_graph(), ("rock_dist.engine",), "rock_dist.perf") == {}


def test_the_training_path_never_imports_the_synthetic_renderers() -> None:
    graph = import_graph()
    assert "rock_dist.synthetic.official_layout" in graph["rock_dist.synthetic.rooms"]  # the package is seen
    assert violations(graph, ("rock_dist.data", "rock_dist.engine", "rock_dist.model"), "rock_dist.synthetic") == {}


def test_the_streaming_pipeline_never_imports_the_shard_builder() -> None:
    graph = import_graph()
    assert "rock_dist.shardbuild.nyuv2" in graph["rock_dist.shards"]  # the package is seen
    assert violations(graph, ("rock_dist.data",), "rock_dist.shardbuild") == {}


def test_the_builder_and_renderers_take_only_the_shard_contract_from_data() -> None:
    graph = import_graph()
    assert "rock_dist.data.manifest" in graph["rock_dist.shardbuild.shard_writer"]  # contract imports are seen
    assert violations(graph, ("rock_dist.shardbuild", "rock_dist.synthetic"), "rock_dist.data", SHARD_CONTRACT) == {}
