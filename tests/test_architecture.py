"""Rules of docs/architecture.md that can be checked by reading the source.

- Private Lightning names (``_x``, single underscore) appear only in ``layermoe/lightning_compat.py``: no
  import of a private Lightning module or name, no ``obj._x`` / ``getattr(obj, "_x")`` on a Lightning
  private, and no Lightning subclass that overrides or touches its Lightning base's private members.
- ``layermoe/layout.py`` imports only the standard library (no torch, numpy or other layermoe module).
- The layout types and constants are defined only in ``layout.py``; a function named like one of
  ``layout.py``'s is only a wrapper in a module that imports the original (it passes its own error type).
- A function-local import of layermoe's own packages carries a comment (the import cycle it breaks).

A Lightning private is a ``_x`` name that Lightning's own source defines (``def _x``, ``class _x``,
``_x = ...``, ``obj._x = ...``); for ``self._x`` in a class derived from Lightning, the private members of
its Lightning bases (their ``vars`` and the ``self._x`` their source assigns). A ``_x`` that layermoe
itself defines (outside those Lightning subclasses' overrides) is layermoe's own, e.g. a callback's
``self._trainer``.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import sys
from collections.abc import Iterator
from pathlib import Path

import lightning
import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "layermoe"
COMPAT = PACKAGE / "lightning_compat.py"
LAYOUT = PACKAGE / "layout.py"
LIGHTNING_MODULES = ("lightning", "pytorch_lightning", "lightning_fabric")

# Exceptions to the rules below (none now). Each test fails when an entry is no longer needed.
ALLOWED_PRIVATE_LIGHTNING: set[tuple[str, str]] = set()
ALLOWED_LAYOUT_REDEFINITIONS: set[tuple[str, str]] = set()
ALLOWED_UNCOMMENTED_LOCAL_IMPORTS: set[tuple[str, str]] = set()


def check_against_allow_list(found: set[tuple[str, str]], allowed: set[tuple[str, str]], what: str) -> None:
    """``found`` must be exactly ``allowed``: nothing new, and no entry left that is no longer needed."""
    unexpected = sorted(found - allowed)
    assert not unexpected, f"{what}: {unexpected}"
    stale = sorted(allowed - found)
    assert not stale, f"allow-list entries no longer needed (delete them): {stale}"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _sources() -> Iterator[tuple[str, Path, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(REPO).as_posix(), path, ast.parse(path.read_text(), filename=str(path))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _defined_privates(tree: ast.AST, only_self: bool = False) -> set[str]:
    """The ``_x`` names a piece of source defines: functions, classes, assigned names and attributes
    (``only_self``: only attributes of ``self``/``cls``; ``other._x = ...`` sets someone else's)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            on_self = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            if on_self or not only_self:
                names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return {name for name in names if _is_private(name)}


@functools.cache
def _lightning_privates() -> frozenset[str]:
    names: set[str] = set()
    for path in Path(lightning.__file__).parent.rglob("*.py"):
        names |= _defined_privates(ast.parse(path.read_text(), filename=str(path)))
    return frozenset(names)


@functools.cache
def _base_privates(cls: type) -> frozenset[str]:
    """Private members of the Lightning classes in ``cls``'s MRO (empty for a class without any)."""
    names: set[str] = set()
    for base in cls.__mro__:
        if base.__module__.split(".")[0] not in LIGHTNING_MODULES:
            continue
        names |= {name for name in vars(base) if _is_private(name)}
        names |= _defined_privates(ast.parse(inspect.getsource(base)))
    return frozenset(names)


def _runtime_class(path: Path, name: str) -> type | None:
    module = importlib.import_module(_module_name(path))
    cls = vars(module).get(name)
    return cls if isinstance(cls, type) else None


def _private_lightning_import(node: ast.AST) -> str | None:
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        parts = node.module.split(".")
        if parts[0] in LIGHTNING_MODULES:
            private = [p for p in parts if _is_private(p)] + [
                a.name for a in node.names if _is_private(a.name)
            ]
            return private[0] if private else None
    if isinstance(node, ast.Import):
        for alias in node.names:
            parts = alias.name.split(".")
            if parts[0] in LIGHTNING_MODULES and any(_is_private(p) for p in parts):
                return next(p for p in parts if _is_private(p))
    return None


def _accessed_private(node: ast.AST) -> tuple[ast.expr, str] | None:
    """``(obj, "_x")`` for ``obj._x`` and ``getattr/setattr/hasattr/delattr(obj, "_x", ...)``."""
    if isinstance(node, ast.Attribute) and _is_private(node.attr):
        return node.value, node.attr
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
        and len(node.args) >= 2
        and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str)
        and _is_private(node.args[1].value)
    ):
        return node.args[0], node.args[1].value
    return None


def private_lightning_uses() -> set[tuple[str, str]]:
    """``(file, name)`` for every use of a private Lightning name outside lightning_compat.py."""
    trees = [(rel, path, tree) for rel, path, tree in _sources() if path != COMPAT]
    lightning_classes: dict[ast.ClassDef, frozenset[str]] = {}
    for _, path, tree in trees:
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.bases:
                cls = _runtime_class(path, node.name)
                if cls is not None and _base_privates(cls):
                    lightning_classes[node] = _base_privates(cls)
    own: set[str] = set()
    for _, _, tree in trees:
        own |= _defined_privates(tree, only_self=True)
    for cls_node, inherited in lightning_classes.items():  # a Lightning member is not made layermoe's own
        own -= _defined_privates(cls_node, only_self=True) & inherited
    found: set[tuple[str, str]] = set()
    for rel, _, tree in trees:
        in_lightning_class: dict[ast.AST, frozenset[str]] = {}
        for cls_node, privates in lightning_classes.items():
            if any(cls_node is n for n in tree.body):
                for member in cls_node.body:
                    if (
                        isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef))
                        and member.name in privates
                    ):
                        found.add((rel, member.name))  # overrides a Lightning private
                for sub in ast.walk(cls_node):
                    in_lightning_class[sub] = privates
        for node in ast.walk(tree):
            name = _private_lightning_import(node)
            if name is not None:
                found.add((rel, name))
            access = _accessed_private(node)
            if access is None:
                continue
            obj, attr = access
            privates = in_lightning_class.get(node)
            if privates is not None and isinstance(obj, ast.Name) and obj.id == "self":
                if attr in privates:
                    found.add((rel, attr))
            elif attr in _lightning_privates() and attr not in own:
                found.add((rel, attr))
    return found


def test_the_private_use_check_sees_each_kind_of_use() -> None:
    """The check itself, on the uses it must find (these names are Lightning's own privates)."""
    assert {"_enable_version_counter", "_should_update", "_generate_state_key"} <= _lightning_privates()
    compat = ast.parse(COMPAT.read_text())
    seen = {name for node in ast.walk(compat) if (name := _private_lightning_import(node))}
    assert seen == {"_optimizers_to_device", "_is_registry", "_PRECISION_INPUT"}
    source = ast.parse('getattr(trainer, "_data_source")\ncallback._enable_version_counter = False')
    accesses = {a[1] for node in ast.walk(source) if (a := _accessed_private(node))}
    assert accesses == {"_data_source", "_enable_version_counter"}
    from lightning.pytorch.callbacks import TQDMProgressBar

    assert {"_should_update", "_train_progress_bar"} <= _base_privates(TQDMProgressBar)


def test_layout_imports_only_the_standard_library() -> None:
    imported: set[str] = set()
    for node in ast.walk(ast.parse(LAYOUT.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "layout.py imports nothing relative (it is layermoe's leaf)"
            imported.add((node.module or "").split(".")[0])
    assert imported, "layout.py should import something (the check would be vacuous)"
    outside = sorted(
        name for name in imported if name not in sys.stdlib_module_names and name != "__future__"
    )
    assert not outside, f"layout.py imports {outside}: it must stay a leaf (standard library only)"


def _layout_definitions() -> tuple[dict[str, str], set[str]]:
    """layout.py's public module-level values (name -> source of the value) and public functions."""
    values: dict[str, str] = {}
    functions: set[str] = set()
    for node in ast.parse(LAYOUT.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if not _is_private(node.targets[0].id):
                values[node.targets[0].id] = ast.unparse(node.value)
        elif isinstance(node, ast.FunctionDef) and not _is_private(node.name):
            functions.add(node.name)
    return values, functions


def layout_redefinitions() -> set[tuple[str, str]]:
    """``(file, name)`` for each module- or class-level value outside layout.py that has the name or the
    value of one of layout.py's (``Layout = dict[int, dict[str, int]]``, ``"layermoe_layout"``), and each
    module-level function named like one of layout.py's in a module that does not import that function from
    it."""
    values, functions = _layout_definitions()
    spelled = {source: name for name, source in values.items()}
    found: set[tuple[str, str]] = set()
    for rel, path, tree in _sources():
        if path == LAYOUT:
            continue
        imported = {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == "layermoe.layout"
            for alias in node.names
        }
        scopes = [tree.body] + [node.body for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]
        for statement in (s for body in scopes for s in body):
            if isinstance(statement, (ast.Assign, ast.AnnAssign)) and statement.value is not None:
                targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
                names = {t.id for t in targets if isinstance(t, ast.Name)}
                source = ast.unparse(statement.value)
                found |= {(rel, name) for name in names if name in values}
                if source in spelled:
                    found.add((rel, spelled[source]))
        for node in tree.body:  # module level: a method of the same name is another namespace
            if isinstance(node, ast.FunctionDef) and node.name in functions and node.name not in imported:
                found.add((rel, node.name))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value == values["LAYOUT_KEY"].strip("'\""):
                found.add((rel, "LAYOUT_KEY"))
    return found


def test_the_layout_check_knows_the_layout_definitions() -> None:
    values, functions = _layout_definitions()
    assert values["Layout"] == "dict[int, dict[str, int]]"
    assert {"BlockDims", "LAYOUT_KEY", "CAPACITY_MINIMUM"} <= set(values)
    assert {"normalize_layout", "layout_params", "block_cost", "effective_top_k"} <= functions


def _absolute(module: str | None, level: int, path: Path) -> str:
    if level == 0:
        return module or ""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def uncommented_local_imports() -> set[tuple[str, str]]:
    """``(file, module)`` for each import of a layermoe module inside a function without a comment on its
    line or the line above."""
    found: set[tuple[str, str]] = set()
    for rel, path, tree in _sources():
        lines = path.read_text().splitlines()
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom):
                    modules = [_absolute(node.module, node.level, path)]
                elif isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                else:
                    continue
                for module in modules:
                    if module.split(".")[0] != "layermoe":
                        continue
                    above = lines[node.lineno - 2] if node.lineno > 1 else ""
                    if "#" not in lines[node.lineno - 1] and not above.strip().startswith("#"):
                        found.add((rel, module))
    return found


RULES = {
    "private Lightning names only in lightning_compat.py": (
        private_lightning_uses,
        ALLOWED_PRIVATE_LIGHTNING,
    ),
    "layout types and constants defined only in layout.py (import them from there)": (
        layout_redefinitions,
        ALLOWED_LAYOUT_REDEFINITIONS,
    ),
    "function-local imports of layermoe say on their line which import cycle they break (or move to the top)": (
        uncommented_local_imports,
        ALLOWED_UNCOMMENTED_LOCAL_IMPORTS,
    ),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_the_source_keeps_the_rule(rule: str) -> None:
    find, allowed = RULES[rule]
    check_against_allow_list(find(), allowed, f"broken rule, {rule}")
