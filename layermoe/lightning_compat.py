"""Every use of a private Lightning API, in one place (tested against ``lightning>=2.6.6,<2.7``).

Lightning has no public way to do these; each function says which private name it touches and why, so a
Lightning upgrade means checking this file (and the upper bound in pyproject.toml) only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, get_args

import torch
from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.utilities.model_registry import _is_registry
from torch import nn


def _validation_source(trainer: Any) -> Any:
    # The fit loop's validation loop keeps its dataloader source in the private ``_data_source``
    # (``_DataConnector``-built ``_DataLoaderSource``); there is no public "is validation defined" query.
    return trainer.fit_loop.epoch_loop.val_loop._data_source


def validation_defined(trainer: Any) -> bool:
    """Whether the module or datamodule defines ``val_dataloader`` (known before any loader is built)."""
    return bool(_validation_source(trainer).is_defined())


def validation_source_loader(trainer: Any) -> Any:
    """The validation dataloader(s) straight from their source, for when ``trainer.val_dataloaders`` is
    still unset (e.g. ``limit_val_batches=0``, where Lightning never builds them)."""
    return _validation_source(trainer).dataloader()


def validation_due_after_this_batch(trainer: Any) -> bool:
    """Whether the training epoch loop will run a validation right after the current batch.

    Asks the private ``_TrainingEpochLoop._should_check_val_fx`` with the fit loop's private
    ``_data_fetcher``: exactly the decision Lightning takes next, so a checkpoint written at this batch end
    can record that it precedes a validation (which Lightning skips, without running it, on resume).
    """
    fetcher = trainer.fit_loop._data_fetcher
    return fetcher is not None and bool(trainer.fit_loop.epoch_loop._should_check_val_fx(fetcher))


def build_validation_loaders(trainer: Any) -> None:
    """Have the fit's validation loop build ``trainer.val_dataloaders`` now (scoring may run before the
    first validation, e.g. at a step-interval rewire).

    ``setup_data()`` is public-named but sits on the loop objects (``fit_loop.epoch_loop.val_loop``), which
    Lightning treats as internal; it is what the validation loop itself calls before running, and returns
    at once when the loaders exist. Checked against lightning 2.6.6.
    """
    trainer.fit_loop.epoch_loop.val_loop.setup_data()


def is_last_training_batch(trainer: Any) -> bool:
    """Whether the batch the training epoch loop is on (or has just finished) is its epoch's last.

    Read from the epoch loop's ``batch_progress.is_last_batch`` (a loop internal; no public trainer
    property says it). Checked against lightning 2.6.6.
    """
    return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


def callback_state_key(callback: Any, **kwargs: Any) -> str:
    """``Callback._generate_state_key``: the protected helper Lightning's ``Callback.state_key`` docs point
    subclasses to (class qualname plus the given fields), so the key stays what Lightning would generate.
    Checked against lightning 2.6.6."""
    return str(callback._generate_state_key(**kwargs))


def training_source_loader(trainer: Any) -> Any:
    """The training dataloader(s) straight from their source (the module's or datamodule's
    ``train_dataloader`` hook, or the loader given to ``fit``), or None when none is defined. At
    ``on_fit_start`` the fit loop has not built its own yet, and building it early would skip the restore
    of a resumable loader's position; the fit loop keeps the source in the private ``_data_source``."""
    source = trainer.fit_loop._data_source
    return source.dataloader() if source.is_defined() else None


def optimizers_to_device(optimizers: Iterable[torch.optim.Optimizer], device: torch.device) -> None:
    """Move optimizer state to ``device``.

    The private fabric helper is what ``Strategy.setup`` itself uses after ``setup_optimizers``; a rebuilt
    optimizer mid-fit needs the same step.
    """
    _optimizers_to_device(optimizers, device)


def is_compiled(module: nn.Module) -> bool:
    """Whether the module runs under ``torch.compile``: Lightning records ``trainer.fit(torch.compile(m))``
    in the private ``_compiler_ctx`` of the unwrapped module; a compiled submodule is an OptimizedModule."""
    if getattr(module, "_compiler_ctx", None):
        return True
    return any(type(m).__name__ == "OptimizedModule" for m in module.modules())


def lightning_optimizers(strategy: Any) -> list[Any]:
    """The strategy's ``LightningOptimizer`` wrappers (private ``_lightning_optimizers``; the public
    ``strategy.optimizers`` are the raw ones), recorded so a failed rewire can put them back."""
    return list(strategy._lightning_optimizers)


def set_optimizers(strategy: Any, optimizers: list[Any], wrappers: list[Any]) -> None:
    """Put back both lists without re-wrapping: the ``optimizers`` setter would build new
    ``LightningOptimizer`` objects, so rollback writes the private ``_optimizers`` and
    ``_lightning_optimizers`` directly."""
    strategy._optimizers = list(optimizers)
    strategy._lightning_optimizers = list(wrappers)


# Per-epoch ("current") progress that TrainingEpochLoop.reset() zeroes when a new epoch starts, by the keys
# FitLoop.state_dict() gives them in a checkpoint's loops["fit_loop"].
_PER_EPOCH_PROGRESS = (
    "epoch_loop.batch_progress",
    "epoch_loop.scheduler_progress",
    "epoch_loop.automatic_optimization.optim_progress",
    "epoch_loop.manual_optimization.optim_step_progress",
)
_COUNTERS = ("ready", "started", "processed", "completed")


def _zero_current(progress: Any) -> None:
    """Zero every ``current`` counter of a (possibly nested) progress state; totals stay."""
    if not isinstance(progress, dict):
        return
    for key, value in progress.items():
        if key == "current" and isinstance(value, dict):
            for counter in value:
                value[counter] = 0
        elif key == "is_last_batch":
            progress[key] = False
        else:
            _zero_current(value)


def saved_in_train_epoch_end(fit_loop: dict[str, Any]) -> bool:
    """Whether a checkpoint's fit-loop state was saved inside ``on_train_epoch_end``: ``FitLoop.on_advance_end``
    counts the epoch as processed before those hooks and as completed after them."""
    epoch = fit_loop.get("epoch_progress")
    if not isinstance(epoch, dict):
        return False
    for scope in ("total", "current"):
        counts = epoch.get(scope)
        if not isinstance(counts, dict) or not all(isinstance(counts.get(c), int) for c in _COUNTERS):
            return False
        if not counts["ready"] == counts["started"] == counts["processed"] == counts["completed"] + 1:
            return False
    return True


def settle_epoch_end_progress(checkpoint: dict[str, Any]) -> bool:
    """Rewrite, in place, the private fit-loop progress of a checkpoint saved inside ``on_train_epoch_end``
    into the state the uninterrupted run has when its next epoch starts; True when it changed anything.

    Why: with ``max_steps`` set, Lightning 2.6 forces ``FitLoop.restarting`` on and resumes such a checkpoint
    on its "restarted on epoch end" path: an empty pass over the finished epoch that counts it as processed
    a second time, so the next epoch calls ``set_epoch`` one too far (and may hit ``max_epochs`` without
    training). What the uninterrupted run does after that save: ``FitLoop.on_advance_end`` increments the
    epoch's completed count, and the next ``TrainingEpochLoop.reset()`` zeroes the per-epoch counters and
    the validation loop's total batch count. Doing exactly that here lets Lightning resume at a clean epoch
    boundary with or without ``max_steps``. Idempotent; other checkpoints are left as they are.
    """
    loops = checkpoint.get("loops")
    fit_loop = loops.get("fit_loop") if isinstance(loops, dict) else None
    if not isinstance(fit_loop, dict) or not saved_in_train_epoch_end(fit_loop):
        return False
    for scope in ("total", "current"):
        fit_loop["epoch_progress"][scope]["completed"] += 1
    for key in _PER_EPOCH_PROGRESS:
        _zero_current(fit_loop.get(key))
    val_total = (fit_loop.get("epoch_loop.val_loop.batch_progress") or {}).get("total")
    if isinstance(val_total, dict):
        for counter in val_total:
            val_total[counter] = 0
    return True


def forget_logged_position(trainer: Any) -> None:
    """Drop ``step`` and ``epoch`` from the trainer's callback metrics after a validation logged them.

    A validation logs them so that its metrics reach the loggers at ``global_step`` (a logged ``step`` is
    the step Lightning hands the loggers). Lightning keeps every logged value in the private
    ``_LoggerConnector._callback_metrics`` after the loop ends, and ``ModelCheckpoint`` takes ``{step}`` and
    ``{epoch}`` for its file names from there before the trainer's counters: the stale values would name
    the checkpoints of the steps that follow.
    """
    metrics = trainer._logger_connector._callback_metrics
    for name in ("step", "epoch"):
        metrics.pop(name, None)


def load_pending_train_loader_state(trainer: Any) -> bool:
    """Hand a checkpoint's training-loader position to the loader when Lightning skipped it; True if it did.

    Why: ``FitLoop.setup_data`` loads the checkpoint's loader states (private ``_combined_loader_states_to_load``,
    through the private ``_load_combined_loader_states``) only while it builds the loader, and only when the
    loop is restarting. ``Trainer.estimated_stepping_batches`` builds the loader early whenever
    ``max_epochs`` is set (``configure_optimizers`` and ``LayerInfluenceCallback.on_fit_start`` call it),
    before the loops are restored; the real ``setup_data`` then returns early and the states are dropped, so
    a mid-epoch resume restarts the epoch from its first batch (Lightning issue #20550, open in 2.6.6).
    Called once the loops are restored (``on_train_start``), this does what ``setup_data`` would have done:
    load the states, then re-create the fetcher's iterator (private ``_data_fetcher``) so nothing built
    before the load is used. A no-op when Lightning already loaded them (the list is then empty).
    """
    fit_loop = trainer.fit_loop
    if not (fit_loop.restarting and fit_loop._combined_loader_states_to_load and fit_loop._combined_loader):
        return False
    fit_loop._load_combined_loader_states()
    if fit_loop._data_fetcher is not None:
        iter(fit_loop._data_fetcher)
    return True


def hpc_checkpoint_path(trainer: Any) -> str:
    """The next ``hpc_ckpt_N.ckpt`` in ``default_root_dir``: where Lightning's SLURM requeue handler saves,
    and what ``ckpt_path="hpc"`` (and, on SLURM, a requeued job without ``ckpt_path``) resumes from. The
    name comes from the private ``_checkpoint_connector.hpc_save_path``; no public API gives it."""
    return str(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir))


def overwrite_last_checkpoint(callback: Any) -> None:
    """Turn off a ``ModelCheckpoint``'s version counter (so ``last.ckpt`` is overwritten, never joined by
    ``last-v1.ckpt``). The counter lives in the private ``_enable_version_counter``; only the init argument
    ``enable_version_counter`` sets it publicly, and the Trainer gets the callback already built."""
    callback._enable_version_counter = False


def is_lightning_checkpoint_keyword(text: str) -> bool:
    """Whether a ``--ckpt_path`` value is one Lightning resolves itself rather than a local file: ``last``,
    ``best``, ``hpc``, or a model-registry name (the private ``model_registry._is_registry`` is the test
    ``Trainer.fit`` itself applies)."""
    return text in ("last", "best", "hpc") or bool(_is_registry(text))


class CheckpointPathWithoutOverlay:
    """Mixin for a ``LightningCLI`` subclass (list it before ``LightningCLI``): ``--ckpt_path`` keeps the
    configuration as given, and ``check_ckpt_path(ckpt_path)`` is called instead.

    ``LightningCLI.__init__`` calls its private ``_parse_ckpt_path`` after parsing, which overlays the
    checkpoint's hyperparameters on the model settings and command-line overrides; overriding it is the
    only way to turn that off.
    """

    def _parse_ckpt_path(self) -> None:
        config = self.config  # type: ignore[attr-defined]
        subcommand = config.get("subcommand")
        self.check_ckpt_path(config[subcommand].get("ckpt_path") if subcommand else None)

    def check_ckpt_path(self, ckpt_path: Any) -> None:
        """What ``--ckpt_path`` is checked with before the model is built (nothing by default)."""


def cli_parser(cli: Any, subcommand: str | None) -> Any:
    """The parser that read ``subcommand``'s options (the top-level one without a subcommand): its
    ``error(message)`` reports a bad setting as jsonargparse reports its own (usage, ``error: ...``, exit
    status 2, no traceback). ``LightningCLI._parser`` is the private accessor Lightning itself uses."""
    return cli._parser(subcommand)


def attached_trainer(module: Any) -> Any:
    """The module's trainer, or None when it is not attached to one: ``LightningModule.trainer`` raises
    then, and the private ``_trainer`` is the attribute it reads."""
    return module._trainer


def built_progress_bars(progress_bar: Any) -> tuple[Any, Any, Any]:
    """A ``TQDMProgressBar``'s train, validation and test bars, None for those not built yet (the public
    properties raise until then; the private ``_train_progress_bar`` etc. hold them)."""
    return progress_bar._train_progress_bar, progress_bar._val_progress_bar, progress_bar._test_progress_bar


def progress_bar_update_due(progress_bar: Any, current: int, total: int) -> bool:
    """Whether a ``TQDMProgressBar`` redraws at batch ``current`` of ``total``: its own rule (the private
    ``_should_update``: enabled, and every ``refresh_rate`` batches or at the last one)."""
    return bool(progress_bar._should_update(current, total))


def lightning_precisions() -> tuple[Any, ...]:
    """Every ``precision`` value Lightning's Trainer accepts: the private Literal ``_PRECISION_INPUT``
    (a Union of Literals) is the only list of them; Lightning checks against it inside ``Trainer.__init__``,
    after the model is built, and with a traceback."""
    return tuple(value for part in get_args(_PRECISION_INPUT) for value in get_args(part))
