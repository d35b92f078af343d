"""The command line behind ``train.py``: LightningCLI with ``trainer.precision: auto``.

Lightning has no "auto" precision. ``Trainer`` here accepts it and resolves it before Lightning sees it
(:func:`layermoe.precision.resolve_precision`: bf16-mixed only where bf16 is native, else 32-true),
printing the choice; every other Trainer argument passes through unchanged.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import yaml
from jsonargparse import Namespace
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from layermoe.adapters import MoELoRAConfig
from layermoe.callbacks import CallbackConfigError, LayerInfluenceCallback
from layermoe.checkpointing import AtomicCheckpointIO
from layermoe.checkpointing.integrity import read_verified_checkpoint
from layermoe.checkpointing.run_lock import run_folder_lock
from layermoe.data import TextDataModule
from layermoe.lightning_compat import (
    CheckpointPathWithoutOverlay,
    cli_parser,
    is_lightning_checkpoint_keyword,
    overwrite_last_checkpoint,
)
from layermoe.lightning_modules.finetuner import MoELoRAFineTuner
from layermoe.lightning_modules.model_factory import (
    model_dict_problem,
    model_settings_problem,
    unknown_fields_message,
)
from layermoe.lightning_modules.progress_bar import FitProgressBar
from layermoe.precision import AUTO, describe_choice, precision_problem, resolve_precision
from layermoe.quiet import silence_trainer_noise


class Trainer(pl.Trainer):
    """``lightning.pytorch.Trainer`` whose ``precision`` may also be ``"auto"`` (the default here), and whose
    checkpoints are written atomically (:class:`AtomicCheckpointIO`) unless another ``CheckpointIO`` is given:
    a job killed while saving never leaves a half-written checkpoint behind.

    Without a progress bar among the callbacks (and unless ``enable_progress_bar: false``) it shows
    :class:`FitProgressBar`: one bar over the fit's optimizer steps with the fit's remaining time, written
    as lines where stdout is not a terminal.

    Every ``ModelCheckpoint`` that writes ``last.ckpt`` (``save_last`` or ``filename: last``) overwrites it:
    Lightning's version counter would make a second run into the same folder write ``last-v1.ckpt`` and
    leave ``last.ckpt`` at the old run's step, so ``--ckpt_path .../last.ckpt`` would resume the old run.

    ``fit`` holds a lock on ``default_root_dir`` and every ``ModelCheckpoint`` folder
    (:mod:`layermoe.checkpointing.run_lock`): a second fit into the same folder stops at once with
    ``RunFolderBusyError`` naming the process that holds it.
    """

    def __init__(self, *, precision: str | int | None = AUTO, **kwargs: Any) -> None:
        silence_trainer_noise()
        problem = precision_problem(precision)
        if problem:
            raise ValueError(problem)
        accelerator = kwargs.get("accelerator", "auto")
        resolved = resolve_precision(precision, accelerator if isinstance(accelerator, str) else "auto")
        if precision == AUTO:
            rank_zero_info(describe_choice(resolved))
        plugins = kwargs.get("plugins")
        plugins = (
            list(plugins) if isinstance(plugins, (list, tuple)) else ([] if plugins is None else [plugins])
        )
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        kwargs["plugins"] = plugins
        check_single_influence_callback(kwargs.get("callbacks"))
        if kwargs.get("enable_progress_bar", True) is not False:
            callbacks = kwargs.get("callbacks")
            callbacks = (
                list(callbacks)
                if isinstance(callbacks, (list, tuple))
                else ([] if callbacks is None else [callbacks])
            )
            if not any(isinstance(c, ProgressBar) for c in callbacks):
                callbacks.append(FitProgressBar())
            kwargs["callbacks"] = callbacks
        super().__init__(precision=resolved, **kwargs)
        for callback in self.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and writes_last(callback):
                overwrite_last_checkpoint(callback)

    def fit(self, *args: Any, **kwargs: Any) -> None:
        if not self.is_global_zero:  # DDP's other ranks write nothing of their own here
            return super().fit(*args, **kwargs)
        with run_folder_lock(output_folders(self)):
            return super().fit(*args, **kwargs)


def output_folders(trainer: pl.Trainer) -> list[str]:
    """The folders a fit writes into: ``default_root_dir`` and each ``ModelCheckpoint``'s ``dirpath``."""
    folders = [str(trainer.default_root_dir)]
    folders += [str(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    return folders


def check_single_influence_callback(callbacks: Any) -> None:
    """Raise ``CallbackConfigError`` naming the entries when ``trainer.callbacks`` has more than one
    ``LayerInfluenceCallback`` (Lightning's own error for that, raised in ``Trainer.__init__``, only says
    that a callback's ``state_key`` must be unique)."""
    entries = callbacks if isinstance(callbacks, (list, tuple)) else [callbacks]
    indices = [i for i, cb in enumerate(entries) if isinstance(cb, LayerInfluenceCallback)]
    if len(indices) > 1:
        raise CallbackConfigError(
            f"trainer.callbacks[{indices[0]}] and trainer.callbacks[{indices[1]}] are both"
            " LayerInfluenceCallbacks: one callback allocates every block, and two would rewire the same"
            " adapters twice. Keep one."
        )


def writes_last(callback: ModelCheckpoint) -> bool:
    """Whether ``callback`` writes ``last.ckpt``: ``save_last``, or a plain ``filename: last``."""
    return bool(callback.save_last) or callback.filename == ModelCheckpoint.CHECKPOINT_NAME_LAST


ADAPTER_OPTION = "--model.adapter"


def split_adapter_overrides(args: list[str]) -> tuple[list[str], list[str]]:
    """``args`` without its ``--model.adapter VALUE`` / ``--model.adapter=VALUE`` options, and those values
    in order."""
    rest: list[str] = []
    overrides: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == ADAPTER_OPTION and index + 1 < len(args):
            overrides.append(args[index + 1])
            index += 2
            continue
        if arg.startswith(ADAPTER_OPTION + "="):
            overrides.append(arg.partition("=")[2])
        else:
            rest.append(arg)
        index += 1
    return rest, overrides


def check_influence_callback_entry(index: int, entry: Any) -> None:
    """Raise ``CallbackConfigError`` naming ``trainer.callbacks[index]`` when the entry is a
    ``LayerInfluenceCallback`` (or subclass) whose arguments it rejects."""
    class_path = getattr(entry, "class_path", None) if isinstance(entry, Namespace) else None
    if not isinstance(class_path, str) or "." not in class_path:
        return
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        return  # jsonargparse reports unknown classes itself
    if not (isinstance(cls, type) and issubclass(cls, LayerInfluenceCallback)):
        return
    init_args = entry.get("init_args")
    kwargs = init_args.as_dict() if isinstance(init_args, Namespace) else dict(init_args or {})
    try:
        cls(**kwargs)
    except CallbackConfigError as exc:
        raise CallbackConfigError(f"trainer.callbacks[{index}] ({name}): {exc}") from None


def adapter_problem(adapter: Any) -> str | None:
    """What is wrong with a configured ``model.adapter``, naming ``model.adapter.<field>`` (and the closest
    field name for a misspelling), or None when ``MoELoRAConfig`` accepts it."""
    if adapter is None:
        return None
    if not isinstance(adapter, Mapping):
        return f"model.adapter must be a dict of adapter fields or null, got {adapter!r}"
    known = sorted(f.name for f in dataclasses.fields(MoELoRAConfig))
    unknown = sorted(str(name) for name in adapter if name not in known)
    if unknown:
        return unknown_fields_message("model.adapter", unknown, known)
    try:
        MoELoRAConfig.from_dict(adapter)
    except ValueError as err:
        return f"model.adapter: {err}"
    return None


def model_config_problem(model_config: Any) -> str | None:
    """The first problem of the model's settings that can be named before anything is built (the nested
    ``model.adapter`` and ``model.model`` dicts, ``model.quantization``, ``model.dtype``, a model name or
    folder), or None."""
    if not isinstance(model_config, (Mapping, Namespace)):
        return None
    return (
        adapter_problem(model_config.get("adapter"))
        or model_dict_problem(model_config.get("model"))
        or model_settings_problem(
            model_config.get("quantization"), model_config.get("dtype", "float32"), model_config.get("model")
        )
    )


class LayerMoECLI(CheckpointPathWithoutOverlay, LightningCLI):
    """LightningCLI over :class:`MoELoRAFineTuner` and :class:`TextDataModule` with the auto-precision Trainer.

    The optimizer and LR schedule are the module's own (``configure_optimizers``: deterministic parameter
    order, needed when the callback resizes adapters), so LightningCLI's ``--optimizer`` options are off.

    ``--ckpt_path`` keeps the configuration as given: LightningCLI would overlay the checkpoint's
    hyperparameters on the model settings and command-line overrides, silently. The module then compares
    them with the checkpoint's (:mod:`layermoe.lightning_modules.resume_settings`): optimizer settings
    apply from the resumed step on, other differences stop the run before training with their list.
    """

    def before_instantiate_classes(self) -> None:
        """Build each ``LayerInfluenceCallback`` entry once before jsonargparse does, so a bad argument (an
        unknown scorer or allocator name, say) fails with the callback's own short message instead of
        inside jsonargparse's many-line union error; check the model's nested dicts (a misspelled
        ``model.adapter`` or ``model.model`` field) and ``trainer.precision`` before any model is built."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        callbacks = config.get("trainer.callbacks") if config is not None else None
        entries = callbacks if isinstance(callbacks, list) else [callbacks] if callbacks is not None else []
        for index, entry in enumerate(entries):
            check_influence_callback_entry(index, entry)
        # reported as jsonargparse reports a misspelled top-level option: one message, no traceback
        problem = model_config_problem(config.get("model") if config is not None else None)
        if not problem and config is not None:
            problem = precision_problem(config.get("trainer.precision"))
        if problem:
            cli_parser(self, self.subcommand).error(problem)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_class", Trainer)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(MoELoRAFineTuner, TextDataModule, *args, **kwargs)

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """LightningCLI's parsing, except that ``--model.adapter '{experts: 3, rank: 2}'`` merges into the
        configured adapter (as jsonargparse does for a dataclass) instead of replacing it: a dict-typed
        argument would otherwise reset every field the override leaves out (lora_alpha, lora_dropout,
        target_modules) to its default. ``--model.adapter null`` still means the default adapter."""
        if isinstance(args, (dict, Namespace)):
            return super().parse_arguments(parser, args)
        rest, overrides = split_adapter_overrides(list(sys.argv[1:] if args is None else args))
        if not overrides:
            return super().parse_arguments(parser, args)
        self.config = parser.parse_args(rest)
        subcommand = self.config.get("subcommand")
        key = f"{subcommand}.model.adapter" if subcommand else "model.adapter"
        merged = self.config.get(key)
        for text in overrides:
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError as err:
                cause = " ".join(str(err).split())  # one line: YAML's message points at the column below it
                parser.error(f"--model.adapter {text!r} is not valid YAML ({cause})")
            if isinstance(value, dict) and isinstance(merged, dict):
                merged = {**merged, **value}
            elif isinstance(value, dict) or value is None:
                merged = value
            else:
                parser.error(
                    f"--model.adapter takes a dict of adapter fields (e.g. '{{experts: 3, rank: 2}}') or null,"
                    f" got {text!r}"
                )
        self.config[key] = merged
        return None

    def check_ckpt_path(self, ckpt_path: Any) -> None:
        """Read and verify the checkpoint early (a clear error before the model is built), overlay nothing."""
        # every local path, whatever its suffix (a folder, a .pt, a safetensors file fail here with their
        # cause); Lightning's own keywords and URLs are left to Lightning
        text = str(ckpt_path or "")
        if text and not is_lightning_checkpoint_keyword(text) and "://" not in text:
            read_verified_checkpoint(ckpt_path)


def main(args: list[str] | None = None) -> LayerMoECLI:
    """Entry point used by ``train.py`` (``args=None`` reads ``sys.argv``)."""
    return LayerMoECLI(args=args)
