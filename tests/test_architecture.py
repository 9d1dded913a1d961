"""The layer rules of docs/architecture.md, checked on the source: module sizes, no import
circles, which layer may import which, and a metadata layer that imports without torch."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cloudckpt"
#: "About 400 lines" per module (ruff-formatted), with a little slack for a docstring.
MAX_LINES = 420


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


#: Modules below every layer, with no cloudckpt imports of their own: anyone may use them.
FOUNDATIONS = ("cloudckpt.errors", "cloudckpt.redact")

MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports run when the module is imported: not those in functions or TYPE_CHECKING."""
    found: list[ast.Import | ast.ImportFrom] = []
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If) and not _type_checking(node):
            pending += node.body + node.orelse
        elif isinstance(node, ast.Try):
            pending += node.body + node.orelse + node.finalbody
            for handler in node.handlers:
                pending += handler.body
    return found


def imports_of(module: str, *, everywhere: bool = False) -> set[str]:
    """Absolute names ``module`` imports (packages and modules, cloudckpt's and others')."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    nodes = (
        [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
        if everywhere
        else _top_level_imports(tree)
    )
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*anchor, base] if base else anchor)
        submodules = {f"{base}.{a.name}" for a in node.names} & MODULES.keys()
        names |= submodules
        if len(submodules) < len(node.names):  # names defined in ``base`` itself
            names.add(base)
    return names


def _internal(names: set[str]) -> set[str]:
    return {n for n in names if n in MODULES}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_no_module_is_over_about_400_lines() -> None:
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules by idea: {long}"


def test_there_is_no_import_circle() -> None:
    graph = {m: _internal(imports_of(m)) - {m} for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in MODULES:
        if module not in index:
            visit(module)
    assert not circles


def _violations(layer: str, allowed: Callable[[str], bool]) -> list[str]:
    return [
        f"{m} imports {name}"
        for m in MODULES
        if _under(m, layer)
        for name in sorted(imports_of(m, everywhere=True))
        if not allowed(name)
    ]


def test_store_imports_no_torch_and_nothing_above_it() -> None:
    below = ("cloudckpt.store", "cloudckpt.errors", "cloudckpt.redact")
    bad = _violations(
        "cloudckpt.store",
        lambda n: (
            not _under(n, "torch")
            and (not _under(n, "cloudckpt") or any(_under(n, b) for b in below))
        ),
    )
    assert not bad


@pytest.mark.parametrize("layer", ["cloudckpt.codec", "cloudckpt.float_planes"])
def test_codec_imports_neither_store_nor_torch(layer: str) -> None:
    bad = _violations(layer, lambda n: not any(_under(n, x) for x in ("torch", "cloudckpt.store")))
    assert not bad


@pytest.mark.parametrize("layer", ["cloudckpt.repo", "cloudckpt.commit", "cloudckpt.gc"])
def test_the_repository_layer_knows_no_manager_preemption_or_cli(layer: str) -> None:
    above = ("cloudckpt.manager", "cloudckpt.preemption", "cloudckpt.cli")
    bad = _violations(layer, lambda n: not any(_under(n, a) for a in above))
    assert not bad


def test_only_the_cli_imports_the_cli() -> None:
    bad = [
        f"{m} imports {n}"
        for m in MODULES
        if not _under(m, "cloudckpt.cli") and m != "cloudckpt.__main__"
        for n in imports_of(m, everywhere=True)
        if _under(n, "cloudckpt.cli")
    ]
    assert not bad


def test_preemption_knows_no_store() -> None:
    bad = _violations(
        "cloudckpt.preemption",
        lambda n: not any(_under(n, x) for x in ("cloudckpt.store", "cloudckpt.repo", "fsspec")),
    )
    assert not bad


def test_integrations_use_the_public_api_and_their_own_shims() -> None:
    import cloudckpt

    def allowed(name: str) -> bool:
        if not _under(name, "cloudckpt"):
            return True
        return name in FOUNDATIONS or name == "cloudckpt" or _under(name, "cloudckpt.integrations")

    bad = _violations("cloudckpt.integrations", allowed)
    assert not bad
    for module in MODULES:
        if not _under(module, "cloudckpt.integrations"):
            continue
        tree = ast.parse(MODULES[module].read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "cloudckpt" and not node.level:
                private = [a.name for a in node.names if a.name not in cloudckpt.__all__]
                assert not private, f"{module} imports non-public {private} from cloudckpt"


def test_the_metadata_layer_imports_without_torch() -> None:
    code = (
        "import sys, cloudckpt, cloudckpt.errors, cloudckpt.store, cloudckpt.versions\n"
        "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]"


def _cloudckpt_classes(hint: Any, found: set[type]) -> None:
    if isinstance(hint, type):
        if hint.__module__.startswith("cloudckpt"):
            found.add(hint)
        return
    for arg in typing.get_args(hint):
        _cloudckpt_classes(arg, found)


def test_public_signatures_name_exported_types() -> None:
    """A type a public signature names (an argument, a result, a field) is exported."""
    import cloudckpt

    missing: dict[str, list[str]] = {}
    public = {name: getattr(cloudckpt, name) for name in cloudckpt.__all__}
    for name in cloudckpt.__all__:
        obj = getattr(cloudckpt, name)
        members = [("", obj)]
        if isinstance(obj, type):
            members = [(n, m) for n, m in vars(obj).items() if not n.startswith("_")]
            members.append(("__init__", obj.__init__))
        for member, value in members:
            fn = value.fget if isinstance(value, property) else value
            fn = getattr(fn, "__func__", fn)
            if not callable(fn):
                continue
            found: set[type] = set()
            hinted = [fn, obj] if dataclasses.is_dataclass(obj) and member == "__init__" else [fn]
            for target in hinted:
                # Modules import some annotation types under TYPE_CHECKING only: resolve
                # them among the exports (a name that is not one stays unresolved).
                where = sys.modules.get(getattr(target, "__module__", ""), cloudckpt)
                names = {**vars(where), **public}
                try:
                    hints = typing.get_type_hints(target, globalns=names)
                except NameError as e:
                    missing.setdefault(str(e), []).append(f"{name}.{member}".rstrip("."))
                    continue
                for hint in hints.values():
                    _cloudckpt_classes(hint, found)
            for cls in found:
                if getattr(cloudckpt, cls.__name__, None) is not cls:
                    missing.setdefault(f"{cls.__module__}.{cls.__name__}", []).append(
                        f"{name}.{member}".rstrip(".")
                    )
    assert not missing
