"""The package's layering: no two subpackages of d4a_batch import each other, no module
circle inside a package, and the named "never" edges of the layer plan (issue 32): survey
does not import sampling, validation does not import pipeline, physics/prior/sampling/quality
never import Ray, quality is numpy-only."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import d4a_batch

ROOT = Path(d4a_batch.__file__).parent


def _imported(node: ast.AST) -> list[str]:
    """The d4a_batch modules an import statement names (``from d4a_batch.x import y`` names
    d4a_batch.x.y too: y may be a module)."""
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("d4a_batch."):
        return [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("d4a_batch.")]
    return []


def _edges() -> dict[tuple[str, str], set[str]]:
    """(importing subpackage, imported subpackage) -> the importing files (every import,
    including those under ``if TYPE_CHECKING`` and inside functions)."""
    edges: dict[tuple[str, str], set[str]] = {}
    for f in ROOT.rglob("*.py"):
        rel = f.relative_to(ROOT).parts
        pkg = rel[0] if len(rel) > 1 else f.stem
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("d4a_batch."):
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("d4a_batch.")]
            for name in names:
                target = name.split(".")[1]
                if target != pkg:
                    edges.setdefault((pkg, target), set()).add(str(f.relative_to(ROOT)))
    return edges


def _module_name(f: Path) -> str:
    rel = f.relative_to(ROOT.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _run_time_imports(tree: ast.Module) -> list[str]:
    """The d4a_batch modules a module imports at run time: at module level and inside
    functions (a function-level import hides a circle, it does not break it), not the
    type-only ones under ``if TYPE_CHECKING``."""
    names: list[str] = []
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            todo += node.orelse
            continue
        names += _imported(node)
        todo += ast.iter_child_nodes(node)
    return names


def _module_graph() -> dict[str, set[str]]:
    """module -> the d4a_batch modules of its own package it imports at run time."""
    files = {_module_name(f): f for f in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, f in files.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        targets = {t for t in _run_time_imports(ast.parse(f.read_text())) if t in files}
        graph[name] = {t for t in targets if t.rpartition(".")[0] == package and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_two_subpackages_import_each_other():
    edges = _edges()
    assert ("pipeline", "survey") in edges  # the check sees real imports
    cycles = {
        (a, b): (sorted(edges[(a, b)]), sorted(edges[(b, a)]))
        for a, b in edges
        if a < b and (b, a) in edges
    }
    assert not cycles, cycles


def test_the_cycle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_circle_inside_a_package():
    """The imports between the modules of each package (d4a_batch's own top-level modules are
    one) form no circle, counting those inside functions: e.g. sampling's algorithms import
    the row helpers and the entry point imports the algorithms, never the other way round
    (issue 32 item 2; before it, dps imported daps and dds inside ``deconvolve``)."""
    graph = _module_graph()
    assert "d4a_batch.sampling.rows" in graph["d4a_batch.sampling.dps"]  # sees real imports
    assert not _cycles(graph), _cycles(graph)


# The sampling algorithms import only the shared modules (their loop's helpers, the data
# step's likelihoods, the summaries), never the entry point; dds is the one algorithm built
# on another: the ancestral loop of dps_sample with its consistency hook.
SAMPLING_SHARED = {"rows", "likelihood"}
SAMPLING_ALGORITHMS = {"dps": set(), "dds": {"dps"}, "daps": set()}


def test_each_sampling_algorithm_imports_only_the_shared_modules():
    graph = _module_graph()
    for algorithm, others in SAMPLING_ALGORITHMS.items():
        name = f"d4a_batch.sampling.{algorithm}"
        inside = {m.rpartition(".")[2] for m in graph[name]}
        assert inside <= SAMPLING_SHARED | others, (name, inside)
    for shared in SAMPLING_SHARED:
        inside = {m.rpartition(".")[2] for m in graph[f"d4a_batch.sampling.{shared}"]}
        assert not inside & (set(SAMPLING_ALGORITHMS) | {"deconvolve"}), (shared, inside)
    assert {"dps", "dds", "daps"} <= {
        m.rpartition(".")[2] for m in graph["d4a_batch.sampling.deconvolve"]
    }


def test_guidance_rules_are_defined_once():
    defined = [
        str(f.relative_to(ROOT))
        for f in ROOT.rglob("*.py")
        for node in ast.walk(ast.parse(f.read_text()))
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "GUIDANCE_RULES" for t in node.targets)
    ]
    assert defined == ["config.py"]


# Edges the layer plan forbids that the code still has, each with its reason. A fix makes
# the test fail until its entry is removed here.
KNOWN_VALIDATION_TO_PIPELINE = {
    # the engine-vs-loop benchmark times the Ray engine itself (run_survey)
    "validation/engine_throughput.py",
}


def test_survey_does_not_import_sampling():
    """Staging's photo-z rule and the flags' types come from ``quality`` (issue 32 item 3),
    the summaries' type is a protocol of ``survey/output.py``: no exception is left."""
    assert ("survey", "quality") in _edges()  # the check sees real imports
    assert _edges().get(("survey", "sampling"), set()) == set()


def test_validation_does_not_import_pipeline():
    assert _edges().get(("validation", "pipeline"), set()) == KNOWN_VALIDATION_TO_PIPELINE


RAY_FREE = ("physics", "prior", "sampling", "quality", "pack_sampler.py")


def _imports(f: Path) -> set[str]:
    """The modules a file imports, every import statement (type-only and in functions too)."""
    tree = ast.parse(f.read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    return imported


def test_the_pure_torch_packages_never_import_ray():
    for name in RAY_FREE:
        files = [ROOT / name] if name.endswith(".py") else sorted((ROOT / name).rglob("*.py"))
        assert files and all(f.exists() for f in files), name
        for f in files:
            imported = _imports(f)
            assert not {m for m in imported if m == "ray" or m.startswith("ray.")}, f


# quality is numpy-only (issue 32 item 3): staging and the sampling stage both call it, so it
# imports neither torch nor Ray nor the packages above it; of d4a_batch only the shared
# config and schema and its own modules
QUALITY_THIRD_PARTY = {"numpy", "scipy", "sep", "astropy"}
QUALITY_OWN = {"d4a_batch.config", "d4a_batch.schema"}


def test_quality_is_numpy_only():
    files = sorted((ROOT / "quality").rglob("*.py"))
    assert len(files) > 4
    for f in files:
        imported = _imports(f)
        ours = {m for m in imported if m.split(".")[0] == "d4a_batch"}
        assert all(m in QUALITY_OWN or m.startswith("d4a_batch.quality") for m in ours), (f, ours)
        others = {m.split(".")[0] for m in imported} - {"d4a_batch"}
        foreign = others - QUALITY_THIRD_PARTY - set(sys.stdlib_module_names)
        assert not foreign, (f, foreign)


MAX_LINES = 400
REASON = "Longer than 400 lines:"


def test_no_module_over_400_lines_without_a_reason():
    """Issue 32: no module over 400 lines without a reason at the top of its docstring."""
    unexplained = []
    for f in sorted(ROOT.rglob("*.py")):
        rel = f.relative_to(ROOT).as_posix()
        text = f.read_text()
        n = len(text.splitlines())
        if n <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if REASON not in doc:
            unexplained.append(f"d4a_batch/{rel} ({n} lines)")
    assert not unexplained, (
        f"over {MAX_LINES} lines without '{REASON}' in the module docstring (split it, or "
        f"say why not): {unexplained}"
    )
