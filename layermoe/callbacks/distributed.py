"""Strategy support: which strategies can rewire, identical plans on every rank, the DDP re-wrap, and
failures that every rank learns of at the same point (``Lockstep``).

Why these rules: a DDP wrapper's reducer knows only the parameters it was built with (a resize must
rebuild it on every rank at the same step), and sharded strategies (FSDP, DeepSpeed, model-parallel)
restore checkpoints after sharding, so a layout cannot be rebuilt before the weights load.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from layermoe.callbacks.errors import CallbackConfigError, RewireError


def check_strategy(strategy: Any) -> None:
    """Accept single-device and DDP strategies; reject the rest with the reason and the fix."""
    if isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        return
    name = type(strategy).__name__
    raise CallbackConfigError(
        f"LayerInfluenceCallback does not support the {name} strategy: sharded and model-parallel strategies "
        "(FSDP, DeepSpeed, ModelParallel) restore checkpoints after sharding, so a rewired layout cannot be "
        'rebuilt before the weights load. Use Trainer(strategy="auto"/"ddp"/"ddp_spawn") or remove the callback.'
    )


def is_ddp(strategy: Any) -> bool:
    return isinstance(strategy, DDPStrategy)


def mean_scores(strategy: Any, scores: dict[int, float], device: torch.device) -> dict[int, float]:
    """Average per-block scores across ranks (every rank scores its own samples)."""
    if strategy.world_size <= 1:
        return scores
    blocks = sorted(scores)
    values = torch.tensor([scores[b] for b in blocks], dtype=torch.float64, device=device)
    reduced = strategy.reduce(values, reduce_op="mean")
    return {b: float(v) for b, v in zip(blocks, reduced.tolist(), strict=True)}


def sum_over_ranks(strategy: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor summed over the ranks (every rank holds the same names), in name order."""
    if strategy.world_size <= 1:
        return tensors
    return {name: strategy.reduce(tensors[name], reduce_op="sum") for name in sorted(tensors)}


def broadcast(strategy: Any, obj: Any) -> Any:
    """Rank 0's object on every rank (plans and decisions must be identical everywhere)."""
    if strategy.world_size <= 1:
        return obj
    return strategy.broadcast(obj, src=0)


def any_rank(strategy: Any, flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (so failures are handled in lock-step)."""
    if strategy.world_size <= 1:
        return flag
    return bool(strategy.reduce_boolean_decision(flag, all=False))


def rewrap(strategy: Any, lightning_module: Any) -> None:
    """Rebuild the DDP wrapper around the resized module (the constructor syncs from rank 0)."""
    if is_ddp(strategy):
        strategy.model = lightning_module
        strategy.configure_ddp()


class RankFailure(RewireError):
    """A step failed on some rank and every rank knows it (raised on all ranks at the same point, with the
    same message)."""


class Lockstep:
    """Failures of a step before (or around) the rewire transaction, shared by all ranks at agreed points.

    A rank that raises would skip the collectives the other ranks go on into (the scores' all-gathers
    and mean, the plan's broadcast, the probe's mean, the transaction's re-wrap), and they would wait
    there forever. So each rank calls :meth:`check` right before every such collective, and a rank whose
    step raises calls the same exchange from :meth:`stage` instead: the exchange pairs with the other
    ranks' next check, every rank learns which ranks failed and where, and all raise :class:`RankFailure`
    there (no rank enters the collective). A failure inside a collective itself is not covered.

    ``what`` names the step in messages ("rewire" -> "rewire at global step 12 failed on rank 1 during
    ..."); the message is the failing rank's, so it reads the same on every rank.
    """

    def __init__(self, trainer: Any, what: str = "rewire") -> None:
        self.strategy = trainer.strategy
        self.rank = int(trainer.global_rank)
        self.where = f"{what} at global step {trainer.global_step}"

    def check(self) -> None:
        """Before a collective: raise :class:`RankFailure` if any rank failed since the last check."""
        failures = self._exchange(None)
        if failures:
            raise RankFailure(self._message(failures))

    def guarded(self, collective: Callable[..., Any]) -> Callable[..., Any]:
        """``collective`` preceded by :meth:`check` (for a collective called inside another function)."""

        def checked(*args: Any, **kwargs: Any) -> Any:
            self.check()
            return collective(*args, **kwargs)

        return checked

    @contextmanager
    def stage(self, name: str, consequence: str = "nothing was changed") -> Iterator[None]:
        """A failure inside is shared with the other ranks (at their next :meth:`check`) and raised as
        :class:`RankFailure` naming the rank, ``name`` and the error; ``consequence`` ends the message."""
        try:
            yield
        except RankFailure:
            raise
        except Exception as exc:
            failures = self._exchange((self.where, f"{name}: {type(exc).__name__}: {exc}", consequence))
            raise RankFailure(self._message(failures)) from exc

    def _exchange(self, failure: tuple[str, str, str] | None) -> dict[int, tuple[str, str, str]]:
        """``{rank: (where, what failed, consequence)}`` over all ranks (one small all-reduce; the texts
        only when some rank failed)."""
        if self.strategy.world_size <= 1:
            return {} if failure is None else {self.rank: failure}
        flags = torch.zeros(self.strategy.world_size, dtype=torch.int32, device=self.strategy.root_device)
        flags[self.rank] = int(failure is not None)
        flags = self.strategy.reduce(flags, reduce_op="sum")
        if not bool(flags.any()):
            return {}
        texts: list[tuple[str, str, str] | None] = [None] * self.strategy.world_size
        dist.all_gather_object(texts, failure)
        return {rank: text for rank, text in enumerate(texts) if text is not None}

    def _message(self, failures: dict[int, tuple[str, str, str]]) -> str:
        where, _, consequence = failures[min(failures)]
        if self.strategy.world_size <= 1:
            return f"{where} failed during {failures[self.rank][1]}; {consequence}"
        ranks = "; ".join(f"on rank {rank} during {what}" for rank, (_, what, _) in sorted(failures.items()))
        return f"{where} failed {ranks}; {consequence}"
