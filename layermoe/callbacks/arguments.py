"""Checks of ``LayerInfluenceCallback``'s scoring and allocation arguments: each failure is a
:class:`CallbackConfigError` naming the argument and the fix, raised when the callback is built."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from layermoe.allocation import METHODS, AllocationError, check_method_options
from layermoe.callbacks.errors import CallbackConfigError
from layermoe.layout import is_int_at_least
from layermoe.scoring import get_scorer

SCOPES = ("adapter", "base")
#: ``allocator_options.error_shrinkage`` when not given, for scorers with standard errors (issue 27's sweep)
DEFAULT_ERROR_SHRINKAGE = 1.0


def check_count(name: str, value: Any, minimum: int) -> int:
    if not is_int_at_least(value, minimum):
        raise CallbackConfigError(f"{name}={value!r}: must be an int >= {minimum}")
    return value


def check_options(name: str, value: Any) -> dict[str, Any]:
    """A dict of keyword options (a copy), ``{}`` for None."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise CallbackConfigError(f"{name}={value!r}: must be a dict of keyword options (str keys) or None")
    return dict(value)


def checked_scorer(scorer: Any, options: dict[str, Any]) -> Any:
    """The registered scorer ``scorer`` built with ``options``."""
    if not isinstance(scorer, str):
        raise CallbackConfigError(f"scorer={scorer!r}: give a registry name such as 'layerif'")
    try:
        return get_scorer(scorer, **options)
    except KeyError as exc:
        raise CallbackConfigError(f"scorer={scorer!r}: {exc.args[0]}") from exc
    except (TypeError, ValueError) as exc:
        raise CallbackConfigError(f"scorer_options={options!r} for {scorer!r}: {exc}") from exc


def check_allocator(allocator: Any, options: dict[str, Any]) -> None:
    if allocator not in METHODS:
        raise CallbackConfigError(f"allocator={allocator!r}: use one of {list(METHODS)}")
    try:
        check_method_options(allocator, options)
    except AllocationError as exc:
        raise CallbackConfigError(f"allocator_options: {exc}") from exc


def with_default_shrinkage(options: dict[str, Any], scorer: str, has_errors: bool) -> dict[str, Any]:
    """``options`` with ``error_shrinkage`` defaulted when the scores have standard errors; refused without."""
    if "error_shrinkage" not in options and has_errors:
        # the budget sweep's default (BENCHMARKS.md): move capacity only as far as the scores differ
        # beyond their noise; moves within it cost quality and bought none
        options = {**options, "error_shrinkage": DEFAULT_ERROR_SHRINKAGE}
    shrinkage = options.get("error_shrinkage", 0)
    if shrinkage and not has_errors:
        raise CallbackConfigError(
            f"allocator_options.error_shrinkage={shrinkage!r} needs standard errors, but scorer "
            f"{scorer!r} reads no statistics or error_groups=0: use a statistics scorer with "
            "error_groups >= 2, or drop error_shrinkage"
        )
    return options
