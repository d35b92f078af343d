"""Plain type aliases shared by the allocation modules.

``Layout`` and ``BlockDims`` come from the leaf module :mod:`layermoe.layout` (no torch, no other layermoe
import), so the allocation package stays pure math; the shapes match docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from layermoe.layout import BlockDims, Layout

#: Per-block scores; higher means the block should get more capacity.
Scores = Mapping[int, float] | Sequence[float]
#: ``(low, high)`` with ``high=None`` meaning unbounded, for all blocks or per block.
Bounds = tuple[int, int | None] | Mapping[int, tuple[int, int | None]]

__all__ = ["BlockDims", "Bounds", "Layout", "Scores"]
