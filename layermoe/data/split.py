"""Seeded, stratified train/validation splits and row limits (pure Python, deterministic)."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence


def _count(size: float | int, total: int, field: str) -> int:
    """Rows to take: an int is a row count, a float a fraction of ``total`` (so 1.0 is every row, not one)."""
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise ValueError(f"{field} must be a row count (int) or a fraction in (0, 1), got {size!r}")
    if isinstance(size, float):
        if size == 0.0:
            return 0
        if not 0.0 < size < 1.0:
            everything = " (all rows: nothing would be left to train on)" if size == 1.0 else ""
            rows = (
                f"; for {int(size)} rows give the int {int(size)}" if size >= 1 and size.is_integer() else ""
            )
            raise ValueError(
                f"{field}={size} is a float, so a fraction of the {total} rows{everything}; a fraction must be"
                f" in (0, 1), e.g. 0.1{rows}"
            )
        return max(1, round(size * total))
    count = int(size)
    if count < 0 or count >= total:
        raise ValueError(f"{field}={count} rows must be >= 0 and smaller than the {total} rows available")
    return count


def _per_class_counts(groups: dict[int, list[int]], count: int) -> dict[int, int]:
    """Largest-remainder apportionment of ``count`` rows over the classes, by class size."""
    # Integer arithmetic: float shares turn exact ties into rounding noise, and ties go to the lower class.
    total = sum(len(g) for g in groups.values())
    counts = {c: (count * len(g)) // total for c, g in groups.items()}
    order = sorted(groups, key=lambda c: (-((count * len(groups[c])) % total), c))
    for c in order[: count - sum(counts.values())]:
        counts[c] += 1
    return counts


def stratified_indices(
    labels: Sequence[int] | None,
    size: float | int,
    seed: int,
    total: int | None = None,
    field: str = "val_size",
) -> tuple[list[int], list[int]]:
    """Split row indices into (kept, taken) with ``size`` rows taken, class proportions preserved.

    ``labels=None`` (causal LM) takes a plain seeded random subset of ``total`` rows. Both lists are sorted,
    so the same seed and data always give the same split.
    """
    n = len(labels) if labels is not None else int(total or 0)
    count = _count(size, n, field)
    rng = random.Random(seed)
    if labels is None:
        order = list(range(n))
        rng.shuffle(order)
        taken = set(order[:count])
    else:
        groups: dict[int, list[int]] = defaultdict(list)
        for index, label in enumerate(labels):
            groups[label].append(index)
        taken = set()
        for cls, k in sorted(_per_class_counts(groups, count).items()):
            members = list(groups[cls])
            rng.shuffle(members)
            taken.update(members[:k])
    kept = [i for i in range(n) if i not in taken]
    return kept, sorted(taken)
