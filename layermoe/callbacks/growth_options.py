"""``LayerInfluenceCallback(growth=...)``: the settings of growth mode, checked when the callback is built.

Growth mode never removes capacity: the fit starts from an even share of the budget and each scheduled
rewire slot adds capacity instead (``callbacks/growing.py``; the allocation rule is
:mod:`layermoe.allocation.growth`, the surgery :mod:`layermoe.adapters.grow`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from layermoe.adapters.grow import GROW_INITS
from layermoe.allocation import Budget
from layermoe.allocation.growth import GROWTH_CONTROLS
from layermoe.callbacks.errors import CallbackConfigError
from layermoe.callbacks.schedule import RewireSchedule
from layermoe.layout import is_int_at_least


@dataclass(frozen=True)
class GrowthOptions:
    """Growth mode of :class:`~layermoe.callbacks.LayerInfluenceCallback` (``growth=``).

    Args:
        rounds: growth rounds, one per rewire slot of the ``schedule`` (which must have a period,
            ``schedule.every``, when ``rounds > 1``; ``schedule.max_rewires``, if given, must equal
            ``rounds``). The last round spends the budget.
        initial_fraction: share of the resolved parameter budget the fit starts with, spread evenly
            (one expert per block at the largest common rank that fits; below rank 1 in every block, rank 1
            in evenly spaced blocks and none elsewhere), in ``(0, 1]``.
        init: A rows of new capacity: ``"lora"`` (LoRA's random init) or ``"gradient"`` (the top singular
            directions of the block's weight gradient on the scoring pass's training samples, outside the
            span of its existing A rows).
        control: ``"none"`` (place each round's increment by the scores), ``"uniform"`` (spread it
            evenly, ``uniform_grow``) or ``"placebo"`` (the scores permuted across blocks, seeded per
            round, ``placebo_grow``).
        router_ratio: a block grows by a new expert when the expert's own parameters are at least this
            many times the router parameters it brings, else by one rank unit (``grow_layout``).

    How a rank change scales (``lora_alpha / rank`` kept or not) is the callback's ``keep_scaling``,
    shared with rewire mode.
    """

    rounds: int = 3
    initial_fraction: float = 0.25
    init: str = "lora"
    control: str = "none"
    router_ratio: float = 1.0

    def __post_init__(self) -> None:
        if not is_int_at_least(self.rounds, 1):
            raise CallbackConfigError(f"growth.rounds={self.rounds!r}: must be an int >= 1 (growth rounds)")
        f = self.initial_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not (0 < f <= 1):
            raise CallbackConfigError(
                f"growth.initial_fraction={f!r}: must be a number in (0, 1], the share of the budget the"
                " fit starts with (e.g. 0.25)"
            )
        if self.init not in GROW_INITS:
            raise CallbackConfigError(f"growth.init={self.init!r}: use one of {list(GROW_INITS)}")
        if self.control not in GROWTH_CONTROLS:
            raise CallbackConfigError(
                f"growth.control={self.control!r}: use one of {list(GROWTH_CONTROLS)} ('none' places the"
                " increments by the scores)"
            )
        ratio = self.router_ratio
        if (
            isinstance(ratio, bool)
            or not isinstance(ratio, (int, float))
            or not (math.isfinite(ratio) and ratio >= 0)
        ):
            raise CallbackConfigError(
                f"growth.router_ratio={ratio!r}: must be a finite number >= 0 (default 1)"
            )

    @classmethod
    def coerce(cls, value: GrowthOptions | dict[str, Any] | None) -> GrowthOptions | None:
        """Accept an instance, a plain dict (YAML) or None (rewire mode)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            allowed = [f.name for f in fields(cls)]
            unknown = sorted(set(value) - set(allowed))
            if unknown:
                raise CallbackConfigError(
                    f"growth has unknown keys {unknown}: allowed are {', '.join(allowed)}"
                )
            return cls(**value)
        raise CallbackConfigError(
            f"growth={value!r}: give a GrowthOptions, a dict such as {{rounds: 3, initial_fraction: 0.25}},"
            " or None (rewire mode)"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def growth_schedule(growth: GrowthOptions, schedule: RewireSchedule) -> RewireSchedule:
    """The schedule of a growth run: one slot per round, ``rounds`` slots in all.

    ``growth.rounds`` is the number of rewire slots; the schedule says when they come (``warmup``,
    ``every``, ``interval``). A schedule that cannot hold them, or that names another count, is refused
    rather than silently cut short or stretched.
    """
    if growth.rounds > 1 and schedule.every is None:
        raise CallbackConfigError(
            f"growth.rounds={growth.rounds} needs a period: set schedule.every=K (steps or epochs between"
            " growth rounds, the first at schedule.warmup), or growth.rounds=1"
        )
    if schedule.max_rewires is not None and schedule.max_rewires != growth.rounds:
        raise CallbackConfigError(
            f"schedule.max_rewires={schedule.max_rewires} conflicts with growth.rounds={growth.rounds}: in"
            " growth mode the rounds are the rewire slots; drop schedule.max_rewires or set it equal"
        )
    return replace(schedule, max_rewires=growth.rounds)


def check_growth_settings(budget: Budget, rank_fade_steps: int) -> None:
    """Settings of rewire mode that growth cannot honour."""
    if budget.unit != "params":
        raise CallbackConfigError(
            f"budget={str(budget)!r} with growth: a growth run spends a parameter budget; use"
            " budget='current' (the injected layout's parameters) or 'params:P'"
        )
    if rank_fade_steps:
        raise CallbackConfigError(
            f"rank_fade_steps={rank_fade_steps} with growth: growth never lowers a rank, so there is nothing"
            " to fade; drop rank_fade_steps (or growth)"
        )
