"""The import rules, checked on the source with ``ast`` (not grep), so that an import inside
a function or under ``if TYPE_CHECKING:`` counts as much as one at the top.

1. **Arrows point one way** (design.md, "Layers"): ``server -> api -> gateway -> providers ->
   protocol``. A module imports its own layer or a lower one, never a higher one; the
   leaves (``config``, ``errors``, ``logs``, ``telemetry``, ``metrics``, the package's
   ``__init__``) import no layer at all; ``__main__`` is top level, like ``server``. Every
   module must be in the map: a new top-level module fails until it is given a layer. There
   is no exceptions list.
2. **Protocol code does no I/O** (conventions.md, rule 1): nothing under ``protocol/`` or
   ``providers/`` imports trio, httpx or structlog.

Every import form counts: ``import runestone_proxy.x.y``, ``from runestone_proxy.x import
y`` (``y`` a module or a name in ``x``), relative ``from . import y`` and ``from ..x import
y``, and ``importlib.import_module("...")`` with a literal name.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import runestone_proxy

PACKAGE = Path(runestone_proxy.__file__).parent
NAME = "runestone_proxy"
MODULES = sorted(PACKAGE.rglob("*.py"))

#: The layers, low to high, by the package's first component below ``runestone_proxy``.
LAYERS = {
    "protocol": 1,
    "providers": 2,
    "gateway": 3,
    "api": 4,
    "server": 5,
    "__main__": 5,
    "cli_keys": 5,  # subcommands of __main__
    "cli_usage": 5,
}
#: Leaves: they may import each other, and no layer.
LEAVES = frozenset({"__init__", "config", "errors", "logs", "telemetry", "metrics"})
LAYER_NAMES = {0: "a leaf", 1: "protocol", 2: "providers", 3: "gateway", 4: "api", 5: "server"}

PURE = ("protocol", "providers")
FORBIDDEN = {"trio", "httpx", "structlog"}


def module_of(path: Path, root: Path) -> tuple[str, str]:
    """``(module, package)`` dotted names of the file ``path`` in the package at ``root``."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def is_module(dotted: str, root: Path) -> bool:
    where = root.parent.joinpath(*dotted.split("."))
    return where.with_suffix(".py").is_file() or (where / "__init__.py").is_file()


def _import_module_name(node: ast.Call) -> str | None:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    if name == "import_module" and node.args:
        arg = node.args[0]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return arg.value
    return None


def imports(path: Path, root: Path) -> Iterator[tuple[int, str, bool]]:
    """``(line, dotted name, relative)`` for every import in ``path``, relative ones resolved
    against its package; ``from x import y`` names ``x.y`` where that is a module, else ``x``."""
    _, package = module_of(path, root)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, False
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield node.lineno, sub if is_module(sub, root) else base, node.level > 0
        elif isinstance(node, ast.Call) and (name := _import_module_name(node)):
            yield node.lineno, name, False


def layer_of(dotted: str) -> int | None:
    """The layer of a module of the package (``runestone_proxy[.top[...]]``); None: unmapped."""
    top = dotted.split(".")[1] if "." in dotted else "__init__"
    if top in LAYERS:
        return LAYERS[top]
    return 0 if top in LEAVES else None


def violations(path: Path, root: Path = PACKAGE, name: str = NAME) -> list[str]:
    """Every import in ``path`` against the layer order, as ``file:line: what``."""
    module, _ = module_of(path, root)
    where = path.relative_to(root.parent)
    own = layer_of(module)
    if own is None:
        top = module.split(".")[1]
        return [f"{where}:1: module {top!r} has no layer: add it to LAYERS or LEAVES"]
    found: list[str] = []
    seen: set[tuple[int, str]] = set()
    for line, target, _ in imports(path, root):
        if target != name and not target.startswith(name + "."):
            continue
        if (line, target) in seen:  # ``from x import a, b``: one finding per line and module
            continue
        seen.add((line, target))
        theirs = layer_of(target)
        if theirs is None:
            found.append(f"{where}:{line}: imports {target}, which has no layer")
        elif own == 0 and theirs != 0:
            found.append(
                f"{where}:{line}: {module} is a leaf but imports {target} "
                f"({LAYER_NAMES[theirs]}); leaves import no layer"
            )
        elif theirs > own:
            found.append(
                f"{where}:{line}: {module} ({LAYER_NAMES[own]}, layer {own}) imports "
                f"{target} ({LAYER_NAMES[theirs]}, layer {theirs}); arrows point down only"
            )
    return found


def imported_roots(path: Path, root: Path = PACKAGE) -> set[str]:
    """The top-level names of the absolute imports in ``path`` (third-party and stdlib)."""
    return {target.partition(".")[0] for _, target, relative in imports(path, root) if not relative}


# --- the package ------------------------------------------------------------------------------


def test_there_are_modules_to_check() -> None:
    assert len(MODULES) > 50
    for top in ("protocol", "providers", "gateway", "server", "config"):
        assert (PACKAGE / top / "__init__.py").is_file()
    assert any(p.name == "sse.py" for p in MODULES)
    assert any(p.name == "base.py" for p in MODULES)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layer_order(path: Path) -> None:
    found = violations(path)
    assert not found, "imports against the layer order:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "path",
    [p for p in MODULES if p.relative_to(PACKAGE).parts[0] in PURE],
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_pure_module_does_no_io(path: Path) -> None:
    assert not imported_roots(path) & FORBIDDEN


# --- the checker itself -----------------------------------------------------------------------


def write(root: Path, relative: str, text: str = "") -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def fake_package(tmp_path: Path) -> Path:
    """A package with the real one's name and shape, for the checker to read."""
    root = tmp_path / NAME
    for module in (
        "__init__.py",
        "errors.py",
        "config/__init__.py",
        "config/tree.py",
        "protocol/__init__.py",
        "protocol/sse.py",
        "providers/__init__.py",
        "gateway/__init__.py",
        "gateway/pipeline.py",
        "gateway/transport.py",
        "server/__init__.py",
        "server/upstream.py",
    ):
        write(root, module)
    return root


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
    assert imported_roots(module, tmp_path) == FORBIDDEN


def test_an_upward_import_fails_in_every_form_naming_file_and_line(tmp_path: Path) -> None:
    root = fake_package(tmp_path)
    pipeline = write(
        root,
        "gateway/pipeline.py",
        "from __future__ import annotations\n"
        "import typing\n"
        "from runestone_proxy.gateway import transport\n"  # own layer: fine
        "from runestone_proxy.protocol.sse import X\n"  # lower: fine
        "from runestone_proxy.server.upstream import UpstreamPool\n"  # 5
        "import runestone_proxy.server.upstream\n"  # 6
        "from ..server import upstream\n"  # 7
        "from .. import server\n"  # 8
        "if typing.TYPE_CHECKING:\n"
        "    from runestone_proxy.server import upstream as u\n"  # 10
        "def f():\n"
        "    from runestone_proxy.server.upstream import UpstreamPool\n"  # 12
        "    importlib.import_module('runestone_proxy.server.upstream')\n",  # 13
    )
    found = violations(pipeline, root)
    assert [line.split(":")[1] for line in found] == ["5", "6", "7", "8", "10", "12", "13"]
    assert found[0] == (
        f"{NAME}/gateway/pipeline.py:5: runestone_proxy.gateway.pipeline (gateway, layer 3) "
        "imports runestone_proxy.server.upstream (server, layer 5); arrows point down only"
    )
    assert "imports runestone_proxy.server (server, layer 5)" in found[3]


def test_a_leaf_imports_no_layer_but_may_import_a_leaf(tmp_path: Path) -> None:
    root = fake_package(tmp_path)
    tree = write(
        root,
        "config/tree.py",
        "from runestone_proxy import errors\n"
        "from runestone_proxy.errors import E\n"
        "from . import other\n"
        "from runestone_proxy.protocol import sse\n"
        "def f():\n"
        "    from runestone_proxy.gateway.transport import T\n",
    )
    found = violations(tree, root)
    assert [line.split(":")[1] for line in found] == ["4", "6"]
    assert "is a leaf but imports runestone_proxy.protocol.sse (protocol)" in found[0]
    assert "is a leaf but imports runestone_proxy.gateway.transport (gateway)" in found[1]


def test_an_unmapped_module_fails_until_it_has_a_layer(tmp_path: Path) -> None:
    root = fake_package(tmp_path)
    stray = write(root, "stray.py")
    assert violations(stray, root) == [
        f"{NAME}/stray.py:1: module 'stray' has no layer: add it to LAYERS or LEAVES"
    ]
    server = write(root, "server/upstream.py", "from runestone_proxy.stray import x\n")
    assert violations(server, root) == [
        f"{NAME}/server/upstream.py:1: imports runestone_proxy.stray, which has no layer"
    ]
