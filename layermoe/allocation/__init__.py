"""Allocation programs: per-block scores -> integer expert counts and LoRA ranks under an exact budget.

Pure math (numpy only): no torch.nn, no Lightning, no other layermoe subpackage. The callback calls
:func:`allocate`; :func:`power_law` and :func:`mdl` are the papers' rules on a plain unit budget.
"""

from .aliases import BlockDims, Bounds, Layout, Scores
from .allocate import ALLOCATE_OPTIONS, RANK_POLICIES, allocate, check_method_options
from .budget import Budget
from .continuous import mdl_units, proportional_units
from .costs import block_cost, layout_params
from .errors import AllocationError
from .growth import GROWTH_CONTROLS, GrowthPlan, grow_layout, placebo_grow, plan_growth, uniform_grow
from .programs import METHODS, mdl, mdl_quality, power_law, power_law_weights

__all__ = [
    "ALLOCATE_OPTIONS",
    "GROWTH_CONTROLS",
    "GrowthPlan",
    "grow_layout",
    "placebo_grow",
    "plan_growth",
    "uniform_grow",
    "METHODS",
    "RANK_POLICIES",
    "AllocationError",
    "BlockDims",
    "Bounds",
    "Budget",
    "Layout",
    "Scores",
    "allocate",
    "check_method_options",
    "block_cost",
    "layout_params",
    "mdl",
    "mdl_quality",
    "mdl_units",
    "power_law",
    "power_law_weights",
    "proportional_units",
]
