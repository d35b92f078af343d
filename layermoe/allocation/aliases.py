"""Plain type aliases shared by the allocation modules.

Defined here (not imported from ``layermoe.adapters``) so the allocation package stays pure math with no
dependency on the rest of layermoe; the shapes match docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

#: ``{block_index: {"experts": int, "rank": int}}`` (docs/architecture.md, "Plain-data formats").
Layout = dict[int, dict[str, int]]
#: Per-block scores; higher means the block should get more capacity.
Scores = Mapping[int, float] | Sequence[float]
#: ``{block_index: [(d_in, d_out), ...]}``: the shapes of the wrapped linear modules of each block.
BlockDims = Mapping[int, Sequence[tuple[int, int]]]
#: ``(low, high)`` with ``high=None`` meaning unbounded, for all blocks or per block.
Bounds = tuple[int, int | None] | Mapping[int, tuple[int, int | None]]
