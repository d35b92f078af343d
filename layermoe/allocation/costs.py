"""Trainable-parameter cost of a layout, from module shapes given as plain data.

Per module of shape (d_in, d_out): one expert of rank r costs ``r * (d_in + d_out)`` (its A and B), and the
router costs ``(d_in + 1) * experts`` (weight and bias), present only when experts > 1
(docs/architecture.md, ``MoELoRALinear``). Every module of a block shares the block's experts and rank.
"""

from __future__ import annotations

from collections.abc import Mapping

from .aliases import BlockDims, Layout
from .validation import normalize_block_dims, normalize_layout


def block_cost(experts: int, rank: int, s: int, r: int) -> int:
    """Params of one block: ``s = sum(d_in + d_out)``, ``r = sum(d_in + 1)`` over its modules."""
    return int(experts) * int(rank) * int(s) + (int(experts) * int(r) if experts > 1 else 0)


def layout_params(layout: Mapping, block_dims: BlockDims) -> int:
    """Trainable adapter parameters of ``layout`` (what ``Budget("current")`` resolves to)."""
    lay: Layout = normalize_layout(layout, None, "layout")
    blocks = sorted(lay)
    s, r = normalize_block_dims(block_dims, blocks)
    return sum(block_cost(lay[b]["experts"], lay[b]["rank"], s[i], r[i]) for i, b in enumerate(blocks))
