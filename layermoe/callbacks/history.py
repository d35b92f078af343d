"""One history entry per applied rewire: a typed record, checkpointed as the plain dict ``to_dict`` gives.

The callback's ``history`` (and its checkpointed state, ``report.py``, and user code) read the dicts;
``RewireRecord`` is where their keys are defined. A faded rank shrink completes its entry later, at the
removal step (:meth:`Removal.complete`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from layermoe.layout import Layout


def relative_change(before: float, after: float) -> float | None:
    """Relative change of the probe loss (None when the loss before is 0)."""
    return (after - before) / abs(before) if before else None


@dataclass
class RankMoves:
    """The blocks whose rank went down, and what those moves alone did to the probe loss."""

    blocks: list[int]
    #: 0: cut at the rewire; F > 0: faded over F optimizer steps, removed after them
    fade_steps: int
    #: relative loss change of cutting the lowered ranks at once, alone, on the model before the rewire
    cut_disturbance: float | None
    #: the rank moves' own change: the cut (at once) or the change at the removal step (None until then)
    disturbance: float | None
    removal_step: int | None


@dataclass
class RewireRecord:
    """What one rewire did: when, from which scores, layouts and parameters before and after, the budget,
    timings, the probe loss before and after (``disturbance`` = its relative change), rank moves and the
    optimizer state carried over (``{"kept", "mapped", "reset"}`` parameter counts)."""

    index: int
    step: int
    epoch: int
    scored_at_step: int
    scores: dict[int, float]
    score_errors: dict[int, float] | None
    error_shrinkage: float
    layout_before: Layout
    layout_after: Layout
    params_before: int
    params_after: int
    budget: int | None
    budget_unit: str | None
    time_scoring_s: float
    time_rewire_s: float
    time_surgery_s: float
    val_loss_before: float
    val_loss_after: float
    disturbance: float | None
    rank_moves: RankMoves | None
    optimizer_state: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        """The history entry: primitives only (checkpoints load with ``weights_only=True``)."""
        return asdict(self)


@dataclass
class Removal:
    """The removal step of a faded rank shrink: what completes that rewire's entry."""

    step: int
    layout_after: Layout
    params_after: int
    loss_before: float
    loss_after: float
    #: the removal transaction's resize reports (not part of the entry)
    reports: list[Any] = field(default_factory=list, repr=False)

    def complete(self, entry: dict[str, Any]) -> None:
        """Complete, in place, the entry of the rewire whose rank shrink faded: the layout and parameters
        after the removal step, and the loss change of that step as the rank moves' disturbance."""
        entry["layout_after"] = self.layout_after
        entry["params_after"] = self.params_after
        entry["rank_moves"].update(
            {
                "disturbance": relative_change(self.loss_before, self.loss_after),
                "removal_step": self.step,
                "removal_loss_before": self.loss_before,
                "removal_loss_after": self.loss_after,
            }
        )
