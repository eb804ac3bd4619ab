"""Protocol code does no I/O: nothing under protocol/ or providers/ imports trio, httpx or
structlog (conventions.md, rule 1). Checked on the source with ``ast``, so a lazy import
inside a function is caught too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import runestone_proxy

PACKAGE = Path(runestone_proxy.__file__).parent
PURE = ("protocol", "providers")
FORBIDDEN = {"trio", "httpx", "structlog"}
MODULES = sorted(p for sub in PURE for p in (PACKAGE / sub).rglob("*.py"))


def imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.partition(".")[0])
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            roots.add(node.args[0].value.partition(".")[0])
    return roots


def test_there_are_modules_to_check() -> None:
    assert any(p.name == "sse.py" for p in MODULES)
    assert any(p.name == "base.py" for p in MODULES)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_pure_module_does_no_io(path: Path) -> None:
    assert not imported_roots(path) & FORBIDDEN


def test_the_checker_sees_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "import trio\n"
        "from httpx import Client\n"
        "from . import sibling\n"
        "def f():\n"
        "    import structlog.stdlib\n"
        "    importlib.import_module('trio.lowlevel')\n"
    )
    assert imported_roots(module) == FORBIDDEN
