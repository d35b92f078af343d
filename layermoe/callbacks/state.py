"""The callback's checkpointed state, as primitives only.

Checkpoints load with ``torch.load(weights_only=True)``, so everything here is ints, floats, strings,
lists and dicts. Layout keys may come back as strings (JSON, YAML hparams); :func:`plain_layout`
turns them back into ints.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

Layout = dict[int, dict[str, int]]


def plain_layout(layout: dict[Any, Any]) -> Layout:
    """``{block: {"experts": int, "rank": int}}`` with int keys and plain int values (keys may be strings)."""
    out: Layout = {}
    for block, spec in layout.items():
        out[int(block)] = {"experts": int(spec["experts"]), "rank": int(spec["rank"])}
    return dict(sorted(out.items()))


def plain_scores(scores: dict[Any, Any]) -> dict[int, float]:
    return {int(k): float(v) for k, v in sorted(scores.items(), key=lambda kv: int(kv[0]))}


@dataclass
class CallbackState:
    """What survives a checkpoint: progress, the plan waiting for a step boundary, the history.

    ``pending`` is ``{"layout": Layout, "scores": {block: float}, "step": int, "epoch": int,
    "time_scoring_s": float}`` or ``None``; ``history`` has one plain dict per applied rewire.
    ``budget`` is the resolved trainable-parameter budget, fixed at the first fit so a resumed run
    keeps the same one; ``inject`` is the MoE-LoRA config dict used by ``inject=`` (for reloading).
    ``failures`` has one ``{"step", "stage", "error"}`` dict per rewire skipped under
    ``on_error="skip"`` (each uses up its slot of the schedule). ``validation_follows`` is the number of completed epochs when the checkpoint was written at a
    training batch end right before a validation (else ``None``): Lightning does not re-run that
    validation when resuming from it, so the callback replays its validation-end trigger instead.
    """

    rewires_done: int = 0
    pending: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    budget: int | None = None
    inject: dict[str, Any] | None = None
    validation_follows: int | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def plans_made(self) -> int:
        """Schedule slots used: applied rewires, the pending plan, and rewires skipped after a failure."""
        return self.rewires_done + (1 if self.pending is not None else 0) + len(self.failures)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(
            {
                "rewires_done": self.rewires_done,
                "pending": self.pending,
                "history": self.history,
                "budget": self.budget,
                "inject": self.inject,
                "validation_follows": self.validation_follows,
                "failures": self.failures,
            }
        )

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> CallbackState:
        state = copy.deepcopy(state)
        pending = state.get("pending")
        if pending is not None:
            pending["layout"] = plain_layout(pending["layout"])
            pending["scores"] = plain_scores(pending.get("scores", {}))
        history = []
        for entry in state.get("history", []):
            entry = dict(entry)
            for key in ("layout_before", "layout_after"):
                if key in entry:
                    entry[key] = plain_layout(entry[key])
            if "scores" in entry:
                entry["scores"] = plain_scores(entry["scores"])
            history.append(entry)
        return cls(
            rewires_done=int(state.get("rewires_done", 0)),
            pending=pending,
            history=history,
            budget=None if state.get("budget") is None else int(state["budget"]),
            inject=state.get("inject"),
            failures=[dict(f) for f in state.get("failures", [])],
            validation_follows=(
                None if state.get("validation_follows") is None else int(state["validation_follows"])
            ),
        )
