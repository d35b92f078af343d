"""Control scorers: arms that tell whether a scorer's allocation carries information.

- `random`: seeded random scores (the same at every call, so a resumed run scores like the original).
- `placebo`: a named scorer's scores permuted across blocks (seeded). With blocks of equal shapes, as
  in a transformer, the allocation of permuted scores is the named scorer's allocation permuted: the
  same capacities in random places.
- `inverse`: a named scorer's scores reflected, max + min - s: to a shift-invariant allocator
  (`power_law` with `shift`, the default) exactly the negated scores; kept in the original range so
  `mdl`, which clips scores at 0, still sees the (reversed) spread.
- `pattern`: a fixed shape over the depth, MoLA's experts rising by quarters (2-4-6-8 by default).
  With `allocator_options: {shift: false, experts_bounds: [0, null]}` the power law makes capacities
  proportional to the pattern, scaled to the budget; with the default shift the first segment gets
  the minimum.

Wrapped scorers keep their error bars (`score_with_errors`): `inverse` keeps them, `placebo` permutes
them with the scores; `random` and `pattern` have none.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..modules import scored_layers
from ..uncertainty import DEFAULT_GROUPS
from .base import Scorer, get_scorer, register_scorer

Errors = dict[int, float] | None


def _blocks_of(source: Any) -> list[int]:
    """Block indices of statistics (a dict) or of a model (its adapted blocks)."""
    if isinstance(source, Mapping):
        return sorted(int(b) for b in source)
    return sorted(scored_layers(source))


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    return seed


class _WrappingScorer(Scorer):
    """A control built on a named scorer: needs statistics exactly when the named scorer does."""

    def __init__(self, scorer: str = "layerif", scorer_options: Mapping[str, Any] | None = None) -> None:
        if not isinstance(scorer, str) or scorer in ("placebo", "inverse"):
            raise ValueError(f"scorer must name the scorer to control (e.g. 'layerif'), got {scorer!r}")
        self.inner = get_scorer(scorer, **dict(scorer_options or {}))
        self.needs_statistics = getattr(self.inner, "needs_statistics", True)  # type: ignore[misc]

    def score(self, source: Any) -> dict[int, float]:
        return self.transform(self.inner.score(source), None)[0]

    def score_with_errors(self, source: Any, groups: int = DEFAULT_GROUPS) -> tuple[dict[int, float], Errors]:
        return self.transform(*self.inner.score_with_errors(source, groups))

    def transform(self, scores: dict[int, float], errors: Errors) -> tuple[dict[int, float], Errors]:
        raise NotImplementedError  # pragma: no cover - abstract


@register_scorer("random")
class RandomScorer(Scorer):
    """Uniform(0, 1) scores per block from `seed` (a control arm: allocation by chance)."""

    needs_statistics = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = _check_seed(seed)

    def score(self, model: nn.Module) -> dict[int, float]:  # type: ignore[override]
        blocks = _blocks_of(model)
        draws = torch.rand(
            len(blocks), generator=torch.Generator().manual_seed(self.seed), dtype=torch.float64
        )
        return {b: float(v) for b, v in zip(blocks, draws, strict=True)}


@register_scorer("placebo")
class PlaceboScorer(_WrappingScorer):
    """The named scorer's scores (and error bars) permuted across blocks with `seed`."""

    def __init__(
        self, scorer: str = "layerif", scorer_options: Mapping[str, Any] | None = None, seed: int = 0
    ) -> None:
        super().__init__(scorer, scorer_options)
        self.seed = _check_seed(seed)

    def transform(self, scores: dict[int, float], errors: Errors) -> tuple[dict[int, float], Errors]:
        blocks = sorted(scores)
        order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(self.seed)).tolist()
        sources = [blocks[i] for i in order]
        permuted = {b: scores[s] for b, s in zip(blocks, sources, strict=True)}
        moved = None if errors is None else {b: errors[s] for b, s in zip(blocks, sources, strict=True)}
        return permuted, moved


@register_scorer("inverse")
class InverseScorer(_WrappingScorer):
    """The named scorer's scores reflected, max + min - s (the lowest-scored block gets the most)."""

    def transform(self, scores: dict[int, float], errors: Errors) -> tuple[dict[int, float], Errors]:
        top, bottom = max(scores.values()), min(scores.values())
        return {b: top + bottom - s for b, s in scores.items()}, errors


@register_scorer("pattern")
class PatternScorer(Scorer):
    """A fixed score per depth segment: block b of L gets `values[floor(b * len(values) / L)]`.

    Default [2, 4, 6, 8]: MoLA's experts rising by quarters of the depth. L counts the adapted blocks
    (blocks without adapters included), ordered by index.
    """

    needs_statistics = False

    def __init__(self, values: Sequence[float] = (2.0, 4.0, 6.0, 8.0)) -> None:
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ValueError(
                f"values must be a non-empty list of numbers (one per depth segment), got {values!r}"
            )
        out = []
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"values must be finite numbers, got {v!r}")
            out.append(float(v))
        self.values = out

    def score(self, model: nn.Module) -> dict[int, float]:  # type: ignore[override]
        blocks = _blocks_of(model)
        n, k = len(blocks), len(self.values)
        return {b: self.values[min(i * k // n, k - 1)] for i, b in enumerate(blocks)}
