"""Layers point down: no import cycle among our modules (function-local imports included) or packages, floors
imported only downward, leaves stay leaves, and a backend is imported only when it is used."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import networkx as nx

from modelzoo.cli import COMMANDS
from tests.conftest import REPO

# Imports that are allowed to stay out of the graph: optional dependencies behind a guard or a lazy import.
OPTIONAL = {"cerebras.pytorch", "lm_eval", "peft", "datasets"}


def _package_dirs() -> dict[str, str]:
    """Installed package -> source folder (pyproject's package-dir: `modelzoo.backends` lives in `backends/`)."""
    section = (REPO / "pyproject.toml").read_text().split("[tool.setuptools.package-dir]")[1].split("\n[")[0]
    return dict(re.findall(r'^"([\w.]+)" = "([\w/]+)"$', section, re.MULTILINE))


def _modules() -> dict[str, Path]:
    """Every module of the package by its installed dotted name."""
    folders = {"modelzoo": REPO / "modelzoo", **{k: REPO / v for k, v in _package_dirs().items()}}
    modules = {}
    for name, folder in folders.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([name, *parts])] = path
    return modules


def import_graph(modules: dict[str, Path] | None = None) -> nx.DiGraph:
    """module -> module it imports (anywhere in the file: top level, functions, TYPE_CHECKING blocks), among
    `modules` (default: every module of the package)."""
    modules = modules or _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for target in targets:
                if any(target == o or target.startswith(o + ".") for o in OPTIONAL):
                    continue
                resolved = resolve(target)
                if resolved and resolved != module:
                    graph.add_edge(module, resolved)
    return graph


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 60 and graph.number_of_edges() > 200  # the scan saw the package, not an empty tree
    cycles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


def test_the_graph_sees_function_local_imports(tmp_path: Path) -> None:
    """An import inside a function is an edge too, or a cycle through one would go unseen."""
    (tmp_path / "a.py").write_text("def f():\n    from pkg import b\n")
    (tmp_path / "b.py").write_text("")
    graph = import_graph({"pkg.a": tmp_path / "a.py", "pkg.b": tmp_path / "b.py"})
    assert graph.has_edge("pkg.a", "pkg.b")


# The floors, bottom up, by package unit (`modelzoo.train.loop` counts as `modelzoo.train`): a unit imports only
# units on its own floor or below.
FLOORS: list[set[str]] = [
    {
        "modelzoo", "modelzoo.errors", "modelzoo.exits", "modelzoo.atomic", "modelzoo.finite", "modelzoo.runlock",
        "modelzoo.distributed",
    },
    {"modelzoo.cluster", "modelzoo.models", "modelzoo.sparsity", "modelzoo.data", "modelzoo.checkpoint"},
    {"modelzoo.config", "modelzoo.optim", "modelzoo.flops", "modelzoo.memory", "modelzoo.report"},
    {  # components
        "modelzoo.restore", "modelzoo.backends", "modelzoo.backends.base", "modelzoo.backends.masked_dense",
        "modelzoo.backends.converters", "modelzoo.backends.torch_sparse", "modelzoo.train", "modelzoo.export",
        "modelzoo.inference", "modelzoo.generate", "modelzoo.downstream", "modelzoo.finetune", "modelzoo.prune",
        "modelzoo.experiments",
    },
    {"modelzoo.validate", "modelzoo.init_from", "modelzoo.backends.cerebras"},
    {"modelzoo.tasks", "modelzoo.cli", "modelzoo.__main__"},
]  # fmt: skip


def _unit(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:3] if parts[1:2] == ["backends"] else parts[:2])


def test_packages_point_down() -> None:
    """No cycle among packages (two folders importing each other through different files), and no import from a
    lower floor up to a higher one."""
    graph = import_graph()
    units = nx.DiGraph()
    for a, b in graph.edges:
        if _unit(a) != _unit(b):
            units.add_edge(_unit(a), _unit(b))
    cycles = [sorted(c) for c in nx.strongly_connected_components(units) if len(c) > 1]
    assert not cycles, f"package cycles: {cycles}"
    floor = {unit: i for i, units_on in enumerate(FLOORS) for unit in units_on}
    assert set(units) <= set(floor), f"units on no floor: {set(units) - set(floor)}"
    upward = [(a, b) for a, b in units.edges if floor[a] < floor[b]]
    assert not upward, f"imports from a lower floor up: {upward}"


def test_every_command_is_a_task_module() -> None:
    """`modelzoo.cli` only dispatches: each command names a function of a module in `modelzoo.tasks`."""
    for command, target in COMMANDS.items():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(f"modelzoo.tasks.{module}"), function)), command


def test_leaves_import_nothing_above_them() -> None:
    """Checkpoint files, the model and the config schema sit at the bottom: what they may reach is bounded."""
    graph = import_graph()
    below = {
        "modelzoo.checkpoint": {
            "modelzoo.atomic",
            "modelzoo.distributed",
            "modelzoo.errors",
            "modelzoo.sparsity.masks",
        },
        "modelzoo.models.gpt": {"modelzoo.models.common"},
        "modelzoo.models.llama": {"modelzoo.models.common"},
        "modelzoo.sparsity.masks": set(),
    }
    for module, allowed in below.items():
        assert nx.descendants(graph, module) <= allowed, module
    schema = nx.descendants(graph, "modelzoo.config")
    assert not {m for m in schema if m.startswith(("modelzoo.backends", "modelzoo.tasks.pretrain", "modelzoo.restore"))}


def test_backends_are_imported_only_when_used() -> None:
    code = (
        "import sys, modelzoo.backends, modelzoo.validate, modelzoo.train.loop\n"
        "print(sorted(m for m in sys.modules if m.startswith('modelzoo.backends.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    loaded = ast.literal_eval(out.stdout)  # the printed list of module names
    assert "modelzoo.backends.base" in loaded
    assert not {"modelzoo.backends.cerebras", "modelzoo.backends.torch_sparse"} & set(loaded), loaded
