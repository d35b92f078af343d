"""``LayerInfluenceCallback``: score blocks mid-fit, reallocate experts/ranks, rewire, keep training.

The Lightning side only: hooks, triggers (``schedule``), the checkpointed state (``callbacks/state.py``)
and the ``on_error`` policy. What a rewire does (score -> allocate -> apply -> measure) is the plain
:class:`~layermoe.callbacks.rewiring.Rewiring` object, which raises ``RewireError`` and returns records.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from layermoe.adapters import layout, moe_layers
from layermoe.allocation import AllocationError, Budget
from layermoe.callbacks.distributed import check_strategy
from layermoe.callbacks.dry_run import check_validation_data
from layermoe.callbacks.errors import CallbackConfigError, RewireError
from layermoe.callbacks.growing import Growing, resume_growth_conflict
from layermoe.callbacks.growth_options import GrowthOptions, check_growth_settings, growth_schedule
from layermoe.callbacks.loading import checked_inject_config, inject_adapters
from layermoe.callbacks.rank_fade import fade_step, new_fade
from layermoe.callbacks.report import publish
from layermoe.callbacks.rewiring import Rewiring, RewiringSetting, block_dims
from layermoe.callbacks.schedule import RewireSchedule
from layermoe.callbacks.state import (
    FADE_REMOVAL,
    INJECT_KEY,
    CallbackState,
    resume_budget_conflict,
    resume_inject_conflict,
    resume_keep_scaling_conflict,
)
from layermoe.layout import LAYOUT_KEY, normalize_layout
from layermoe.lightning_compat import (
    callback_state_key,
    is_last_training_batch,
    validation_due_after_this_batch,
)

_ON_ERROR = ("raise", "skip")


class LayerInfluenceCallback(Callback):
    """Reallocate MoE-LoRA capacity (experts, rank per block) during ``fit`` from per-block influence.

    Add it to any ``Trainer`` whose LightningModule contains ``MoELoRALinear`` layers (or pass ``inject=``)::

        trainer = Trainer(callbacks=[LayerInfluenceCallback(scorer="layerif", schedule={"warmup": 0.3})])

    At the scheduled time the callback scores every block on the first ``num_val_samples`` validation
    samples (dataset order) and a seeded sample of ``num_train_samples`` training samples (outside inference mode, with
    the training RNG untouched and no ``.grad`` left behind), turns the scores into a layout under the
    budget, and, right after an optimizer step, resizes the layers, rebuilds the optimizers through the
    module's ``configure_optimizers`` (state carried over), continues the LR schedulers, and re-wraps DDP.

    Args:
        scorer: registry name in ``layermoe.scoring`` (``"layerif"``, ``"curvature_gain"``, ``"grad_norm"``,
            ``"alpha_hill"``, ``"uniform"``, or one registered with ``register_scorer``).
        scorer_options: keyword options for the scorer.
        allocator: allocation method of ``layermoe.allocation.allocate`` (``"power_law"`` or ``"mdl"``).
        allocator_options: keyword options for ``allocate`` (method options, bounds, ...). Default: blocks keep
            at least one expert (``experts_bounds`` ``[1, null]``), and, for scorers with standard errors,
            ``error_shrinkage: 1`` (give ``error_shrinkage: 0`` to allocate from the raw scores).
        budget: ``"current"`` (default: the adapter parameter count of the starting layout, fixed at the
            first fit and kept on resume), ``"params:P"``, ``"total_experts:T"``, a dict or a ``Budget``.
        schedule: a :class:`RewireSchedule` or dict ``{warmup, every, max_rewires, interval}``;
            default: once, after 30% of the optimizer steps.
        num_train_samples: training samples drawn (seeded) for scoring.
        num_val_samples: leading validation samples used for scoring and for the disturbance probe.
        scoring_batch_size: batch size of the scoring passes (default: the loader's).
        seed: seed of the training sample (rank ``r`` uses ``seed + r``).
        loss_fn: ``loss_fn(model, batch) -> (B,)`` per-sample loss, used when the module has no
            ``per_sample_loss(batch)``; default: the built-in loss of the model's head
            (:func:`layermoe.scoring.default_per_sample_loss`; dict batches only). Batches reach the
            loss as the loaders yield them (any structure), cut into samples along the leading dimension.
        scope: ``"adapter"`` (score the adapters' gradients) or ``"base"``.
        capture_options: extra keyword options for ``capture_statistics``.
        inject: a ``MoELoRAConfig`` dict: adapters are added in ``setup`` to a module that has none.
            Reload such checkpoints with :func:`layermoe.callbacks.load_adapted_checkpoint`.
        plot: save a PNG per rewire under ``<log_dir>/layermoe`` and add it to TensorBoard.
        verbose: print a table per rewire (rank zero).
        log_prefix: prefix of the logged metric names.
        error_groups: groups of the jackknife that gives each score a standard error (scorers that read
            statistics; no extra backward pass); 0 turns error bars off. ``allocator_options``'
            ``error_shrinkage: k`` shrinks scores toward their mean by k standard errors before allocating.
        rank_fade_steps: 0 cuts lowered ranks at the rewire (truncation); F > 0 fades the directions to
            drop to zero over the next F optimizer steps and drops them then, function-preservingly
            (:mod:`layermoe.callbacks.rank_fade`).
        on_error: what a failed scoring pass, allocation or surgery does mid-fit. ``"raise"`` (default:
            a failure is never silent) stops the fit with ``RewireError``; ``"skip"`` warns, logs
            ``<log_prefix>/rewire_failures``, records the failure in the callback's state, and trains on
            without that rewire (its schedule slot is used up). Either way the model, optimizer and LR
            schedulers are exactly as before the attempt.
        growth: ``None`` (default): rewire mode, capacity moves between blocks under the budget. A
            :class:`GrowthOptions` or dict (``{rounds, initial_fraction, init, control,
            router_ratio}``): growth mode, capacity is only added. The fit starts from an even layout at
            ``initial_fraction`` of the resolved parameter budget (the model is resized before the
            optimizer is built, at the first fit only) and each of the ``rounds`` schedule slots adds the
            round's share of the rest where the scores (and their errors) favour, function-preservingly
            (``callbacks/growing.py``). ``rounds`` is the schedule's count: ``schedule.every`` is needed for
            more than one round and ``schedule.max_rewires``, if given, must equal ``rounds``.
        keep_scaling: how every rank change (rewires, rank-cut probes, growth and its starting resize)
            scales. ``False`` (default): the layer's ``lora_alpha`` stays and the old B columns are rescaled
            by r'/r (exact in function), so the scaling becomes ``lora_alpha / r'`` and under Adam the old
            directions' step changes by r/r'. ``True``: the layer's own ``lora_alpha`` moves by r'/r (kept in
            checkpoints), so each block keeps the configured scaling and its old directions' step size: a
            rank change alone does not change how fast a block learns.

    Raises:
        CallbackConfigError: bad arguments (here) or unusable trainer/module (in ``setup``/``on_fit_start``,
            before training): unsupported strategy (FSDP/DeepSpeed/model-parallel), no MoE-LoRA layers
            and no ``inject``, no validation data, a fractional warm-up on a run of unknown length, or a
            per-sample loss that fails the dry run on two samples (see ``callbacks/dry_run.py``).
        RewireError: scoring/allocation/surgery failed mid-fit; model and optimizer were restored first.
    """

    def __init__(
        self,
        scorer: str = "layerif",
        scorer_options: dict[str, Any] | None = None,
        allocator: str = "power_law",
        allocator_options: dict[str, Any] | None = None,
        budget: Any = "current",
        schedule: RewireSchedule | dict[str, Any] | None = None,
        num_train_samples: int = 128,
        num_val_samples: int = 64,
        scoring_batch_size: int | None = None,
        seed: int = 0,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        scope: str = "adapter",
        capture_options: dict[str, Any] | None = None,
        inject: dict[str, Any] | None = None,
        plot: bool = True,
        verbose: bool = True,
        log_prefix: str = "layermoe",
        error_groups: int = 10,
        rank_fade_steps: int = 0,
        on_error: str = "raise",
        growth: GrowthOptions | dict[str, Any] | None = None,
        keep_scaling: bool = False,
    ) -> None:
        super().__init__()
        self.rewiring = Rewiring(
            scorer=scorer,
            scorer_options=scorer_options,
            allocator=allocator,
            allocator_options=allocator_options,
            num_train_samples=num_train_samples,
            num_val_samples=num_val_samples,
            scoring_batch_size=scoring_batch_size,
            seed=seed,
            loss_fn=loss_fn,
            scope=scope,
            capture_options=capture_options,
            error_groups=error_groups,
            rank_fade_steps=rank_fade_steps,
            verbose=verbose,
            keep_scaling=keep_scaling,
        )
        self.budget = _parsed_budget(budget)
        self.schedule = RewireSchedule.coerce(schedule)
        options = GrowthOptions.coerce(growth)
        #: growth mode's steps (None: rewire mode); ``growth`` reads its options
        self.growing: Growing | None = None
        if options is not None:
            check_growth_settings(self.budget, rank_fade_steps)
            self.schedule = growth_schedule(options, self.schedule)
            self.growing = Growing(options, self.rewiring)
        self.inject = checked_inject_config(inject)
        self.plot, self.log_prefix = bool(plot), str(log_prefix)
        if on_error not in _ON_ERROR:
            raise CallbackConfigError(f"on_error={on_error!r}: must be one of {_ON_ERROR}")
        self.on_error = on_error
        self.state = CallbackState(inject=self.inject)
        #: ``ResizeReport`` list of the last rewire (what changed, exactness, optimizer-state maps).
        self.last_reports: list[Any] = []

    # per fit, not checkpointed: set by the hooks
    _trainer: Trainer | None = None
    _warmup_units: int | None = None
    _step_at_batch_start: int | None = None
    _validated_at_step: int | None = None

    # the scoring and allocation arguments live on ``self.rewiring`` (one copy, checked there)
    scorer = RewiringSetting()
    scorer_options = RewiringSetting()
    _scorer = RewiringSetting("scoring")
    allocator = RewiringSetting()
    allocator_options = RewiringSetting()
    num_train_samples = RewiringSetting(minimum=1)
    num_val_samples = RewiringSetting(minimum=1)
    scoring_batch_size = RewiringSetting()
    seed = RewiringSetting()
    loss_fn = RewiringSetting()
    scope = RewiringSetting()
    capture_options = RewiringSetting()
    error_groups = RewiringSetting()
    rank_fade_steps = RewiringSetting()
    verbose = RewiringSetting()
    keep_scaling = RewiringSetting()

    @property
    def growth(self) -> GrowthOptions | None:
        """The growth options (None: rewire mode); fixed at construction, like the schedule they shape."""
        return None if self.growing is None else self.growing.options

    # ------------------------------------------------------------------ Lightning state
    @property
    @override
    def state_key(self) -> str:
        return callback_state_key(self, scorer=self.scorer, allocator=self.allocator)

    @override
    def state_dict(self) -> dict[str, Any]:
        state = self.state.to_dict()
        state["validation_follows"] = self._validation_follows()
        return state

    def _validation_follows(self) -> int | None:
        """Completed epochs when this save happens at a training batch end that a validation follows.

        A checkpoint written there (``ModelCheckpoint(every_n_train_steps=...)``, ``last.ckpt``) precedes
        the validation; Lightning's resume fast-forwards past it without running it, so an
        epoch-interval trigger due at that validation end would be lost (or move to a later one).
        """
        trainer = self._trainer
        if (
            trainer is None
            or trainer.state.fn != TrainerFn.FITTING
            or trainer.sanity_checking
            or trainer.validating
            or self._validated_at_step == trainer.global_step
        ):
            return None
        if not validation_due_after_this_batch(trainer):
            return None
        return _epochs_done(trainer)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Store only; the pending plan is applied at the next optimizer step, the budget is reused."""
        self.state = CallbackState.from_dict(state_dict)  # its inject is checked in on_fit_start

    @override
    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Every checkpoint carries the layout as plain data, whatever the module (inspection, reloading),
        and the ``inject=`` config under a fixed key (``load_adapted_checkpoint`` reads it)."""
        checkpoint[LAYOUT_KEY] = normalize_layout(layout(pl_module))
        if self.inject is not None:
            checkpoint[INJECT_KEY] = dict(self.inject)

    @override
    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Refuse a checkpoint whose influence-callback state was written under another scorer/allocator:
        Lightning would drop that state (a warning only) and the rewires would start over."""
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        others = [k for k in states if str(k).startswith(type(self).__name__)]
        if others:
            raise CallbackConfigError(
                f"the checkpoint holds the state of {others[0]} but this callback is {self.state_key}: its"
                " rewire progress, pending plan and budget would be dropped. Resume with the same scorer and"
                " allocator, or start a new run without --ckpt_path"
            )

    # ------------------------------------------------------------------ setup and checks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer
        callbacks = getattr(trainer, "callbacks", [])
        others = [cb for cb in callbacks if isinstance(cb, LayerInfluenceCallback) and cb is not self]
        if others:
            raise CallbackConfigError(
                f"the Trainer has {len(others) + 1} LayerInfluenceCallbacks: one callback allocates every"
                " block, and two would rewire the same adapters twice. Keep one in Trainer(callbacks=[...])"
                " (trainer.callbacks in a config)."
            )
        if stage == TrainerFn.FITTING:
            check_strategy(trainer.strategy)
        if self.inject is not None and not moe_layers(pl_module):
            inject_adapters(pl_module, self.inject)
        if stage == TrainerFn.FITTING and self.growing is not None and self.state.growth is None:
            # before the optimizer is built; on resume the checkpoint's layout then replaces this one
            # (the module resizes before its weights load) and its state brings the growth plan
            budget = self._resolved_budget(pl_module)
            self.state.growth = self.growing.start(pl_module, budget)
            self.state.keep_budget(budget)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Check everything a rewire will need, so a bad setup fails before the first step."""
        if not moe_layers(pl_module):
            raise CallbackConfigError(
                f"{type(pl_module).__name__} has no MoE-LoRA layers: adapt the model with "
                "layermoe.adapters.inject(model, MoELoRAConfig(...)) or pass LayerInfluenceCallback(inject={...})"
            )
        check_validation_data(trainer, epoch_trigger=self.schedule.interval == "epoch")
        self._warmup_units = self._checked_warmup(trainer)
        kept = self.state.resolved_budget
        if kept is not None and (conflict := resume_budget_conflict(kept, self.budget)):
            raise CallbackConfigError(conflict)
        if conflict := resume_inject_conflict(self.state.inject, self.inject):
            raise CallbackConfigError(conflict)
        if conflict := resume_growth_conflict(self.state.growth, self.growing):
            raise CallbackConfigError(conflict)
        if conflict := resume_keep_scaling_conflict(self.state.keep_scaling, self.keep_scaling):
            raise CallbackConfigError(conflict)
        self._check_rounds_fit_the_run(trainer)
        self.state.inject = self.inject
        self.state.keep_scaling = self.keep_scaling
        if kept is None:
            self.state.keep_budget(self._resolved_budget(pl_module))
        if self.state.plans_made < self.schedule.limit:
            self._check_budget_fits(pl_module)
        self.rewiring.start_fit()
        self.rewiring.dry_run(trainer, pl_module)

    def _run_units(self, trainer: Trainer) -> float | None:
        """The run's length in schedule units (optimizer steps or epochs), None when unknown."""
        total = trainer.estimated_stepping_batches if self.schedule.interval == "step" else trainer.max_epochs
        return None if total is None or total < 0 else float(total)

    def _checked_warmup(self, trainer: Trainer) -> int:
        """``schedule.warmup`` in optimizer steps or epochs; a warm-up as long as the run fails here."""
        total = self._run_units(trainer)
        units = self.schedule.warmup_units(total)
        if self.state.plans_made == 0 and total is not None and math.isfinite(total) and units >= total:
            unit = "optimizer steps" if self.schedule.interval == "step" else "epochs"
            raise CallbackConfigError(
                f"schedule.warmup resolves to {units} {unit} but the run has only {int(total)}: no "
                "rewire would happen; lower schedule.warmup or lengthen the run"
            )
        return units

    def _check_rounds_fit_the_run(self, trainer: Trainer) -> None:
        """Growth: the last round's slot must come before the run ends, or its share of the budget would
        silently never be placed (nor trained)."""
        total, growth = self._run_units(trainer), self.growth
        if (
            growth is None
            or self.state.plans_made >= growth.rounds
            or total is None
            or not math.isfinite(total)
        ):
            return
        last = self.schedule.due_at(growth.rounds - 1, self._warmup_units or 0)
        if last >= total:
            unit = "optimizer steps" if self.schedule.interval == "step" else "epochs"
            raise CallbackConfigError(
                f"growth.rounds={growth.rounds}: the last round would come after {last} {unit} (schedule.warmup"
                f" {self._warmup_units} + {growth.rounds - 1} x schedule.every {self.schedule.every}) but the"
                f" run has only {int(total)}, so part of the budget would never be placed and trained; lower"
                " growth.rounds or schedule.every, or lengthen the run"
            )

    def _resolved_budget(self, pl_module: LightningModule) -> Budget:
        return self.budget.resolve(layout(pl_module), block_dims(pl_module))

    def _check_budget_fits(self, pl_module: LightningModule) -> None:
        """Allocate once on equal scores: an impossible budget or bounds fail here, not at the rewire."""
        if self.growing is not None:
            self.growing.check_fits(pl_module, self.state.growth, self.state.plans_made)
            return
        current = layout(pl_module)
        try:
            # zero errors: error_shrinkage (an allocator option) is checked but leaves equal scores be
            equal, zero = dict.fromkeys(current, 1.0), dict.fromkeys(current, 0.0)
            self.rewiring.allocate(pl_module, equal, zero, self.state.resolved_budget)
        except AllocationError as exc:
            raise CallbackConfigError(
                f"budget={str(self.budget)!r} / allocator_options cannot be met by any layout of the"
                f" {len(current)} adapted blocks: {exc}"
            ) from exc

    # ------------------------------------------------------------------ triggers
    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``schedule.warmup=0`` on the step interval: allocate before the first optimizer step.

        This is the published methods' one-shot allocation (LayerIF, AlphaLoRA) run from inside the fit:
        nothing has been accumulated yet, so applying the plan here is as safe as after a step.

        Resumed from a checkpoint written right before a validation (which Lightning skips on resume),
        the validation-end trigger of an epoch schedule runs here instead, on the same weights.
        """
        skipped, self.state.validation_follows = self.state.validation_follows, None
        if skipped is not None:
            self._epoch_trigger(trainer, pl_module, skipped)
        if (
            self.schedule.interval == "step"
            and (self._warmup_units or 0) == 0
            and self.state.plans_made == 0
            and self.state.pending is None
            and trainer.global_step == 0
        ):
            self._score_and_plan(trainer, pl_module)
            if self.state.pending is not None:
                self._apply_pending(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_at_batch_start = trainer.global_step

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stepped = self._step_at_batch_start is not None and trainer.global_step > self._step_at_batch_start
        if not stepped:
            return
        if self.state.fade is not None:  # a gentle rank shrink in progress: no new plan until it is done
            if fade_step(pl_module, self.state.fade):
                self._finish_fade(trainer, pl_module)
            return
        if (
            self.state.pending is None
            and self.schedule.interval == "step"
            and self.schedule.is_due(trainer.global_step, self.state.plans_made, self._warmup_units or 0)
        ):
            self._score_and_plan(trainer, pl_module)
        if self.state.pending is not None:
            self._apply_pending(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        self._validated_at_step = trainer.global_step
        self._epoch_trigger(trainer, pl_module, _epochs_done(trainer))

    def _epoch_trigger(self, trainer: Trainer, pl_module: LightningModule, epochs_done: int) -> None:
        """At a validation end (or its replay on resume): plan when the epoch schedule is due."""
        if self.schedule.interval != "epoch" or self.state.pending is not None or self.state.fade is not None:
            return
        if self.schedule.is_due(epochs_done, self.state.plans_made, self._warmup_units or 0):
            self._score_and_plan(trainer, pl_module)

    # ------------------------------------------------------------------ plan, apply, record
    def _score_and_plan(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Score (reduced over ranks), allocate on rank 0, broadcast, store as the pending plan."""
        growing, slot = self.growing, self.state.plans_made
        allocate = None if growing is None else growing.allocator(self.state.growth, slot)
        try:
            plan = self.rewiring.plan(trainer, pl_module, self.state.resolved_budget, allocate)
        except RewireError as exc:
            self._failed(trainer, "scoring", exc)
            return
        plan.growth_round = None if growing is None else slot
        self.state.pending = plan.to_dict()

    def _apply_pending(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Apply the pending plan right after an optimizer step; record, log, draw and print it."""
        plan = self.state.plan
        assert plan is not None
        step = self.rewiring if self.growing is None else self.growing
        try:
            applied = step.apply(
                trainer, pl_module, plan, self.state.resolved_budget, index=self.state.rewires_done
            )
        except RewireError as exc:
            self._failed(trainer, "rewire", exc)
            return
        self.last_reports = applied.reports
        entry = applied.record.to_dict()
        if self.growing is not None:
            self.growing.record(self.state.growth, entry, plan, pl_module)
        self.state.history.append(entry)
        self.state.rewires_done += 1
        self.state.pending = None
        if applied.fading:
            index = len(self.state.history) - 1
            self.state.fade = new_fade(applied.fading, self.rank_fade_steps, plan.layout, index)
        publish(trainer, self.log_prefix, entry, plot=self.plot, verbose=self.verbose)

    def _finish_fade(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The faded slots are zero: apply the planned ranks and complete the rewire's history entry."""
        fade = self.state.fade
        assert fade is not None
        try:
            removal = self.rewiring.remove_faded(trainer, pl_module, fade["target"])
        except RewireError as exc:
            self._failed(trainer, FADE_REMOVAL, exc)
            # on_error="skip": the faded slots stay (zero, so harmless) and training goes on without them
            self.state.fade = None
            return
        self.last_reports = removal.reports
        entry = self.state.history[fade["history_index"]]
        removal.complete(entry)
        self.state.fade = None
        publish(trainer, self.log_prefix, entry, plot=False, verbose=self.verbose)

    def _failed(self, trainer: Trainer, stage: str, error: RewireError) -> None:
        """``on_error="raise"``: re-raise; ``"skip"``: record, warn, log, and let training go on."""
        if self.on_error == "raise":
            raise error
        self.state.pending = None
        self.state.failures.append({"step": int(trainer.global_step), "stage": stage, "error": str(error)})
        rank_zero_warn(
            f"LayerInfluenceCallback: rewire skipped at global step {trainer.global_step} ({error});"
            " on_error='skip': the model and optimizer are unchanged and training goes on."
        )
        for logger in trainer.loggers:
            logger.log_metrics(
                {f"{self.log_prefix}/rewire_failures": float(len(self.state.failures))},
                step=trainer.global_step,
            )

    # ------------------------------------------------------------------ public helpers
    @property
    def history(self) -> list[dict[str, Any]]:
        """One plain dict per applied rewire (layouts, scores, params, timings, disturbance)."""
        return self.state.history


def _epochs_done(trainer: Trainer) -> int:
    """Completed epochs, counting the current one once its last training batch has run."""
    return trainer.current_epoch + (1 if is_last_training_batch(trainer) else 0)


def _parsed_budget(budget: Any) -> Budget:
    try:
        return Budget.parse(budget)
    except ValueError as exc:
        raise CallbackConfigError(f"budget={budget!r}: {exc}") from exc
