"""The package's shape, checked: layered stages (import-linter), few top-level modules, no hidden
imports inside functions, no private names reached across modules."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "autosparse"


def _modules() -> list[pathlib.Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _imports(tree: ast.AST) -> list[tuple[ast.AST, str, list[str], bool]]:
    """(node, module, imported names, at module level) for every import in a file."""
    out = []
    top = {id(n) for n in getattr(tree, "body", [])}
    guarded = {id(n) for b in getattr(tree, "body", []) if isinstance(b, ast.If) for n in ast.walk(b)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append((node, node.module, [a.name for a in node.names], id(node) in top or id(node) in guarded))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                out.append((node, alias.name, [], id(node) in top or id(node) in guarded))
    return out


def test_layers_contract_is_kept() -> None:
    importlinter = pytest.importorskip("importlinter")
    from importlinter.cli import lint_imports

    root = PACKAGE.parent
    assert importlinter and lint_imports(config_filename=str(root / "pyproject.toml")) == 0


def test_at_most_ten_top_level_modules() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 10, top


def test_no_function_local_imports_of_autosparse() -> None:
    """Only optional heavy dependencies (transformers, onnx, matplotlib, ...) are imported late."""
    offenders = []
    for path in _modules():
        for node, module, _, at_top in _imports(ast.parse(path.read_text())):
            if not at_top and module.split(".")[0] == "autosparse":
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} import {module}")
    assert offenders == []


def test_no_private_names_cross_module_borders() -> None:
    offenders = []
    for path in _modules():
        for node, module, names, _ in _imports(ast.parse(path.read_text())):
            if module.startswith("autosparse"):
                offenders += [f"{path.relative_to(PACKAGE)}:{node.lineno} {module}.{n}"
                              for n in names if n.startswith("_") and not n.startswith("__")]
    assert offenders == []


def test_mypy_is_clean_on_the_package() -> None:
    mypy_api = pytest.importorskip("mypy.api")
    root = PACKAGE.parent
    out, err, status = mypy_api.run(["--config-file", str(root / "pyproject.toml"), "--cache-dir", "/dev/null",
                                     str(PACKAGE)])
    assert status == 0, out + err
