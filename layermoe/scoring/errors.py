"""The one error type of the scoring engine, so callers can catch scoring failures specifically."""

from __future__ import annotations


class ScoringError(RuntimeError):
    """Scoring could not produce trustworthy numbers (NaN/inf, degenerate damping, bad setup).

    The message names the block and what to change; scores are never returned silently wrong.
    """


class NonFiniteGradientError(ScoringError):
    """A gradient statistic came out NaN or infinite (the loss or the weights overflowed)."""


def check_damping(value: float, field: str) -> float:
    """Validate a damping/scale argument: a finite number > 0 (a zero or negative damping makes the
    damped Fisher singular or indefinite and the influence meaningless)."""
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{field} must be a number > 0, got {value!r}") from exc
    if not number > 0 or number == float("inf"):
        raise ValueError(f"{field} must be a finite number > 0, got {value!r}; pass e.g. {field}=0.1")
    return number
