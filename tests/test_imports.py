"""The house, measured: imports between llmprune's modules run one way, from the CLI down to the small types
(STYLE.md: "Imports point one way (CLI -> API -> rooms -> small types)").

Every `llmprune/**/*.py` is parsed (not imported); its imports of llmprune modules are collected at module level
and inside functions alike (a cycle hidden in a function is still a cycle), relative ones resolved. `from a.b
import c` counts as an import of `a.b.c` when that is a module, else of `a.b`. Python also runs the parent
packages' `__init__` of whatever it imports; those implicit imports are not counted (the top package's
`__init__` is the API and runs first in any case).

(a) no import cycle between modules; (b) no module imports a room above its own. The rooms are listed below,
lowest first, each with the modules it holds (a name holds its submodules too, but "llmprune" only the package's
`__init__`; the longest name that matches decides); a module may import its own room and the rooms below it. A module that no room names fails the test:
add it to the room it belongs to (`ROOMS`), which docs/ARCHITECTURE.md describes."""

import ast
import warnings
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llmprune"

ROOMS: list[tuple[str, list[str]]] = [  # lowest first
    ("ground: errors, registries, a part's typed options, versions, progress bars, atomic outputs, the BOS policy",
     ["llmprune.errors", "llmprune.registry", "llmprune.options", "llmprune.versions", "llmprune.progress",
      "llmprune.outputs", "llmprune.bos"]),
    ("architecture discovery: blocks, linear layers, (out, in) views; next, coupled groups",
     ["llmprune.models.arch"]),
    ("small types: statistics, masks and patterns",
     ["llmprune.stats", "llmprune.masks"]),
    ("math: scorers, allocation, targets, block scorers, next-token losses",
     ["llmprune.scorers", "llmprune.allocation", "llmprune.targets", "llmprune.blocks.base",
      "llmprune.blocks.influence", "llmprune.blocks.kl", "llmprune.blocks.perplexity", "llmprune.blocks.select",
      "llmprune.logits"]),
    ("configs: typed, frozen, self-validating",
     ["llmprune.config", "llmprune.blocks.config"]),
    ("plumbing: calibration data, capture, hooks, the sequential block runner, block removal",
     ["llmprune.calibration", "llmprune.blocks.states", "llmprune.blocks.removal"]),
    ("models: loading (Hub, folder, GGUF and its cache) and saving",
     ["llmprune.models", "llmprune.gguf_cache"]),
    ("results: the job record, JSON, tables, plots",
     ["llmprune.record", "llmprune.reporting", "llmprune.blocks.plot"]),
    ("evaluation: perplexity, zero-shot, sparsity and compression accounting",
     ["llmprune.evaluation"]),
    ("export and acceleration: card, Hub push, provenance; 2:4 runtime kernels",
     ["llmprune.export", "llmprune.accelerate"]),
    ("engine: prune() and prune_blocks()",
     ["llmprune.pruner", "llmprune.engine", "llmprune.blocks", "llmprune.blocks.prune"]),
    ("pipeline: whole jobs, recipes, paper tables",
     ["llmprune.pipeline", "llmprune.recipe", "llmprune.reproduce"]),
    ("API: the package's own names",
     ["llmprune"]),
    ("CLI",
     ["llmprune.cli", "llmprune.__main__"]),
]

# Cycles and upward imports tolerated for now (none: the engine's branch moved `Pattern` to the masks room and
# `LayerStats` to the statistics room).
PENDING: set[tuple[str, str]] = set()


def modules() -> dict[str, tuple[Path, bool]]:
    """{dotted name: (file, is a package __init__)} of every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if package else parts)] = (path, package)
    return out


def import_graph(missing: list[str] | None = None) -> dict[str, dict[str, int]]:
    """{module: {imported llmprune module: first line}}, module-level and function-level imports alike.
    `missing` collects the imports of llmprune modules that do not exist (e.g. a relative import one level off)."""
    mods = modules()
    graph: dict[str, dict[str, int]] = {}
    for name, (path, package) in mods.items():
        here = name.split(".") if package else name.split(".")[:-1]  # the package relative imports start from
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [(a.name, True) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[: len(here) - (node.level - 1)]
                    assert len(base) == len(here) - (node.level - 1), f"{path}:{node.lineno}: beyond the package"
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [(f"{mod}.{a.name}", True) if f"{mod}.{a.name}" in mods else (mod, False)
                           for a in node.names]
            for t, _ in targets:
                if t == "llmprune" or t.startswith("llmprune."):
                    if t not in mods and missing is not None:
                        missing.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {t}")
                    while t not in mods:  # what Python would look in: the nearest existing package
                        t = t.rpartition(".")[0]
                    if t != name:
                        edges.setdefault(t, node.lineno)
        graph[name] = edges
    return graph


def room_of(module: str) -> int | None:
    best, found = -1, None
    for i, (_, names) in enumerate(ROOMS):
        for n in names:
            if (module == n or (n != "llmprune" and module.startswith(n + "."))) and len(n) > best:
                best, found = len(n), i
    return found


def test_every_module_has_a_room():
    missing = sorted(m for m in modules() if room_of(m) is None)
    assert not missing, (
        f"modules in no room: {', '.join(missing)}. Add each to the room it belongs to in tests/test_imports.py "
        "ROOMS (lowest first; a module may import only its own room and those below) and to the rooms of "
        "docs/ARCHITECTURE.md")


def test_every_import_names_a_module_that_exists():
    missing: list[str] = []
    import_graph(missing)
    assert not missing, "imports of llmprune modules that do not exist:\n" + "\n".join(missing)


def test_no_import_cycle_between_modules():
    graph = import_graph()
    deps = {m: {t for t in edges if (m, t) not in PENDING} for m, edges in graph.items()}
    try:
        list(TopologicalSorter(deps).static_order())
    except CycleError as e:
        cycle = e.args[1]
        where = [f"{a} -> {b} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
        raise AssertionError("import cycle: " + "; ".join(where)) from None


def test_no_import_from_a_lower_room_back_up():
    graph = import_graph()
    gone = sorted(f"{a} -> {b}" for a, b in PENDING if b not in graph.get(a, {}))
    if gone:
        warnings.warn(f"no longer imported, drop from PENDING in tests/test_imports.py: {', '.join(gone)}")
    up = []
    for m, edges in sorted(graph.items()):
        for t, line in sorted(edges.items()):
            if (m, t) in PENDING:
                continue
            a, b = room_of(m), room_of(t)
            if a is not None and b is not None and b > a:
                hint = (": import from llmprune.models.arch, which the package re-exports (the package's __init__ "
                        "loads models.load and models.save too)" if t == "llmprune.models" else "")
                up.append(f"{m} (room {ROOMS[a][0].split(':')[0]}) imports {t} (room {ROOMS[b][0].split(':')[0]}) "
                          f"at line {line}{hint}")
    assert not up, "imports from a lower room back up:\n" + "\n".join(up)


def test_the_walker_sees_every_kind_of_import():
    """The graph is read right: relative imports at module and function level, `from . import module`, absolute
    imports, a name imported from a package (an edge to the package), and nothing from outside."""
    graph = import_graph()
    assert graph["llmprune.models.save"]["llmprune.models.load"]  # from .load import ...
    assert "llmprune.outputs" in graph["llmprune.models.save"]  # from .. import outputs
    assert "llmprune.gguf_cache" in graph["llmprune.models.load"]  # a function-level `from .. import gguf_cache`
    assert "llmprune.scorers" in graph["llmprune.config"]  # function-level, from a package's __init__
    assert "llmprune.cli" in graph["llmprune.__main__"]
    assert all(t.startswith("llmprune") for edges in graph.values() for t in edges)
    low = [m for m in graph if room_of(m) is not None and room_of(m) < room_of("llmprune.models.load")]
    assert "llmprune.calibration.runner" in low and "llmprune.models.arch" in low
    assert {"llmprune", "llmprune.models", "llmprune.models.load", "llmprune.models.save"}.isdisjoint(
        t for m in low for t in graph[m])  # the low rooms never load or save models
