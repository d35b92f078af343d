"""``LayerInfluenceCallback``: score blocks mid-fit, reallocate experts/ranks, rewire, keep training.

Orchestration only: statistics and scorers live in :mod:`layermoe.scoring`, the allocation program in
:mod:`layermoe.allocation`, the resize operations in :mod:`layermoe.adapters`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import nn

from layermoe.adapters import MoELoRAConfig, apply_layout, inject, layout, moe_layers, named_moe_layers
from layermoe.allocation import METHODS, AllocationError, Budget, allocate, check_method_options
from layermoe.callbacks import data as data_utils
from layermoe.callbacks.distributed import any_rank, broadcast, check_strategy, mean_scores
from layermoe.callbacks.dry_run import dry_run
from layermoe.callbacks.errors import CallbackConfigError, RewireError
from layermoe.callbacks.rank_fade import fade_step, ranks_kept, ranks_only, shrinking_blocks, start_fade
from layermoe.callbacks.report import log_rewire, print_table, save_and_log_figure
from layermoe.callbacks.rewire import rewire
from layermoe.callbacks.schedule import RewireSchedule
from layermoe.callbacks.scoring_pass import PerSampleLoss, mean_loss, resolve_per_sample_loss, scoring_context
from layermoe.callbacks.state import CallbackState, RewirePlan, plain_scores, resume_budget_conflict
from layermoe.callbacks.transaction import ModuleSnapshot
from layermoe.layout import LAYOUT_KEY, BlockDims, Layout, is_int_at_least, layout_params, normalize_layout
from layermoe.lightning_compat import (
    validation_defined,
    validation_due_after_this_batch,
    validation_source_loader,
)
from layermoe.scoring import capture_statistics, get_scorer, torch_distributed_gather, training_store_bytes

_SCOPES = ("adapter", "base")
_ON_ERROR = ("raise", "skip")
#: ``allocator_options.error_shrinkage`` when not given, for scorers with standard errors (issue 27's sweep)
DEFAULT_ERROR_SHRINKAGE = 1.0


def _check_count(name: str, value: Any, minimum: int) -> int:
    if not is_int_at_least(value, minimum):
        raise CallbackConfigError(f"{name}={value!r}: must be an int >= {minimum}")
    return value


def _check_options(name: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise CallbackConfigError(f"{name}={value!r}: must be a dict of keyword options (str keys) or None")
    return dict(value)


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
    ) -> None:
        super().__init__()
        self.scorer_options = _check_options("scorer_options", scorer_options)
        if not isinstance(scorer, str):
            raise CallbackConfigError(f"scorer={scorer!r}: give a registry name such as 'layerif'")
        try:
            self._scorer = get_scorer(scorer, **self.scorer_options)
        except KeyError as exc:
            raise CallbackConfigError(f"scorer={scorer!r}: {exc.args[0]}") from exc
        except (TypeError, ValueError) as exc:
            raise CallbackConfigError(
                f"scorer_options={self.scorer_options!r} for {scorer!r}: {exc}"
            ) from exc
        self.scorer = scorer
        self.allocator = allocator
        self.allocator_options = _check_options("allocator_options", allocator_options)
        self._check_allocator()
        try:
            self.budget = Budget.parse(budget)
        except ValueError as exc:
            raise CallbackConfigError(f"budget={budget!r}: {exc}") from exc
        self.schedule = RewireSchedule.coerce(schedule)
        self.num_train_samples = _check_count("num_train_samples", num_train_samples, 1)
        self.num_val_samples = _check_count("num_val_samples", num_val_samples, 1)
        if scoring_batch_size is not None:
            _check_count("scoring_batch_size", scoring_batch_size, 1)
        self.scoring_batch_size = scoring_batch_size
        self.seed = _check_count("seed", seed, 0)
        if loss_fn is not None and not callable(loss_fn):
            raise CallbackConfigError(
                f"loss_fn={loss_fn!r}: must be callable as loss_fn(model, batch) -> (B,)"
            )
        self.loss_fn = loss_fn
        if scope not in _SCOPES:
            raise CallbackConfigError(f"scope={scope!r}: must be one of {_SCOPES}")
        self.scope = scope
        self.capture_options = _check_options("capture_options", capture_options)
        self.inject = self._check_inject(inject)
        self.plot = bool(plot)
        self.verbose = bool(verbose)
        self.log_prefix = str(log_prefix)
        self.rank_fade_steps = _check_count("rank_fade_steps", rank_fade_steps, 0)
        self.error_groups = _check_count("error_groups", error_groups, 0)
        if self.error_groups == 1:
            raise CallbackConfigError(
                "error_groups=1: a jackknife needs >= 2 groups (0 turns error bars off)"
            )
        has_errors = getattr(self._scorer, "needs_statistics", True) and self.error_groups >= 2
        if "error_shrinkage" not in self.allocator_options and has_errors:
            # the budget sweep's default (BENCHMARKS.md): move capacity only as far as the scores differ
            # beyond their noise; moves within it cost quality and bought none
            self.allocator_options = {**self.allocator_options, "error_shrinkage": DEFAULT_ERROR_SHRINKAGE}
        shrinkage = self.allocator_options.get("error_shrinkage", 0)
        if shrinkage and not has_errors:
            raise CallbackConfigError(
                f"allocator_options.error_shrinkage={shrinkage!r} needs standard errors, but scorer "
                f"{scorer!r} reads no statistics or error_groups=0: use a statistics scorer with error_groups >= 2, "
                "or drop error_shrinkage"
            )
        if on_error not in _ON_ERROR:
            raise CallbackConfigError(f"on_error={on_error!r}: must be one of {_ON_ERROR}")
        self.on_error = on_error

        self.state = CallbackState(inject=self.inject)
        self._warmup_units: int | None = None
        self._step_at_batch_start: int | None = None
        self._val_batches: list[Any] | None = None
        #: (global step, mean val loss) from the last scoring forward: the rewire's "loss before"
        self._scored_val_loss: tuple[int, float] | None = None
        self._trainer: Trainer | None = None
        self._validated_at_step: int | None = None
        #: ``ResizeReport`` list of the last rewire (what changed, exactness, optimizer-state maps).
        self.last_reports: list[Any] = []

    # ------------------------------------------------------------------ validation of arguments
    def _check_allocator(self) -> None:
        if self.allocator not in METHODS:
            raise CallbackConfigError(f"allocator={self.allocator!r}: use one of {list(METHODS)}")
        try:
            check_method_options(self.allocator, self.allocator_options)
        except AllocationError as exc:
            raise CallbackConfigError(f"allocator_options: {exc}") from exc

    @staticmethod
    def _check_inject(inject: Any) -> dict[str, Any] | None:
        if inject is None:
            return None
        if isinstance(inject, MoELoRAConfig):
            return inject.to_dict()
        if not isinstance(inject, Mapping):
            raise CallbackConfigError(
                f"inject={inject!r}: give a MoELoRAConfig dict, e.g. {{'experts': 4, 'rank': 8}}"
            )
        try:
            return MoELoRAConfig.from_dict(dict(inject)).to_dict()
        except (TypeError, ValueError) as exc:
            raise CallbackConfigError(f"inject: {exc}") from exc

    # ------------------------------------------------------------------ Lightning state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(scorer=self.scorer, allocator=self.allocator)

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
        return trainer.current_epoch + (1 if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch else 0)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Store only; the pending plan is applied at the next optimizer step, the budget is reused."""
        self.state = CallbackState.from_dict(state_dict)
        if self.state.inject is None:
            self.state.inject = self.inject

    # ------------------------------------------------------------------ setup
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
            try:
                inject(pl_module, MoELoRAConfig.from_dict(self.inject))
            except ValueError as exc:
                raise CallbackConfigError(
                    f"inject={self.inject!r} could not adapt {type(pl_module).__name__}: {exc}. The model must "
                    "exist when the callback's setup runs (build it in __init__, not in configure_model)"
                ) from exc
            # load_from_checkpoint runs no callbacks: say how to reload before anyone tries
            name = type(pl_module).__name__
            rank_zero_info(
                f"LayerInfluenceCallback added MoE-LoRA adapters to {name}; reload its checkpoints with "
                f"layermoe.callbacks.load_adapted_checkpoint({name}, path) ({name}.load_from_checkpoint runs no "
                "callbacks and fails on the adapter keys)"
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Check everything a rewire will need, so a bad setup fails before the first step."""
        if not moe_layers(pl_module):
            raise CallbackConfigError(
                f"{type(pl_module).__name__} has no MoE-LoRA layers: adapt the model with "
                "layermoe.adapters.inject(model, MoELoRAConfig(...)) or pass LayerInfluenceCallback(inject={...})"
            )
        if not validation_defined(trainer):
            raise CallbackConfigError(
                "LayerInfluenceCallback scores on validation data: define val_dataloader() on the "
                "LightningModule or its DataModule"
            )
        if not self._has_validation_samples(trainer):
            raise CallbackConfigError(
                "LayerInfluenceCallback scores on validation data, but the validation dataloader is empty"
                " (e.g. TextDataModule(val_size=0) and no val_file): give validation rows (data.val_size > 0"
                " or data.val_file)"
            )
        if self.schedule.interval == "epoch" and trainer.limit_val_batches == 0:
            raise CallbackConfigError(
                "schedule.interval='epoch' triggers at validation end, but Trainer(limit_val_batches=0) disables "
                "validation: use interval='step' or enable validation"
            )
        total = trainer.estimated_stepping_batches if self.schedule.interval == "step" else trainer.max_epochs
        total = None if total is None or total < 0 else float(total)
        self._warmup_units = self.schedule.warmup_units(total)
        if (
            self.state.plans_made == 0
            and total is not None
            and math.isfinite(total)
            and self._warmup_units >= total
        ):
            unit = "optimizer steps" if self.schedule.interval == "step" else "epochs"
            raise CallbackConfigError(
                f"schedule.warmup resolves to {self._warmup_units} {unit} but the run has only {int(total)}: no "
                "rewire would happen; lower schedule.warmup or lengthen the run"
            )
        kept = self.state.resolved_budget
        if kept is not None and (conflict := resume_budget_conflict(kept, self.budget)):
            raise CallbackConfigError(conflict)
        if kept is None:
            self.state.keep_budget(self.budget.resolve(layout(pl_module), self._block_dims(pl_module)))
        if self.state.plans_made < self.schedule.limit:
            self._check_budget_fits(pl_module)
        self._val_batches = None
        self._scored_val_loss = None
        dry_run(
            trainer,
            pl_module,
            self.loss_fn,
            scope=self.scope,
            capture_options=self.capture_options,
            needs_gradients=getattr(self._scorer, "needs_statistics", True),
            num_train_samples=self.num_train_samples,
            num_val_samples=self.num_val_samples,
            seed=self.seed + trainer.global_rank,
        )

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Every checkpoint carries the layout as plain data, whatever the module (inspection, reloading)."""
        checkpoint[LAYOUT_KEY] = normalize_layout(layout(pl_module))

    def _check_budget_fits(self, pl_module: LightningModule) -> None:
        """Allocate once on equal scores: an impossible budget or bounds fail here, not at the rewire."""
        current = layout(pl_module)
        try:
            allocate(
                dict.fromkeys(current, 1.0),
                method=self.allocator,
                budget=self.state.resolved_budget,
                current_layout=current,
                block_dims=self._block_dims(pl_module),
                # zero errors: error_shrinkage (an allocator option) is checked but leaves equal scores be
                score_errors=dict.fromkeys(current, 0.0),
                **self.allocator_options,
            )
        except AllocationError as exc:
            raise CallbackConfigError(
                f"budget={str(self.budget)!r} / allocator_options cannot be met by any layout of the"
                f" {len(current)} adapted blocks: {exc}"
            ) from exc

    @staticmethod
    def _has_validation_samples(trainer: Trainer) -> bool:
        """Whether the validation loader the scoring pass will read has at least one row."""
        loader = data_utils.first_loader(validation_source_loader(trainer))
        if loader is None:
            return False
        dataset = getattr(loader, "dataset", None)
        return not (dataset is not None and hasattr(dataset, "__len__") and len(dataset) == 0)

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

    # ------------------------------------------------------------------ triggers
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

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_at_batch_start = trainer.global_step

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

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        self._validated_at_step = trainer.global_step
        epochs_done = trainer.current_epoch + (
            1 if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch else 0
        )
        self._epoch_trigger(trainer, pl_module, epochs_done)

    def _epoch_trigger(self, trainer: Trainer, pl_module: LightningModule, epochs_done: int) -> None:
        """At a validation end (or its replay on resume): plan when the epoch schedule is due."""
        if self.schedule.interval != "epoch" or self.state.pending is not None or self.state.fade is not None:
            return
        if self.schedule.is_due(epochs_done, self.state.plans_made, self._warmup_units or 0):
            self._score_and_plan(trainer, pl_module)

    # ------------------------------------------------------------------ scoring and planning
    @staticmethod
    def _block_dims(pl_module: nn.Module) -> BlockDims:
        return {
            b: [(int(layer.in_features), int(layer.out_features)) for _, layer in sorted(mods.items())]
            for b, mods in moe_layers(pl_module).items()
        }

    def _training_loader(self, trainer: Trainer) -> Any:
        return data_utils.first_loader(trainer.train_dataloader)

    def _validation_loader(self, trainer: Trainer) -> Any:
        loader = data_utils.first_loader(trainer.val_dataloaders)
        if loader is None:
            trainer.fit_loop.epoch_loop.val_loop.setup_data()
            loader = data_utils.first_loader(trainer.val_dataloaders)
            if loader is None and validation_defined(trainer):
                loader = data_utils.first_loader(validation_source_loader(trainer))
        return loader

    def _scoring_val_batches(self, trainer: Trainer) -> list[Any]:
        """The first ``num_val_samples`` validation samples on the device, loaded once per fit; built
        outside inference mode so the scoring passes can differentiate through them."""
        if self._val_batches is None:
            with torch.inference_mode(False):
                batches = data_utils.validation_batches(
                    self._validation_loader(trainer), self.num_val_samples, self.scoring_batch_size
                )
                self._val_batches = data_utils.to_device(trainer.strategy, batches)
        return self._val_batches

    def _score(
        self, trainer: Trainer, pl_module: LightningModule
    ) -> tuple[dict[int, float], dict[int, float] | None]:
        """Scores and their standard errors (None for model-only scorers or ``error_groups=0``)."""
        with scoring_context(pl_module):
            if not getattr(self._scorer, "needs_statistics", True):
                return self._checked_scores(self._scorer.score(pl_module), pl_module), None
            val_batches = self._scoring_val_batches(trainer)
            train = data_utils.training_batches(
                self._training_loader(trainer),
                self.num_train_samples,
                self.seed + trainer.global_rank,
                self.scoring_batch_size,
            )
            train = data_utils.to_device(trainer.strategy, train)
            # the memory plan (passes, bytes, projection) is printed where the per-rewire table is
            shown = self.verbose and trainer.is_global_zero
            options = {"progress": shown, "show_plan": shown}
            if "max_store_bytes" not in self.capture_options:
                # scoring inside training: its rows may add a tenth of training's own peak memory
                options["max_store_bytes"] = training_store_bytes(pl_module.device)
            options.update(self.capture_options)
            val_losses: list[torch.Tensor] = []
            options["loss_sink"] = lambda split, losses: val_losses.append(losses) if split == "val" else None
            if trainer.world_size > 1 and "reduce_fn" not in options:
                options["reduce_fn"] = torch_distributed_gather
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
            self._scored_val_loss = (int(trainer.global_step), float(losses.sum()) / max(losses.numel(), 1))
            if self.error_groups == 0:
                return self._checked_scores(self._scorer.score(stats), pl_module), None
            try:
                scores, errors = self._scorer.score_with_errors(stats, self.error_groups)
            except Exception:
                # a malformed score() output breaks the jackknife first: name what score() must return
                self._checked_scores(self._scorer.score(stats), pl_module)
                raise
            return self._checked_scores(scores, pl_module), None if errors is None else plain_scores(errors)

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

    def _score_and_plan(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Score (reduced over ranks), allocate on rank 0, broadcast, store as the pending plan."""
        try:
            self._score_and_plan_or_raise(trainer, pl_module)
        except RewireError as exc:
            self._failed(trainer, "scoring", exc)

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

    def _score_and_plan_or_raise(self, trainer: Trainer, pl_module: LightningModule) -> None:
        start = time.perf_counter()
        error: BaseException | None = None
        planned: tuple[Layout, dict[int, float], dict[int, float] | None] | None = None
        try:
            scores, errors = self._score(trainer, pl_module)
            scores = mean_scores(trainer.strategy, scores, pl_module.device)
            if trainer.global_rank == 0:
                new_layout = allocate(
                    scores,
                    method=self.allocator,
                    budget=self.state.resolved_budget,
                    current_layout=layout(pl_module),
                    block_dims=self._block_dims(pl_module),
                    score_errors=errors,
                    **self.allocator_options,
                )
                # errors come from the gathered statistics, identical on every rank: rank 0's are shared
                planned = (new_layout, scores, errors)
        except Exception as exc:  # noqa: BLE001 - re-raised with context below
            error = exc
        if any_rank(trainer.strategy, error is not None):
            where = f"{type(error).__name__}: {error}" if error is not None else "failed on another rank"
            raise RewireError(
                f"scoring/allocation at global step {trainer.global_step} failed: {where} "
                "(the model and optimizer are unchanged)"
            ) from error
        planned = broadcast(trainer.strategy, planned)
        assert planned is not None
        new_layout, scores, errors = planned
        plan = RewirePlan(
            layout=new_layout,
            scores=scores,
            score_errors=errors,
            step=int(trainer.global_step),
            epoch=int(trainer.current_epoch),
            time_scoring_s=time.perf_counter() - start,
        )
        self.state.pending = plan.to_dict()

    # ------------------------------------------------------------------ applying
    def _apply_pending(self, trainer: Trainer, pl_module: LightningModule) -> None:
        plan = self.state.plan
        assert plan is not None
        per_sample = resolve_per_sample_loss(pl_module, self.loss_fn)
        val_batches = self._scoring_val_batches(trainer)
        before_layout = layout(pl_module)
        dims = self._block_dims(pl_module)
        target = plan.layout
        shrinking = shrinking_blocks(before_layout, target)
        fading = self.rank_fade_steps > 0 and bool(shrinking)
        scored, self._scored_val_loss = self._scored_val_loss, None
        if (
            scored is not None
            and scored[0] == plan.step == int(trainer.global_step)
            and _probe_forward_is_scoring_forward(pl_module)
        ):
            loss_before = self._rank_mean(trainer, pl_module, scored[1])  # no step since scoring
        else:
            loss_before = self._probe(trainer, pl_module, per_sample, val_batches)
        cut = None
        if shrinking:
            # compared with loss_before: both the probe's forward (the reused one is the same forward)
            cut = self._rank_cut_disturbance(
                trainer, pl_module, per_sample, val_batches, before_layout, shrinking, loss_before
            )
        first = ranks_kept(target, shrinking) if fading else target
        try:
            result = rewire(trainer, pl_module, first, seed=self.seed + int(trainer.global_step))
        except RewireError as exc:
            self._failed(trainer, "rewire", exc)
            return
        if fading:
            start_fade(pl_module, trainer.optimizers, shrinking)
        self.last_reports = result.reports
        loss_after = self._probe(trainer, pl_module, per_sample, val_batches)
        after_layout = layout(pl_module)
        entry = {
            "index": self.state.rewires_done,
            "step": int(trainer.global_step),
            "epoch": int(trainer.current_epoch),
            "scored_at_step": plan.step,
            "scores": plan.scores,
            "score_errors": plan.score_errors,
            "error_shrinkage": float(self.allocator_options.get("error_shrinkage", 0.0)),
            "layout_before": before_layout,
            "layout_after": after_layout,
            "params_before": int(layout_params(before_layout, dims)),
            "params_after": int(layout_params(after_layout, self._block_dims(pl_module))),
            "budget": self.state.budget,
            "budget_unit": self.state.budget_unit,
            "time_scoring_s": plan.time_scoring_s,
            "time_rewire_s": float(result.time_total_s),
            "time_surgery_s": float(result.time_surgery_s),
            "val_loss_before": loss_before,
            "val_loss_after": loss_after,
            "disturbance": _relative(loss_before, loss_after),
            "rank_moves": None
            if not shrinking
            else {
                "blocks": sorted(shrinking),
                "fade_steps": self.rank_fade_steps if fading else 0,
                # what cutting the lowered ranks at once changes, alone, on the model before the rewire
                "cut_disturbance": cut,
                # the rank moves' own disturbance: the cut (at once) or the loss change at the removal step
                "disturbance": None if fading else cut,
                "removal_step": None if fading else int(trainer.global_step),
            },
            "optimizer_state": {
                "kept": len(result.carry.kept),
                "mapped": len(result.carry.mapped),
                "reset": len(result.carry.reset),
            },
        }
        self.state.history.append(entry)
        self.state.rewires_done += 1
        self.state.pending = None
        if fading:
            self.state.fade = {
                "blocks": shrinking,
                "steps": self.rank_fade_steps,
                "done": 0,
                "target": target,
                "history_index": len(self.state.history) - 1,
            }
        log_rewire(trainer, self.log_prefix, entry)
        if self.plot:
            try:
                save_and_log_figure(trainer, self.log_prefix, entry)
            except Exception as exc:  # noqa: BLE001 - a figure must never break training
                rank_zero_warn(f"LayerInfluenceCallback: could not save the rewire figure: {exc}")
        if self.verbose:
            print_table(entry)

    def _rank_cut_disturbance(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        per_sample: Any,
        batches: list[Any],
        before: Layout,
        shrinking: dict[int, dict[str, int]],
        loss_before: float,
    ) -> float | None:
        """Relative loss change of the rank moves alone, cut at once, on the current model (then undone)."""
        snapshot = ModuleSnapshot(pl_module)
        try:
            with torch.no_grad(), isolate_rng():
                apply_layout(pl_module, ranks_only(before, shrinking))
            loss_cut = self._probe(trainer, pl_module, per_sample, batches)
        finally:
            snapshot.restore()
        return _relative(loss_before, loss_cut)

    def _finish_fade(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The faded slots are zero: apply the planned ranks and record the loss change of that step."""
        fade = self.state.fade
        assert fade is not None
        per_sample = resolve_per_sample_loss(pl_module, self.loss_fn)
        val_batches = self._scoring_val_batches(trainer)
        loss_before = self._probe(trainer, pl_module, per_sample, val_batches)
        try:
            result = rewire(trainer, pl_module, fade["target"], seed=self.seed + int(trainer.global_step))
        except RewireError as exc:
            self._failed(trainer, "rewire", exc)
            # on_error="skip": the faded slots stay (zero, so harmless) and training goes on without them
            self.state.fade = None
            return
        self.last_reports = result.reports
        loss_after = self._probe(trainer, pl_module, per_sample, val_batches)
        entry = self.state.history[fade["history_index"]]
        entry["layout_after"] = layout(pl_module)
        entry["params_after"] = int(layout_params(entry["layout_after"], self._block_dims(pl_module)))
        entry["rank_moves"].update(
            {
                "disturbance": _relative(loss_before, loss_after),
                "removal_step": int(trainer.global_step),
                "removal_loss_before": loss_before,
                "removal_loss_after": loss_after,
            }
        )
        self.state.fade = None
        log_rewire(trainer, self.log_prefix, entry)
        if self.verbose:
            print_table(entry)

    def _probe(
        self, trainer: Trainer, pl_module: LightningModule, per_sample: PerSampleLoss, batches: list[Any]
    ) -> float:
        """Mean loss on the scoring validation samples, averaged over ranks."""
        with torch.inference_mode(False):
            value = mean_loss(pl_module, per_sample, batches)
        return self._rank_mean(trainer, pl_module, value)

    def _rank_mean(self, trainer: Trainer, pl_module: LightningModule, value: float) -> float:
        if trainer.world_size > 1:
            value = float(
                trainer.strategy.reduce(torch.tensor(value, device=pl_module.device), reduce_op="mean")
            )
        return value

    # ------------------------------------------------------------------ public helpers
    @property
    def history(self) -> list[dict[str, Any]]:
        """One plain dict per applied rewire (layouts, scores, params, timings, disturbance)."""
        return self.state.history


def _relative(before: float, after: float) -> float | None:
    """Relative change of the probe loss (None when the loss before is 0)."""
    return (after - before) / abs(before) if before else None


def _probe_forward_is_scoring_forward(model: nn.Module) -> bool:
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
