"""Trainable-parameter cost of a layout, from module shapes given as plain data.

The cost rule lives in :mod:`layermoe.layout` (``block_cost``); here it only raises ``AllocationError``
like the rest of the allocation package.
"""

from __future__ import annotations

from collections.abc import Mapping

from layermoe.layout import BlockDims, block_cost
from layermoe.layout import layout_params as _layout_params

from .errors import AllocationError

__all__ = ["block_cost", "layout_params"]


def layout_params(layout: Mapping, block_dims: BlockDims) -> int:
    """Trainable adapter parameters of ``layout`` (what ``Budget("current")`` resolves to)."""
    return _layout_params(layout, block_dims, AllocationError)
