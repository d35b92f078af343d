"""How error messages list what they found: the first few, then how many more (never a silent cut)."""

from __future__ import annotations

from collections.abc import Iterable


def listed(items: Iterable[object], limit: int, sep: str = ", ") -> str:
    """The first ``limit`` items joined by ``sep``, then "... and N more" when there are more: a message
    stays readable when a whole model's worth of names disagrees, and says that it was cut."""
    items = [str(item) for item in items]
    more = f"{sep}... and {len(items) - limit} more" if len(items) > limit else ""
    return sep.join(items[:limit]) + more


def listed_lines(items: Iterable[object], limit: int) -> str:
    """``listed`` with one item per indented line (to follow a line that ends in a colon)."""
    return listed(items, limit, sep="\n  ")
