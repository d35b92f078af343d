"""The callback's checkpointed state, as primitives only.

Checkpoints load with ``torch.load(weights_only=True)``, so everything here is ints, floats, strings,
lists and dicts. Layout keys may come back as strings (JSON, YAML hparams); ``normalize_layout`` (from
:mod:`layermoe.layout`) turns them back into ints.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

from layermoe.allocation import Budget
from layermoe.allocation.growth import GrowthPlan
from layermoe.layout import Layout, normalize_layout

#: where a checkpoint keeps the ``inject=`` config of a ``LayerInfluenceCallback`` (besides its state), so
#: ``load_adapted_checkpoint`` finds it without knowing the callback's state key
INJECT_KEY = "layermoe_inject"

#: the ``stage`` of a failure to remove a finished fade's zero ranks (not a skipped rewire)
FADE_REMOVAL = "fade_removal"


def plain_scores(scores: dict[Any, Any]) -> dict[int, float]:
    return {int(k): float(v) for k, v in sorted(scores.items(), key=lambda kv: int(kv[0]))}


@dataclass
class RewirePlan:
    """A layout waiting for the next optimizer step, with the scores it came from and when they were taken."""

    layout: Layout
    scores: dict[int, float]
    step: int
    epoch: int
    time_scoring_s: float = 0.0
    #: per-block standard errors of the scores (None: the scorer has none, or error_groups=0)
    score_errors: dict[int, float] | None = None
    #: growth mode: the round (0-based schedule slot) this plan grows by; None in rewire mode
    growth_round: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RewirePlan:
        return cls(
            layout=normalize_layout(data["layout"]),
            scores=plain_scores(data.get("scores", {})),
            step=int(data["step"]),
            epoch=int(data["epoch"]),
            time_scoring_s=float(data.get("time_scoring_s", 0.0)),
            score_errors=None if data.get("score_errors") is None else plain_scores(data["score_errors"]),
            growth_round=None if data.get("growth_round") is None else int(data["growth_round"]),
        )


@dataclass
class CallbackState:
    """What survives a checkpoint: progress, the plan waiting for a step boundary, the history.

    ``pending`` is a :class:`RewirePlan` as a plain dict (``plan`` reads it back) or ``None``; ``history``
    has one plain dict per applied rewire. ``budget`` is the resolved budget's value counted in
    ``budget_unit`` (``"params"`` or ``"total_experts"``), fixed at the first fit so a resumed run keeps
    the same one (``resolved_budget`` is it as a ``Budget``); ``inject`` is the MoE-LoRA config dict used
    by ``inject=`` (for reloading). ``failures`` has one ``{"step", "stage", "error"}`` dict per rewire
    skipped under ``on_error="skip"`` (each uses up its slot of the schedule), and one with stage
    ``"fade_removal"`` per failed removal of faded ranks (its rewire is applied and already counted). ``validation_follows`` is
    the number of completed epochs when the checkpoint was written at a training batch end right before
    a validation (else ``None``): Lightning does not re-run that validation when resuming from it, so the
    callback replays its validation-end trigger instead.
    """

    rewires_done: int = 0
    pending: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    budget: int | None = None
    budget_unit: str | None = None
    inject: dict[str, Any] | None = None
    #: a gentle rank shrink in progress: ``{"blocks": {block: {"experts", "from_rank", "to_rank"}},
    #: "steps": F, "done": k, "target": Layout, "history_index": int}`` (see ``callbacks.rank_fade``)
    fade: dict[str, Any] | None = None
    validation_follows: int | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)
    #: the callback's ``keep_scaling`` at the first fit (None: not fixed yet, or a checkpoint from before it)
    keep_scaling: bool | None = None
    #: growth mode: ``{"plan": GrowthPlan.to_dict(), "options": GrowthOptions.to_dict(), "rounds_done": int}``
    #: (``callbacks/growing.py``); None in rewire mode
    growth: dict[str, Any] | None = None

    @property
    def plans_made(self) -> int:
        """Schedule slots used: applied rewires, the pending plan, and rewires skipped after a failure (a
        failed removal of faded ranks belongs to a rewire already counted in ``rewires_done``)."""
        skipped = sum(1 for failure in self.failures if failure.get("stage") != FADE_REMOVAL)
        return self.rewires_done + (1 if self.pending is not None else 0) + skipped

    @property
    def plan(self) -> RewirePlan | None:
        return None if self.pending is None else RewirePlan.from_dict(self.pending)

    @property
    def resolved_budget(self) -> Budget | None:
        if self.budget is None:
            return None
        return Budget(self.budget_unit or "params", self.budget)  # type: ignore[arg-type]

    def keep_budget(self, budget: Budget) -> None:
        """Store a resolved budget (value and unit)."""
        self.budget, self.budget_unit = budget.value, budget.unit

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(
            {
                "rewires_done": self.rewires_done,
                "pending": self.pending,
                "history": self.history,
                "budget": self.budget,
                "budget_unit": self.budget_unit,
                "inject": self.inject,
                "fade": self.fade,
                "validation_follows": self.validation_follows,
                "failures": self.failures,
                "growth": self.growth,
                "keep_scaling": self.keep_scaling,
            }
        )

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> CallbackState:
        state = copy.deepcopy(state)
        pending = state.get("pending")
        if pending is not None:
            pending = RewirePlan.from_dict(pending).to_dict()
        history = []
        for entry in state.get("history", []):
            entry = dict(entry)
            for key in ("layout_before", "layout_after"):
                if key in entry:
                    entry[key] = normalize_layout(entry[key])
            for key in ("scores", "score_errors"):
                if entry.get(key) is not None:
                    entry[key] = plain_scores(entry[key])
            history.append(entry)
        budget = None if state.get("budget") is None else int(state["budget"])
        # checkpoints from before budget_unit existed stored parameters here (or nothing)
        unit = state.get("budget_unit") or (None if budget is None else "params")
        return cls(
            rewires_done=int(state.get("rewires_done", 0)),
            pending=pending,
            history=history,
            budget=budget,
            budget_unit=unit,
            inject=state.get("inject"),
            fade=_plain_fade(state.get("fade")),
            failures=[dict(f) for f in state.get("failures", [])],
            growth=_plain_growth(state.get("growth")),
            keep_scaling=None if state.get("keep_scaling") is None else bool(state["keep_scaling"]),
            validation_follows=(
                None if state.get("validation_follows") is None else int(state["validation_follows"])
            ),
        )


def resume_budget_conflict(kept: Budget, requested: Budget) -> str | None:
    """Why ``requested`` (the callback's ``budget`` argument on resume) cannot continue a run whose budget
    was fixed at ``kept``, or None. A budget without a number (``current``, ``params``, ``total_experts``)
    means "what the starting layout has", i.e. the kept one, as long as it counts in the same unit."""
    same_unit = requested.unit == kept.unit
    if same_unit and (requested.value is None or requested.value == kept.value):
        return None
    return (
        f"budget={str(requested)!r}: the checkpoint's run fixed its budget at {kept} at its first fit, and a"
        " resumed run keeps it (a changed budget would silently be ignored, or change what earlier rewires"
        f" were allocated under). Resume with budget='{kept}' (or a budget without a number in"
        f" {kept.unit}, such as '{'current' if kept.unit == 'params' else kept.unit}'), or start a new run"
        " without --ckpt_path."
    )


def resume_inject_conflict(kept: dict[str, Any] | None, requested: dict[str, Any] | None) -> str | None:
    """Why ``requested`` (the callback's ``inject`` argument on resume) cannot continue a run whose adapters
    were added with ``kept`` (None: the module brought its own), or None."""
    if kept == requested:
        return None
    return (
        f"inject={requested!r}: the checkpoint's run added its adapters with inject={kept!r}, and its weights"
        " and reload config are those adapters (a changed inject= would be recorded but never used)."
        f" Resume with inject={kept!r}, or start a new run without --ckpt_path."
    )


def resume_keep_scaling_conflict(kept: bool | None, requested: bool) -> str | None:
    """Why ``requested`` (the callback's ``keep_scaling`` on resume) cannot continue a run whose rank
    changes so far used ``kept`` (None: not recorded), or None."""
    if kept is None or kept == requested:
        return None
    return (
        f"keep_scaling={requested}: the checkpoint's run changed ranks with keep_scaling={kept}, so its"
        " layers' lora_alpha already follow that rule; switching now would scale later rank changes"
        f" differently from earlier ones. Resume with keep_scaling={kept}, or start a new run without"
        " --ckpt_path."
    )


def _plain_fade(fade: dict[str, Any] | None) -> dict[str, Any] | None:
    if fade is None:
        return None
    fade = dict(fade)
    fade["blocks"] = {int(b): {k: int(v) for k, v in spec.items()} for b, spec in fade["blocks"].items()}
    fade["target"] = normalize_layout(fade["target"])
    return fade


def _plain_growth(growth: dict[str, Any] | None) -> dict[str, Any] | None:
    if growth is None:
        return None
    return {
        "plan": GrowthPlan.from_dict(growth["plan"]).to_dict(),
        "options": dict(growth["options"]),
        "rounds_done": int(growth["rounds_done"]),
    }
