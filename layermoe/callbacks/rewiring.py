"""The rewiring itself, as a plain object: score -> allocate -> apply -> measure.

``LayerInfluenceCallback`` decides *when* (hooks, schedule, checkpointed state, ``on_error`` policy);
``Rewiring`` does *what*, on a live fit: it scores the blocks on the scoring samples, allocates a layout
under a budget, applies it as one transaction (``callbacks/rewire.py``) and measures the probe loss
around it. It raises :class:`RewireError` when scoring, allocation or the transaction fails (the model and
optimizer then as before), returns what happened, and never reads or writes the callback's state.

Each step is its own method so that another kind of step can sit beside the rewire: growth
(``callbacks/growing.py``) reuses ``plan`` with its own ``allocate`` (``grow_layout``) and ``apply`` with
its own ``surgery`` (``adapters.grow_model``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import nn

from layermoe.adapters import apply_layout, layout, moe_layers, named_moe_layers
from layermoe.allocation import Budget, allocate
from layermoe.callbacks import data as data_utils
from layermoe.callbacks.arguments import (
    SCOPES,
    check_allocator,
    check_count,
    check_options,
    checked_scorer,
    with_default_shrinkage,
)
from layermoe.callbacks.distributed import Lockstep, any_rank, broadcast, mean_scores
from layermoe.callbacks.dry_run import dry_run
from layermoe.callbacks.errors import CallbackConfigError, RewireError
from layermoe.callbacks.history import RankMoves, Removal, RewireRecord, relative_change
from layermoe.callbacks.rank_fade import fade_rotations, ranks_kept, ranks_only, shrinking_blocks, start_fade
from layermoe.callbacks.rewire import RewireResult, Surgery, layout_surgery, rewire
from layermoe.callbacks.scoring_pass import mean_loss, resolve_per_sample_loss, scoring_context
from layermoe.callbacks.state import RewirePlan, plain_scores
from layermoe.callbacks.transaction import ModuleSnapshot
from layermoe.layout import BlockDims, Layout, layout_params
from layermoe.lightning_compat import build_validation_loaders, validation_defined, validation_source_loader
from layermoe.scoring import capture_statistics, torch_distributed_gather, training_store_bytes

#: ``allocate(pl_module, scores, errors, budget) -> Layout``: the allocation step of a plan
Allocator = Callable[[nn.Module, dict[int, float], "dict[int, float] | None", "Budget | None"], Layout]


def block_dims(module: nn.Module) -> BlockDims:
    """``{block: [(d_in, d_out), ...]}`` of the module's MoE-LoRA layers (sorted by module name)."""
    return {
        b: [(int(layer.in_features), int(layer.out_features)) for _, layer in sorted(mods.items())]
        for b, mods in moe_layers(module).items()
    }


@dataclass
class Applied:
    """An applied rewire: its history record, the resize reports, and the blocks whose rank now fades."""

    record: RewireRecord
    reports: list[Any]
    fading: dict[int, dict[str, int]]


class RewiringSetting:
    """A callback argument that the rewiring object owns (and checks), read on the callback as before
    (``callback.seed`` is ``callback.rewiring.seed``): one copy of each setting.

    Read-only unless ``minimum`` is given: most settings feed derived state (the scorer object, the state
    key, the default shrinkage), so they are passed to the constructor. A sample count (``minimum``) may
    be reassigned (benchmarks shrink it on CPU): it is re-checked, and the scoring samples loaded with the
    old count are dropped."""

    def __init__(self, attribute: str | None = None, *, minimum: int | None = None) -> None:
        self.attribute = attribute
        self.minimum = minimum

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.attribute = self.attribute or name

    def __get__(self, callback: Any, owner: type | None = None) -> Any:
        return self if callback is None else getattr(callback.rewiring, self.attribute)

    def __set__(self, callback: Any, value: Any) -> None:
        if self.minimum is None:
            raise AttributeError(
                f"{self.name} cannot be changed after construction: pass {self.name}= to the "
                "LayerInfluenceCallback constructor"
            )
        setattr(callback.rewiring, self.attribute, check_count(self.name, value, self.minimum))
        callback.rewiring.start_fit()


class Rewiring:
    """Score, allocate, apply and measure; the callback's scoring and allocation arguments, checked here
    (:class:`CallbackConfigError` names the argument). See ``LayerInfluenceCallback`` for each argument."""

    def __init__(
        self,
        scorer: str,
        scorer_options: dict[str, Any] | None,
        allocator: str,
        allocator_options: dict[str, Any] | None,
        num_train_samples: int,
        num_val_samples: int,
        scoring_batch_size: int | None,
        seed: int,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None,
        scope: str,
        capture_options: dict[str, Any] | None,
        error_groups: int,
        rank_fade_steps: int,
        verbose: bool,
        keep_scaling: bool = False,
    ) -> None:
        self.scorer_options = check_options("scorer_options", scorer_options)
        self.scorer, self.scoring = scorer, checked_scorer(scorer, self.scorer_options)
        self.allocator = allocator
        self.allocator_options = check_options("allocator_options", allocator_options)
        check_allocator(allocator, self.allocator_options)
        if "score_errors" in self.allocator_options:
            raise CallbackConfigError(
                "allocator_options.score_errors: the callback passes the scores' own standard errors (from"
                " error_groups) at every allocation; drop allocator_options.score_errors (error_groups=0"
                " allocates without errors)"
            )
        self.num_train_samples = check_count("num_train_samples", num_train_samples, 1)
        self.num_val_samples = check_count("num_val_samples", num_val_samples, 1)
        if scoring_batch_size is not None:
            check_count("scoring_batch_size", scoring_batch_size, 1)
        self.scoring_batch_size = scoring_batch_size
        self.seed = check_count("seed", seed, 0)
        if loss_fn is not None and not callable(loss_fn):
            raise CallbackConfigError(
                f"loss_fn={loss_fn!r}: must be callable as loss_fn(model, batch) -> (B,)"
            )
        self.loss_fn = loss_fn
        if scope not in SCOPES:
            raise CallbackConfigError(f"scope={scope!r}: must be one of {SCOPES}")
        self.scope = scope
        self.capture_options = check_options("capture_options", capture_options)
        self.rank_fade_steps = check_count("rank_fade_steps", rank_fade_steps, 0)
        self.error_groups = check_count("error_groups", error_groups, 0)
        if self.error_groups == 1:
            raise CallbackConfigError(
                "error_groups=1: a jackknife needs >= 2 groups (0 turns error bars off)"
            )
        has_errors = self.needs_statistics and self.error_groups >= 2
        self.allocator_options = with_default_shrinkage(self.allocator_options, scorer, has_errors)
        self.verbose = bool(verbose)
        if not isinstance(keep_scaling, bool):
            raise CallbackConfigError(f"keep_scaling={keep_scaling!r}: must be true or false")
        self.keep_scaling = keep_scaling
        self.start_fit()

    @property
    def needs_statistics(self) -> bool:
        """Whether the scorer reads gradient statistics (else it scores the model alone)."""
        return bool(getattr(self.scoring, "needs_statistics", True))

    # ------------------------------------------------------------------ per fit
    def start_fit(self) -> None:
        """Forget what belongs to the previous fit (its scoring samples on the device, its scored loss)."""
        self.val_batches: list[Any] | None = None
        #: (global step, mean val loss) from the last scoring forward: the rewire's "loss before"
        self.scored_val_loss: tuple[int, float] | None = None

    def dry_run(self, trainer: Any, pl_module: nn.Module) -> None:
        """One scoring pass on two samples before training (``callbacks/dry_run.py``)."""
        dry_run(
            trainer,
            pl_module,
            self.loss_fn,
            scope=self.scope,
            capture_options=self.capture_options,
            needs_gradients=self.needs_statistics,
            num_train_samples=self.num_train_samples,
            num_val_samples=self.num_val_samples,
            seed=self.seed + trainer.global_rank,
        )

    # ------------------------------------------------------------------ score -> allocate (a plan)
    def plan(
        self, trainer: Any, pl_module: nn.Module, budget: Budget | None, allocate: Allocator | None = None
    ) -> RewirePlan:
        """Score (averaged over ranks), allocate on rank 0, broadcast: the same plan on every rank.

        ``allocate(pl_module, scores, errors, budget) -> Layout`` replaces :meth:`allocate` (growth).

        Raises:
            RewireError: scoring or allocation failed on some rank (nothing was changed).
        """
        start = time.perf_counter()
        # every collective below is preceded by a check, so a rank that fails leaves no rank waiting
        sync = Lockstep(trainer, "scoring/allocation")
        unchanged = "the model and optimizer are unchanged"
        with sync.stage("scoring", unchanged):
            scores, errors = self.score(trainer, pl_module, sync)
            sync.check()
            scores = mean_scores(trainer.strategy, scores, pl_module.device)
        planned: tuple[Layout, dict[int, float], dict[int, float] | None] | None = None
        with sync.stage("allocation", unchanged):
            if trainer.global_rank == 0:
                # errors come from the gathered statistics, identical on every rank: rank 0's are shared
                new_layout = (allocate or self.allocate)(pl_module, scores, errors, budget)
                planned = (new_layout, scores, errors)
            sync.check()
        planned = broadcast(trainer.strategy, planned)
        assert planned is not None
        new_layout, scores, errors = planned
        return RewirePlan(
            layout=new_layout,
            scores=scores,
            score_errors=errors,
            step=int(trainer.global_step),
            epoch=int(trainer.current_epoch),
            time_scoring_s=time.perf_counter() - start,
        )

    def allocate(
        self,
        pl_module: nn.Module,
        scores: dict[int, float],
        errors: dict[int, float] | None,
        budget: Budget | None,
    ) -> Layout:
        """The layout ``allocate`` gives these scores under the budget (raises ``AllocationError``)."""
        return allocate(
            scores,
            method=self.allocator,
            budget=budget,
            current_layout=layout(pl_module),
            block_dims=block_dims(pl_module),
            score_errors=errors,
            **self.allocator_options,
        )

    def score(
        self, trainer: Any, pl_module: nn.Module, sync: Lockstep | None = None
    ) -> tuple[dict[int, float], dict[int, float] | None]:
        """Scores and their standard errors (None for model-only scorers or ``error_groups=0``); under DDP
        each all-gather of the statistics is preceded by ``sync``'s check."""
        with scoring_context(pl_module):
            if not self.needs_statistics:
                return self._checked_scores(self.scoring.score(pl_module), pl_module), None
            stats = self._statistics(trainer, pl_module, sync or Lockstep(trainer, "scoring"))
            if self.error_groups == 0:
                return self._checked_scores(self.scoring.score(stats), pl_module), None
            try:
                scores, errors = self.scoring.score_with_errors(stats, self.error_groups)
            except Exception:
                # a malformed score() output breaks the jackknife first: name what score() must return
                self._checked_scores(self.scoring.score(stats), pl_module)
                raise
            return self._checked_scores(scores, pl_module), None if errors is None else plain_scores(errors)

    def _statistics(self, trainer: Any, pl_module: nn.Module, sync: Lockstep) -> Any:
        """``capture_statistics`` on the scoring samples; keeps the scoring forward's validation loss."""
        val_batches = self.scoring_val_batches(trainer)
        train = self.scoring_train_batches(trainer)
        # the memory plan (passes, bytes, projection) is printed where the per-rewire table is
        shown = self.verbose and trainer.is_global_zero
        options = {"progress": shown, "show_plan": shown}
        if "max_store_bytes" not in self.capture_options:
            # scoring inside training: its rows may add a tenth of training's own peak memory
            options["max_store_bytes"] = training_store_bytes(pl_module.device)
        options.update(self.capture_options)
        val_losses: list[torch.Tensor] = []
        options["loss_sink"] = lambda split, losses: val_losses.append(losses) if split == "val" else None
        gather = options.get("reduce_fn", torch_distributed_gather)
        if trainer.world_size > 1 and gather is not None:
            # a rank whose loss fails leaves the pass before its next gather: the others check first
            options["reduce_fn"] = sync.guarded(gather)
        stats = capture_statistics(
            pl_module,
            train,
            val_batches,
            resolve_per_sample_loss(pl_module, self.loss_fn),
            scope=self.scope,
            **options,
        )
        # the scoring forward already computed the probe's "loss before" (same model, samples, mode)
        losses = torch.cat(val_losses).double()
        self.scored_val_loss = (int(trainer.global_step), float(losses.sum()) / max(losses.numel(), 1))
        return stats

    def _checked_scores(self, scores: Any, pl_module: nn.Module) -> dict[int, float]:
        """A scorer's output as ``{block: float}``; anything else is named with what was expected."""
        blocks = sorted(moe_layers(pl_module))
        expected = (
            f"score() must return a dict {{block_index: float}} with one finite number per block {blocks}"
        )
        if not isinstance(scores, Mapping):
            raise TypeError(
                f"scorer {self.scorer!r} returned {type(scores).__name__} ({scores!r:.80}); {expected}"
            )
        try:
            plain = plain_scores(scores)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"scorer {self.scorer!r} returned {scores!r:.120}: {exc}; {expected}") from exc
        missing = [b for b in blocks if b not in plain]
        bad = {b: v for b, v in plain.items() if not math.isfinite(v)}
        if missing or bad:
            raise ValueError(
                f"scorer {self.scorer!r} returned no score for blocks {missing} / non-finite scores {bad};"
                f" {expected}"
            )
        return plain

    # ------------------------------------------------------------------ apply -> measure
    def apply(
        self,
        trainer: Any,
        pl_module: nn.Module,
        plan: RewirePlan,
        budget: Budget | None,
        index: int,
        surgery: Surgery | None = None,
    ) -> Applied:
        """Resize to ``plan.layout`` mid-fit and measure the probe loss around it; with ``rank_fade_steps``
        the shrinking ranks are kept and start to fade instead (removed later by :meth:`remove_faded`).

        Raises:
            RewireError: a measurement before the transaction, or the transaction, failed (nothing
                changed: model, optimizers and schedulers as before). After the transaction a failed
                measurement is recorded as NaN with a warning (the model already changed: not an error).
        """
        before = layout(pl_module)
        dims = block_dims(pl_module)
        shrinking = shrinking_blocks(before, plan.layout)
        fading = shrinking if self.rank_fade_steps > 0 else {}
        with Lockstep(trainer).stage("the probe loss before the rewire"):
            self.scoring_val_batches(trainer)  # loaded before anything changes
            loss_before = self._loss_before(trainer, pl_module, plan)
            # compared with loss_before: both the probe's forward (the reused one is the same forward)
            cut = (
                self._rank_cut_disturbance(trainer, pl_module, before, shrinking, loss_before)
                if shrinking
                else None
            )
            self._ranks_agree(trainer)  # before the transaction's first collective
        first = ranks_kept(plan.layout, fading) if fading else plan.layout
        surgery = surgery or layout_surgery(self.keep_scaling)
        result = rewire(trainer, pl_module, first, seed=self.seed + int(trainer.global_step), surgery=surgery)
        if fading:
            # computed first, applied only where every rank could compute them: a rank that rotated while
            # another did not would train other coordinates from then on. Without the rotation the fade is
            # still exact (its unrotated slots go to zero), only less gentle.
            try:
                rotations, failure = fade_rotations(pl_module, fading), None
            except Exception as exc:
                rotations, failure = [], exc
            if any_rank(trainer.strategy, failure is not None):
                cause = failure or RuntimeError("it failed on another rank")
                _warn_after_rewire(
                    trainer, "rotating the fading ranks", cause, "they fade in their current basis"
                )
            else:
                start_fade(trainer.optimizers, rotations)
        loss_after = self._probe_after_rewire(trainer, pl_module)
        after = layout(pl_module)
        step = int(trainer.global_step)
        moves = None
        if shrinking:
            fade_steps = self.rank_fade_steps if fading else 0
            moves = RankMoves(
                blocks=sorted(shrinking),
                fade_steps=fade_steps,
                cut_disturbance=cut,
                disturbance=None if fading else cut,
                removal_step=None if fading else step,
            )
        record = RewireRecord(
            index=index,
            step=step,
            epoch=int(trainer.current_epoch),
            scored_at_step=plan.step,
            scores=plan.scores,
            score_errors=plan.score_errors,
            error_shrinkage=float(self.allocator_options.get("error_shrinkage", 0.0)),
            layout_before=before,
            layout_after=after,
            params_before=int(layout_params(before, dims)),
            params_after=int(layout_params(after, block_dims(pl_module))),
            budget=None if budget is None else budget.value,
            budget_unit=None if budget is None else budget.unit,
            time_scoring_s=plan.time_scoring_s,
            time_rewire_s=float(result.time_total_s),
            time_surgery_s=float(result.time_surgery_s),
            val_loss_before=loss_before,
            val_loss_after=loss_after,
            disturbance=relative_change(loss_before, loss_after),
            rank_moves=moves,
            optimizer_state=_carried(result),
        )
        return Applied(record, result.reports, fading)

    def remove_faded(self, trainer: Any, pl_module: nn.Module, target: Layout) -> Removal:
        """The faded slots are zero: apply the planned ranks and measure the loss change of that step.

        Raises:
            RewireError: the probe before the transaction, or the transaction, failed (nothing changed).
        """
        with Lockstep(trainer).stage("the probe loss before removing the faded ranks"):
            loss_before = self.probe(trainer, pl_module)
            self._ranks_agree(trainer)
        result = rewire(
            trainer,
            pl_module,
            target,
            seed=self.seed + int(trainer.global_step),
            surgery=layout_surgery(self.keep_scaling),
        )
        loss_after = self._probe_after_rewire(trainer, pl_module)
        after = layout(pl_module)
        return Removal(
            step=int(trainer.global_step),
            layout_after=after,
            params_after=int(layout_params(after, block_dims(pl_module))),
            loss_before=loss_before,
            loss_after=loss_after,
            reports=result.reports,
        )

    def _loss_before(self, trainer: Any, pl_module: nn.Module, plan: RewirePlan) -> float:
        """The scoring forward's validation loss when it is this model's probe loss, else a probe."""
        scored, self.scored_val_loss = self.scored_val_loss, None
        if (
            scored is not None
            and scored[0] == plan.step == int(trainer.global_step)
            and probe_forward_is_scoring_forward(pl_module)
        ):
            return self._rank_mean(trainer, pl_module, scored[1])  # no step since scoring
        return self.probe(trainer, pl_module)

    def _rank_cut_disturbance(
        self,
        trainer: Any,
        pl_module: nn.Module,
        before: Layout,
        shrinking: dict[int, dict[str, int]],
        loss_before: float,
    ) -> float | None:
        """Relative loss change of the rank moves alone, cut at once, on the current model (then undone)."""
        snapshot = ModuleSnapshot(pl_module)
        try:
            with torch.no_grad(), isolate_rng():
                apply_layout(pl_module, ranks_only(before, shrinking), keep_scaling=self.keep_scaling)
            loss_cut = self.probe(trainer, pl_module)
        finally:
            snapshot.restore()
        return relative_change(loss_before, loss_cut)

    def _probe_after_rewire(self, trainer: Any, pl_module: nn.Module) -> float:
        """The probe loss on the changed model, NaN (with a warning) when the probe fails: the rewire is
        applied, so raising would leave the plan pending and apply it again."""
        try:
            with Lockstep(trainer).stage("the probe loss after the rewire", "the rewire stays applied"):
                return self.probe(trainer, pl_module)
        except RewireError as exc:  # on every rank alike, so all go on training together
            _warn_after_rewire(trainer, "the probe loss after the rewire", exc, "it is recorded as NaN")
            return math.nan

    def probe(self, trainer: Any, pl_module: nn.Module) -> float:
        """Mean loss on the scoring validation samples, averaged over ranks."""
        batches = self.scoring_val_batches(trainer)
        with torch.inference_mode(False):
            value = mean_loss(pl_module, resolve_per_sample_loss(pl_module, self.loss_fn), batches)
        return self._rank_mean(trainer, pl_module, value)

    @staticmethod
    def _rank_mean(trainer: Any, pl_module: nn.Module, value: float) -> float:
        """``value`` averaged over ranks, after checking that no rank failed before getting it."""
        if trainer.world_size > 1:
            Rewiring._ranks_agree(trainer)
            value = float(
                trainer.strategy.reduce(torch.tensor(value, device=pl_module.device), reduce_op="mean")
            )
        return value

    @staticmethod
    def _ranks_agree(trainer: Any) -> None:
        """Raise :class:`RankFailure` (on every rank) if another rank's step failed since the last check."""
        Lockstep(trainer).check()

    # ------------------------------------------------------------------ scoring samples
    @staticmethod
    def training_loader(trainer: Any) -> Any:
        return data_utils.first_loader(trainer.train_dataloader)

    @staticmethod
    def validation_loader(trainer: Any) -> Any:
        loader = data_utils.first_loader(trainer.val_dataloaders)
        if loader is None:
            build_validation_loaders(trainer)
            loader = data_utils.first_loader(trainer.val_dataloaders)
            if loader is None and validation_defined(trainer):
                loader = data_utils.first_loader(validation_source_loader(trainer))
        return loader

    def scoring_train_batches(self, trainer: Any) -> list[Any]:
        """The seeded sample of ``num_train_samples`` training samples on the device (drawn afresh each
        time: the same samples while the loader's dataset is unchanged)."""
        train = data_utils.training_batches(
            self.training_loader(trainer),
            self.num_train_samples,
            self.seed + trainer.global_rank,
            self.scoring_batch_size,
        )
        return data_utils.to_device(trainer.strategy, train)

    def scoring_val_batches(self, trainer: Any) -> list[Any]:
        """The first ``num_val_samples`` validation samples on the device, loaded once per fit; built
        outside inference mode so the scoring passes can differentiate through them."""
        if self.val_batches is None:
            with torch.inference_mode(False):
                batches = data_utils.validation_batches(
                    self.validation_loader(trainer), self.num_val_samples, self.scoring_batch_size
                )
                self.val_batches = data_utils.to_device(trainer.strategy, batches)
        return self.val_batches


def _warn_after_rewire(trainer: Any, what: str, error: BaseException, consequence: str) -> None:
    rank_zero_warn(
        f"LayerInfluenceCallback: the rewire at global step {trainer.global_step} is applied, but "
        f"{what} failed ({type(error).__name__}: {error}); {consequence}."
    )


def _carried(result: RewireResult) -> dict[str, int]:
    """How many parameters' optimizer state the rewire kept, mapped to new shapes, or reset."""
    return {
        "kept": len(result.carry.kept),
        "mapped": len(result.carry.mapped),
        "reset": len(result.carry.reset),
    }


def probe_forward_is_scoring_forward(model: nn.Module) -> bool:
    """Whether the disturbance probe's forward computes what the scoring forward computed, so the scored
    validation loss can stand in for the probe's "loss before".

    Scoring (a capture_hook on every layer) always runs the dense path in the parameters' dtype; outside
    it `path="auto"` may compute bf16 adapters in float32 (CPU without native bf16) or take the grouped
    path, whose rounding differs by ~1e-3 in bf16: as large as the disturbances being measured. Those
    layers get a probe forward instead.
    """
    for layer in named_moe_layers(model).values():
        if layer.has_adapter and (layer.use_grouped() or layer.compute_dtype() != layer.lora_A.dtype):
            return False
    return True
