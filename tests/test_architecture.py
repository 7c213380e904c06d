"""The layering holds (import-linter's contracts in pyproject.toml) and no module imports itself back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
grimp = pytest.importorskip("grimp", reason="import-linter (and grimp) come with the test extra")

PACKAGES = ("binary", "cli", "data", "deploy", "models", "train")
GROUND = ("console", "errors", "files", "names")


def test_import_linter_contracts_are_kept():
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "broken" in r.stdout and "0 broken" in r.stdout


def test_no_import_cycles_between_modules():
    graph = grimp.build_graph("bitrain", include_external_packages=False)
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if graph.chain_exists(importer=imported, imported=module):
                cycles.append(f"{module} <-> {imported}: {graph.find_shortest_chain(imported, module)}")
    assert not cycles, "\n".join(cycles)


def test_the_top_level_is_the_five_packages_and_the_ground_floor():
    top = {p.stem for p in (ROOT / "bitrain").iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    assert top == {"__init__", "__main__", *PACKAGES, *GROUND}


def test_bitrain_evaluate_is_the_function_whatever_is_imported():
    import importlib
    import pkgutil

    import bitrain

    for info in pkgutil.walk_packages(bitrain.__path__, "bitrain."):
        if info.name != "bitrain.__main__":
            importlib.import_module(info.name)
    from bitrain import evaluate

    assert callable(evaluate) and evaluate.__module__ == "bitrain.train.evaluation"
    assert bitrain.evaluate is evaluate


MAX_FUNCTION_LINES, MAX_MODULE_LINES = 80, 400  # docs/architecture.md: longer is several concepts


def test_no_function_or_module_is_several_concepts_long():
    import ast

    too_long = []
    for path in sorted((ROOT / "bitrain").rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        name = path.relative_to(ROOT).as_posix()
        if len(source.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}:{node.lineno} {node.name}: {lines} lines")
    assert not too_long, "\n".join(too_long)
