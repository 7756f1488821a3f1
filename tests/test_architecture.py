"""The import rules of the package table in the README's architecture section, read from the
source: every import counts (module level, inside functions, under TYPE_CHECKING, and
`importlib.import_module("agentmesh...")` with a literal name), so a cycle cannot hide."""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "agentmesh"

# Top to bottom; a package imports only packages on lower rows. Names on one row may not import
# each other. `__init__` is agentmesh/__init__.py (its top-level names are imported lazily).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("__main__",),
    ("cli",),
    ("__init__",),
    ("serve",),
    ("bench",),
    ("mesh",),
    ("eval",),
    ("runtime",),
    ("graph",),
    ("c2c",),
    ("tasks",),
    ("models",),
    ("cache",),
    ("commands", "files", "progress", "transport", "types", "yaml_file"),
    ("units",),
    ("errors",),
)
RANK = {name: len(LAYERS) - i for i, row in enumerate(LAYERS) for name in row}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for file in PACKAGE.rglob("*.py"):
        parts = list(file.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = file
    return out


def _target(name: str, known: dict[str, Path]) -> str | None:
    """The module an imported dotted name lives in (`agentmesh.c2c.fuser.Fuser` -> `agentmesh.c2c.fuser`)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, file: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module, line) for every agentmesh import in `file`."""
    tree = ast.parse(file.read_text(encoding="utf-8"), str(file))
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int]] = []

    def add(name: str, line: int) -> None:
        target = _target(name, known)
        if target is not None and target != module:
            found.append((target, line))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "agentmesh":
                    add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if base.split(".")[0] != "agentmesh":
                continue
            for alias in node.names:
                # `from pkg import submodule` imports the submodule; `from mod import name` the module.
                full = f"{base}.{alias.name}"
                add(full if full in known else base, node.lineno)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and node.args[0].value.startswith("agentmesh")
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            add(node.args[0].value, node.lineno)
    return found


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


@pytest.fixture(scope="module")
def import_graph() -> nx.DiGraph:
    known = modules()
    g = nx.DiGraph()
    for module, file in known.items():
        g.add_node(module)
        for target, line in imports_of(module, file, known):
            g.add_edge(module, target, line=line)
    return g


def test_every_package_has_a_place_in_the_table(import_graph: nx.DiGraph) -> None:
    unplaced = sorted({layer_of(m) for m in import_graph} - set(RANK))
    assert not unplaced, f"add {unplaced} to LAYERS (and to the README's package table)"


def test_no_package_imports_one_above_it(import_graph: nx.DiGraph) -> None:
    upward = []
    for source, target, data in import_graph.edges(data=True):
        a, b = layer_of(source), layer_of(target)
        if a != b and RANK.get(a, 0) <= RANK.get(b, 0):
            upward.append(f"{source.replace('.', '/')}.py:{data['line']} imports {target} ({a} -> {b})")
    assert not upward, "imports against the package table:\n" + "\n".join(sorted(upward))


def test_no_import_cycles_between_files(import_graph: nx.DiGraph) -> None:
    cycles = [" -> ".join([*c, c[0]]) for c in nx.simple_cycles(import_graph)]
    assert not cycles, "import cycles:\n" + "\n".join(sorted(cycles)[:20])


def test_only_cache_hf_imports_transformers_cache_classes() -> None:
    touching = []
    for module, file in modules().items():
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [f"{node.module}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) and node.module else [])
            for name in names:
                if (name.startswith("transformers") and ("cache_utils" in name or name.endswith("Cache"))
                        and module != "agentmesh.cache.hf"):
                    touching.append(f"{module}: {name}")
    assert not touching, f"only agentmesh/cache/hf.py may use transformers' cache classes: {touching}"


def test_the_walk_sees_hidden_imports(tmp_path: Path) -> None:
    # The rules are only as good as the walk: imports inside functions, under TYPE_CHECKING,
    # relative ones and importlib calls all count.
    src = tmp_path / "agentmesh" / "graph"
    src.mkdir(parents=True)
    (src / "__init__.py").write_text("")
    (src / "graph.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from agentmesh.runtime.plan import RunPlan\n"
        "def f():\n    from .validate import check\n"
        "def g():\n    import importlib\n    return importlib.import_module('agentmesh.runtime')\n")
    (src / "validate.py").write_text("import agentmesh.graph.graph\n")
    known = {"agentmesh.graph": src / "__init__.py", "agentmesh.graph.graph": src / "graph.py",
             "agentmesh.graph.validate": src / "validate.py", "agentmesh.runtime": src / "__init__.py",
             "agentmesh.runtime.plan": src / "__init__.py"}
    found = imports_of("agentmesh.graph.graph", src / "graph.py", known)
    assert found == [("agentmesh.runtime.plan", 3), ("agentmesh.graph.validate", 5), ("agentmesh.runtime", 8)]
    assert imports_of("agentmesh.graph.validate", src / "validate.py", known) == [("agentmesh.graph.graph", 1)]
