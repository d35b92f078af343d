"""When the callback scores and rewires: warm-up, period, maximum count.

Kept apart from the callback so the arithmetic (fractions of the run, counting in optimizer steps or
epochs) is testable without a trainer.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from layermoe.callbacks.errors import CallbackConfigError
from layermoe.layout import is_int_at_least

Interval = Literal["step", "epoch"]


@dataclass(frozen=True)
class RewireSchedule:
    """When to rewire.

    Args:
        warmup: an ``int`` counts optimizer steps (or completed epochs when ``interval="epoch"``) before
            the first rewire; a ``float`` in ``[0, 1)`` is a fraction of the run
            (``trainer.estimated_stepping_batches`` or ``trainer.max_epochs``), resolved when fit starts.
            ``0`` with ``interval="step"`` allocates before the first optimizer step (one-shot, as the
            published methods do; e.g. with ``scope="base"`` or ``scorer="alpha_hill"``).
        every: ``None`` rewires once; an int ``K >= 1`` rewires again every ``K`` steps/epochs.
        max_rewires: at most this many rewires. ``None`` means 1 when ``every`` is ``None``, else no limit.
        interval: ``"step"``: scored and applied in ``on_train_batch_end`` right after the optimizer step
            that reaches the due step. ``"epoch"``: scored at the end of validation once the due number of
            epochs has completed, applied after the next optimizer step.

    The i-th rewire (0-based) is due once ``warmup + i * every`` units are done.
    """

    warmup: int | float = 0.3
    every: int | None = None
    max_rewires: int | None = None
    interval: Interval = "step"

    def __post_init__(self) -> None:
        w = self.warmup
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise CallbackConfigError(
                f"schedule.warmup={w!r}: give an int (optimizer steps or epochs) or a float fraction of the run in [0, 1)"
            )
        if isinstance(w, int) and w < 0:
            raise CallbackConfigError(f"schedule.warmup={w}: must be >= 0 (optimizer steps or epochs)")
        if isinstance(w, float) and not (0.0 <= w < 1.0):
            raise CallbackConfigError(
                f"schedule.warmup={w}: a float is a fraction of the run and must be in [0, 1); "
                "use an int for an absolute number of steps/epochs"
            )
        if self.every is not None and not is_int_at_least(self.every):
            raise CallbackConfigError(
                f"schedule.every={self.every!r}: must be None (rewire once) or an int >= 1"
            )
        m = self.max_rewires
        if m is not None and not is_int_at_least(m):
            raise CallbackConfigError(f"schedule.max_rewires={m!r}: must be None or an int >= 1")
        if self.every is None and m is not None and m > 1:
            raise CallbackConfigError(
                f"schedule.max_rewires={m} needs a period: set schedule.every=K (steps/epochs between rewires)"
            )
        if self.interval not in ("step", "epoch"):
            raise CallbackConfigError(f"schedule.interval={self.interval!r}: must be 'step' or 'epoch'")

    @classmethod
    def coerce(cls, value: RewireSchedule | dict[str, Any] | None) -> RewireSchedule:
        """Accept an instance, a plain dict (YAML) or None (defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {"warmup", "every", "max_rewires", "interval"}
            if unknown:
                raise CallbackConfigError(
                    f"schedule has unknown keys {sorted(unknown)}: allowed are warmup, every, max_rewires, interval"
                )
            return cls(**value)
        raise CallbackConfigError(f"schedule={value!r}: give a RewireSchedule, a dict or None")

    @property
    def limit(self) -> float:
        """Maximum number of rewires (``inf`` when unbounded)."""
        if self.max_rewires is not None:
            return self.max_rewires
        return 1 if self.every is None else math.inf

    def warmup_units(self, total_units: float | None) -> int:
        """Resolve ``warmup`` to a count of steps/epochs; fractions need a finite run length."""
        if isinstance(self.warmup, int):
            return self.warmup
        if total_units is None or not math.isfinite(total_units):
            unit = "max_steps" if self.interval == "step" else "max_epochs"
            raise CallbackConfigError(
                f"schedule.warmup={self.warmup} is a fraction of the run, but the run length is unknown "
                f"(set Trainer({unit}=...)) or give schedule.warmup as an int"
            )
        return max(1, int(round(self.warmup * total_units))) if self.warmup > 0 else 0

    def due_at(self, index: int, warmup_units: int) -> int:
        """Units (steps or epochs) after which rewire number ``index`` (0-based) is due."""
        return warmup_units + index * (self.every or 0)

    def is_due(self, units_done: int, plans_made: int, warmup_units: int) -> bool:
        """Whether a new plan should be computed now, given how many were already made."""
        if plans_made >= self.limit:
            return False
        return units_done >= self.due_at(plans_made, warmup_units)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
