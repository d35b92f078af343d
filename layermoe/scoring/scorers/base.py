"""Scorer interface and the registry by name.

Sign convention, shared by every scorer: a higher score means the block should get MORE capacity.
The allocators never flip signs, so each scorer's docstring says how its raw quantity maps onto that.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from torch import nn

from ..statistics import BlockStatistics
from ..uncertainty import DEFAULT_GROUPS, jackknife_errors

SCORERS: dict[str, type[Scorer]] = {}

_S = TypeVar("_S", bound="type[Scorer]")


class Scorer:
    """One number per block from captured statistics (or from the model for model-only scorers).

    Subclasses set `needs_statistics = False` when they read the model instead (`alpha_hill`,
    `uniform`); `score` then receives the model.
    """

    name: ClassVar[str] = ""
    needs_statistics: ClassVar[bool] = True

    def score(self, stats: dict[int, BlockStatistics]) -> dict[int, float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def score_with_errors(
        self, source: dict[int, BlockStatistics] | nn.Module, groups: int = DEFAULT_GROUPS
    ) -> tuple[dict[int, float], dict[int, float] | None]:
        """Scores and their per-block standard errors (delete-a-group jackknife over the scored
        samples, `layermoe.scoring.uncertainty`); errors are None for scorers that read the model."""
        if not self.needs_statistics:
            return self.score(source), None  # type: ignore[arg-type]
        scores = self.score(source)  # type: ignore[arg-type]
        return scores, jackknife_errors(self.score, source, groups)  # type: ignore[arg-type]

    def __call__(self, source: dict[int, BlockStatistics] | nn.Module) -> dict[int, float]:
        return self.score(source)  # type: ignore[arg-type]


def register_scorer(name: str) -> Callable[[_S], _S]:
    """Class decorator adding a Scorer subclass to SCORERS under `name` (users register their own).

    Registering a name twice raises, so a plugin cannot silently replace a built-in scorer.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"scorer name must be a non-empty string, got {name!r}")

    def decorate(cls: _S) -> _S:
        if not (isinstance(cls, type) and issubclass(cls, Scorer)):
            raise TypeError(f"register_scorer({name!r}) decorates Scorer subclasses, got {cls!r}")
        if name in SCORERS and SCORERS[name] is not cls:
            raise ValueError(f"a scorer named {name!r} is already registered ({SCORERS[name].__name__})")
        cls.name = name
        SCORERS[name] = cls
        return cls

    return decorate


def get_scorer(name: str, **kwargs: Any) -> Scorer:
    """Instantiate the scorer registered as `name` with its keyword options."""
    if name not in SCORERS:
        raise KeyError(f"unknown scorer {name!r}; registered: {sorted(SCORERS)}")
    return SCORERS[name](**kwargs)
