"""The budget an allocation must meet: a number of experts or a number of trainable parameters."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from layermoe.layout import BlockDims, normalize_layout

from .costs import layout_params
from .errors import AllocationError

BudgetKind = Literal["total_experts", "params", "current"]
_KINDS = ("total_experts", "params", "current")


def _parse_count(text: object, kind: str) -> int:
    """Accept 160, "160", "1_000_000" or "1e6" (must be a whole number >= 1)."""
    if isinstance(text, bool):
        raise AllocationError(f"budget {kind}: {text!r} is not a count; give a positive int")
    try:
        value = float(str(text).replace("_", "")) if not isinstance(text, int) else text
    except ValueError as err:
        raise AllocationError(f"budget {kind}: {text!r} is not a number; e.g. '{kind}:160'") from err
    if value != int(value) or value < 1:
        raise AllocationError(f"budget {kind}: {text!r} must be a whole number >= 1")
    return int(value)


@dataclass(frozen=True)
class Budget:
    """What ``allocate`` must spend.

    - ``total_experts`` with ``value=T``: exactly T experts over all blocks, ranks fixed (the papers' mode).
    - ``params`` with ``value=P``: at most P trainable adapter parameters, maximally filled.
    - ``current`` (the callback's default): ``params`` with P = the parameter count of the current layout,
      so a rewire moves capacity without adding any. ``value=None`` for ``total_experts``/``params`` also
      means "what the current layout has".

    Plain and hashable so it can sit in hparams; build it from a string with :meth:`parse`.
    """

    kind: BudgetKind = "current"
    value: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise AllocationError(f"budget kind {self.kind!r} is unknown; use one of {_KINDS}")
        if self.kind == "current" and self.value is not None:
            raise AllocationError("budget 'current' takes no value; use 'params:P' for a fixed count")
        if self.value is not None:
            object.__setattr__(self, "value", _parse_count(self.value, self.kind))

    @classmethod
    def parse(cls, spec: Budget | str | Mapping | None) -> Budget:
        """``"current"``, ``"params"``, ``"params:1_000_000"``, ``"total_experts:160"``,
        ``{"total_experts": 160}``, ``{"kind": "params", "value": 10**6}``, or a Budget."""
        if spec is None:
            return cls()
        if isinstance(spec, Budget):
            return spec
        if isinstance(spec, str):
            kind, sep, value = spec.strip().partition(":")
            return cls(kind.strip(), value.strip() if sep else None)  # type: ignore[arg-type]
        if isinstance(spec, Mapping):
            if "kind" in spec:
                extra = set(spec) - {"kind", "value"}
                if extra:
                    raise AllocationError(f"budget dict: unknown key(s) {sorted(extra)}; use kind/value")
                return cls(spec["kind"], spec.get("value"))
            if len(spec) != 1:
                raise AllocationError(
                    f"budget dict {dict(spec)!r}: give one of {{'total_experts': T}} or {{'params': P}}"
                )
            ((kind, value),) = spec.items()
            return cls(kind, value)
        raise AllocationError(
            f"budget {spec!r}: give a Budget, a string like 'total_experts:160' / 'params' / 'current', "
            "or a dict like {'params': 1000000}"
        )

    @property
    def unit(self) -> str:
        """What ``value`` counts: ``"total_experts"`` (experts) or ``"params"`` (trainable parameters)."""
        return "total_experts" if self.kind == "total_experts" else "params"

    def resolve(self, current_layout: Mapping | None, block_dims: BlockDims | None = None) -> Budget:
        """This budget with its number fixed: ``current`` and a missing value become the count of
        ``current_layout`` in this budget's unit (experts, or parameters from ``block_dims``).

        The callback resolves once at the first fit and keeps the result (a resumed run reuses it);
        ``allocate`` resolves what it is given.
        """
        if self.value is not None:
            return Budget(self.unit, self.value)  # type: ignore[arg-type]
        if current_layout is None:
            raise AllocationError(f"budget {self} means 'as much as the current layout': pass current_layout")
        if self.unit == "total_experts":
            current = normalize_layout(current_layout, "current_layout", AllocationError)
            return Budget("total_experts", sum(spec["experts"] for spec in current.values()))
        if block_dims is None:
            raise AllocationError(
                f"budget {self}: parameter budgets need block_dims={{block: [(d_in, d_out), ...]}}"
            )
        return Budget("params", layout_params(current_layout, block_dims))

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}:{self.value}"
