"""The progress bar ``train.py`` uses: Lightning's tqdm bar, counting the whole fit and readable in logs.

What it changes in ``TQDMProgressBar``:

- The training bar counts optimizer steps over the whole fit when its length is known
  (``trainer.estimated_stepping_batches``: ``max_steps``, or ``max_epochs`` with a sized loader), so its
  remaining time is the fit's, validation and rewire pauses included; Lightning's counts one epoch's
  batches and starts over at each epoch. With an unknown length it falls back to Lightning's.
- The description is ``Epoch e`` (``Epoch e/last`` when ``max_epochs`` is set), never Lightning's
  ``Epoch 0/-2`` for a run bounded by ``max_steps`` only.
- The router terms (``ROUTER_BAR_METRICS``) stand beside the loss. The module logs them without
  ``prog_bar``, which would copy each to the host at every step; the bar reads them when it redraws.
- Where stdout is not a terminal (a log file, a pipe, CI), every bar writes whole lines, one per 20 s
  (:class:`layermoe.progress.LineTqdm`), instead of carriage-return redraws that show nothing until the
  run ends. (Lightning's default with ``rich`` installed, ``RichProgressBar``, prints nothing there.)
"""

from __future__ import annotations

import math
import sys
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from layermoe.lightning_compat import built_progress_bars, progress_bar_update_due
from layermoe.progress import LINE_INTERVAL_S, LineTqdm, is_terminal

#: logged by ``MoELoRAFineTuner`` for the logger only, shown by :class:`FitProgressBar` at each redraw
ROUTER_BAR_METRICS = ("train/router_aux", "train/router_z")


class _LineBar(LineTqdm):
    format_num = staticmethod(Tqdm.format_num)  # Lightning's short number format in the postfix


class FitProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` with one training bar over the fit's optimizer steps (its remaining time is the
    fit's) and line output off a terminal; ``interval``: seconds between lines there."""

    # Lightning's format with tqdm's rate_fmt: "21.3s/step" for slow steps, where "0.05step/s" is hard to read
    BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

    def __init__(self, refresh_rate: int = 1, interval: float = LINE_INTERVAL_S, **kwargs: Any) -> None:
        super().__init__(refresh_rate=refresh_rate, **kwargs)
        self.interval = interval
        self._fit_steps: int | None = None

    def _bar(self, **kwargs: Any) -> Tqdm:
        kwargs.update(
            disable=self.is_disabled, dynamic_ncols=True, file=sys.stdout, bar_format=self.BAR_FORMAT
        )
        if is_terminal(sys.stdout):
            return Tqdm(**kwargs)
        kwargs.pop("position", None)
        return _LineBar(interval=self.interval, **kwargs)

    def init_sanity_tqdm(self) -> Tqdm:
        return self._bar(desc=self.sanity_check_description, position=2 * self.process_position, leave=False)

    def init_train_tqdm(self) -> Tqdm:
        return self._bar(
            desc=self.train_description, position=2 * self.process_position, leave=True, smoothing=0
        )

    def init_validation_tqdm(self) -> Tqdm:
        has_main_bar = self.trainer.state.fn != "validate"
        return self._bar(
            desc=self.validation_description,
            position=2 * self.process_position + has_main_bar,
            leave=not has_main_bar,
        )

    def init_test_tqdm(self) -> Tqdm:
        return self._bar(desc=self.test_description, position=2 * self.process_position, leave=True)

    def init_predict_tqdm(self) -> Tqdm:
        return self._bar(
            desc=self.predict_description, position=2 * self.process_position, leave=True, smoothing=0
        )

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        for name in ROUTER_BAR_METRICS:
            value = trainer.callback_metrics.get(name)
            if value is not None:
                metrics[name] = float(value)  # one host copy per redraw, not per step
        return metrics

    def print(self, *args: Any, sep: str = " ", **kwargs: Any) -> None:
        """``LightningModule.print``: above the bars; Lightning's drops the text while no bar exists yet
        (e.g. the layout table printed at fit start)."""
        if any(bar is not None and not bar.disable for bar in built_progress_bars(self)):
            super().print(*args, sep=sep, **kwargs)
        else:
            print(*args, sep=sep, **kwargs)

    @staticmethod
    def epoch_description(trainer: pl.Trainer) -> str:
        """``Epoch e``, or ``Epoch e/last`` when ``max_epochs`` bounds the run (Lightning's 0-based count)."""
        last = trainer.max_epochs - 1 if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
        return f"Epoch {trainer.current_epoch}" + ("" if last is None else f"/{last}")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        total = trainer.estimated_stepping_batches
        self._fit_steps = int(total) if isinstance(total, (int, float)) and math.isfinite(total) else None
        if self._fit_steps is not None:
            bar = self.train_progress_bar
            bar.reset(total=self._fit_steps)
            # a resumed fit starts at its step; its rate (and remaining time) counts this run's steps only
            bar.initial = bar.n = trainer.global_step
            bar.unit = "step"

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self._fit_steps is None:
            super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(self.epoch_description(trainer))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._fit_steps is None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        bar = self.train_progress_bar
        if progress_bar_update_due(self, batch_idx + 1, self.total_train_batches) and not bar.disable:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # redraws

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fit_steps is None:
            super().on_train_epoch_end(trainer, pl_module)
        elif not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
