"""Layers point down: no import cycle among our modules (function-local imports included), leaves stay leaves,
and a backend is imported only when it is used."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import networkx as nx

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


def import_graph() -> nx.DiGraph:
    """module -> module it imports (anywhere in the file: top level, functions, TYPE_CHECKING blocks)."""
    modules = _modules()

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


def test_the_graph_sees_function_local_imports() -> None:
    """The CLI imports its commands inside functions: those edges must be in the graph, or a cycle through a
    function-local import would go unseen."""
    graph = import_graph()
    assert graph.has_edge("modelzoo.cli", "modelzoo.train.trainer")
    assert graph.has_edge("modelzoo.cli", "modelzoo.finetune.task")


def test_leaves_import_nothing_above_them() -> None:
    """Checkpoint files, the model and the config schema sit at the bottom: what they may reach is bounded."""
    graph = import_graph()
    below = {
        "modelzoo.train.checkpoint": {"modelzoo.atomic", "modelzoo.errors", "modelzoo.sparsity.masks"},
        "modelzoo.models.gpt": set(),
        "modelzoo.sparsity.masks": set(),
    }
    for module, allowed in below.items():
        assert nx.descendants(graph, module) <= allowed, module
    schema = nx.descendants(graph, "modelzoo.config")
    assert not {m for m in schema if m.startswith(("modelzoo.backends", "modelzoo.train.trainer", "modelzoo.restore"))}


def test_backends_are_imported_only_when_used() -> None:
    code = (
        "import sys, modelzoo.backends, modelzoo.validate, modelzoo.train.loop\n"
        "print(sorted(m for m in sys.modules if m.startswith('modelzoo.backends.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    loaded = ast.literal_eval(out.stdout)  # the printed list of module names
    assert "modelzoo.backends.base" in loaded
    assert not {"modelzoo.backends.cerebras", "modelzoo.backends.torch_sparse"} & set(loaded), loaded
