"""The callback's dry run at fit start: score two samples before any training, so a mismatch between
the batches, the per-sample loss and the model fails before the first optimizer step.

Without it, a batch the loss cannot read, a loss reduced over the batch, or a loss computed without
autograd surfaces only at the first rewire, after the warm-up has been trained. The dry run takes two
training and two validation samples (fewer when a set is smaller: two rows expose a loss that averages
over the batch, which one row cannot), calls the per-sample loss on each, checks shape ``(B,)`` and
finiteness, and runs the scoring pass on them (sketched to a few coordinates) to check that the loss is
differentiable through the scored layers. It runs in eval mode with the RNG isolated and no ``.grad``
left behind, so it changes nothing a resumed run could see. Loaders come from the module's or data
module's hooks directly (``lightning_compat``): the trainer's own loaders do not exist yet at
``on_fit_start``, and building them early would skip the restore of a resumable loader's position.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng

from layermoe.callbacks import data as data_utils
from layermoe.callbacks.distributed import any_rank
from layermoe.callbacks.errors import CallbackConfigError
from layermoe.callbacks.scoring_pass import PerSampleLoss, resolve_per_sample_loss, scoring_context
from layermoe.lightning_compat import training_source_loader, validation_defined, validation_source_loader
from layermoe.scoring import capture_statistics
from layermoe.scoring.batches import batch_size
from layermoe.scoring.errors import NonFiniteGradientError
from layermoe.scoring.losses import UnsupportedBatchError

DRY_RUN_SAMPLES = 2


def check_validation_data(trainer: Trainer, epoch_trigger: bool) -> None:
    """Scoring reads validation data: a fit without any (or whose epoch trigger never comes) fails here."""
    if not validation_defined(trainer):
        raise CallbackConfigError(
            "LayerInfluenceCallback scores on validation data: define val_dataloader() on the "
            "LightningModule or its DataModule"
        )
    loader = data_utils.first_loader(validation_source_loader(trainer))
    dataset = getattr(loader, "dataset", None)
    if loader is None or (dataset is not None and hasattr(dataset, "__len__") and len(dataset) == 0):
        raise CallbackConfigError(
            "LayerInfluenceCallback scores on validation data, but the validation dataloader is empty"
            " (e.g. TextDataModule(val_size=0) and no val_file): give validation rows (data.val_size > 0"
            " or data.val_file)"
        )
    if epoch_trigger and trainer.limit_val_batches == 0:
        raise CallbackConfigError(
            "schedule.interval='epoch' triggers at validation end, but Trainer(limit_val_batches=0) disables "
            "validation: use interval='step' or enable validation"
        )


_SKETCH_DIM = 8  # the gradient check needs reachability, not exact statistics
# A weight this large overflows float32 once squared (gradient statistics are sums of squares): 3.4e38.
_OVERFLOWING = 1e19


def _describe(batch: Any) -> str:
    if isinstance(batch, Mapping):
        return f"a {type(batch).__name__} with keys {sorted(map(str, batch))}"
    if isinstance(batch, (list, tuple)):
        return f"a {type(batch).__name__} of {len(batch)} fields"
    return f"a {type(batch).__name__}"


def _loss_origin(pl_module: LightningModule, loss_fn: Any) -> tuple[str, str]:
    """(what the loss is, how to fix it) for the messages."""
    if callable(getattr(pl_module, "per_sample_loss", None)):
        return f"{type(pl_module).__name__}.per_sample_loss", "fix per_sample_loss(batch) so it"
    if loss_fn is not None:
        return "loss_fn(model, batch)", "fix loss_fn so it"
    return (
        "the built-in per-sample loss",
        "define per_sample_loss(batch) -> Tensor[B] on the LightningModule (or pass loss_fn=...) that",
    )


def _warn_truncation(what: str, loader: Any, requested: int, option: str) -> None:
    dataset = getattr(loader, "dataset", None)
    try:
        available = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        return
    if available < requested:
        rank_zero_warn(
            f"LayerInfluenceCallback: {option}={requested} but the {what} set has only {available} samples; "
            f"scoring uses {available}. Lower {option} to silence this warning."
        )


# What the messages say when the weights, not the loss, make the numbers non-finite.
_BROKEN_WEIGHTS = (
    "the weights are damaged (a checkpoint changed after it was written, or an edit) or training diverged,"
    " the loss is not at fault: load an earlier checkpoint, or lower the learning rate"
)


def _largest_weight(pl_module: LightningModule) -> tuple[str, float]:
    """The parameter holding the largest |value| (inf and NaN count as infinite), and that value."""
    name, largest = "", -1.0
    for param_name, param in pl_module.named_parameters():
        if param.is_floating_point() and param.numel():
            value = param.detach().abs().nan_to_num(nan=float("inf")).max().item()
            if value > largest:
                name, largest = param_name, value
    return name, largest


def _first_non_finite_module(pl_module: LightningModule, run: Any) -> str | None:
    """The first leaf module, in execution order, whose output holds NaN/inf while ``run()`` runs; None
    when there is none, or when the very first module already received NaN/inf (the data, not the weights)."""
    found: list[str] = []
    calls: list[str] = []

    def non_finite(value: Any) -> bool:
        if isinstance(value, torch.Tensor):
            return value.is_floating_point() and not bool(torch.isfinite(value.detach()).all())
        if isinstance(value, (list, tuple)):
            return any(non_finite(v) for v in value)
        return isinstance(value, Mapping) and any(non_finite(v) for v in value.values())

    def hook(name: str) -> Any:
        def check(_module: Any, inputs: Any, output: Any) -> None:
            calls.append(name)
            if not found and non_finite(output):
                found.append("" if len(calls) == 1 and non_finite(inputs) else name)

        return check

    leaves = [(n, m) for n, m in pl_module.named_modules() if n and not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook(n)) for n, m in leaves]
    try:
        with torch.no_grad():
            run()
    except Exception:  # noqa: BLE001 - the diagnosis is best effort; the caller reports the failure
        pass
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found and found[0] else None


def _weights_verdict(pl_module: LightningModule, run: Any | None = None) -> str | None:
    """Why the model, not the loss, made the numbers non-finite, or None when nothing points at it."""
    name, largest = _largest_weight(pl_module)
    if largest == float("inf"):
        return f"the weight {name} holds NaN or infinity: {_BROKEN_WEIGHTS}"
    culprit = _first_non_finite_module(pl_module, run) if run is not None else None
    if culprit is not None:
        own = [(n, p) for n, p in pl_module.named_parameters() if n.startswith(culprit + ".")]
        sizes = ", ".join(f"{n} max |w| {p.detach().abs().max().item():.3g}" for n, p in own[:4])
        return (
            f"the model's forward pass turns non-finite in {culprit}"
            f"{f' ({sizes})' if sizes else ''}; the largest weight is {name} (|w| = {largest:.3g}):"
            f" {_BROKEN_WEIGHTS}"
        )
    if run is None and largest > _OVERFLOWING:
        return (
            f"the weight {name} holds |w| = {largest:.3g}, which overflows float32 gradients:"
            f" {_BROKEN_WEIGHTS}"
        )
    return None


def _check_weight_sizes(pl_module: LightningModule) -> None:
    """Finite losses, but a weight so large that scoring's float32 gradient statistics may overflow: whether
    they do depends on the CPU's kernels (the sketch overflowed on an AVX2 EPYC, not on an AVX-512 Xeon,
    whose scores then reached 2.6e40), so the weight's size is the check, not the overflow."""
    verdict = _weights_verdict(pl_module)
    if verdict is not None:
        raise CallbackConfigError(f"scoring cannot use this model's gradients because {verdict}")


def _check_losses(
    losses: Any, batch: Any, split: str, origin: tuple[str, str], pl_module: LightningModule, run: Any
) -> None:
    name, fix = origin
    size = batch_size(batch)
    shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
    if not isinstance(losses, torch.Tensor) or losses.shape != (size,):
        raise CallbackConfigError(
            f"{name} returned {shape} for a {split} batch of {size} samples; it must return one loss per "
            f"sample, a tensor of shape ({size},): {fix} reduces over tokens only, not over the batch "
            "(e.g. F.cross_entropy(..., reduction='none'))"
        )
    if not bool(torch.isfinite(losses.detach()).all()):
        verdict = _weights_verdict(pl_module, run)
        if verdict is not None:
            raise CallbackConfigError(
                f"scoring got NaN/inf losses on {split} samples ({losses.detach().tolist()}) because {verdict}"
            )
        raise CallbackConfigError(
            f"{name} returned NaN/inf on {split} samples ({losses.detach().tolist()}); check the loss and "
            "those samples before training"
        )


def dry_run(
    trainer: Trainer,
    pl_module: LightningModule,
    loss_fn: Any,
    *,
    scope: str,
    capture_options: dict[str, Any],
    needs_gradients: bool,
    num_train_samples: int,
    num_val_samples: int,
    seed: int,
) -> None:
    """Check the scoring loss on two training and two validation samples; ``CallbackConfigError`` naming
    the fix on any mismatch (raised on every rank when one rank fails)."""
    error: BaseException | None = None
    try:
        origin = _loss_origin(pl_module, loss_fn)
        try:
            per_sample = resolve_per_sample_loss(pl_module, loss_fn)
        except TypeError as exc:
            raise CallbackConfigError(str(exc)) from exc
        with isolate_rng():
            batches = _samples(trainer, num_train_samples, num_val_samples, seed)
            with scoring_context(pl_module):
                for split, batch in batches.items():
                    losses = _call(per_sample, pl_module, batch, split, origin)
                    rerun = lambda b=batch: per_sample(pl_module, b)  # noqa: E731 - the diagnosis reruns it
                    _check_losses(losses, batch, split, origin, pl_module, rerun)
            if needs_gradients:
                _check_weight_sizes(pl_module)
                _check_gradients(pl_module, per_sample, batches, scope, capture_options, origin)
    except Exception as exc:  # noqa: BLE001 - re-raised below, after every rank agreed
        error = exc
    if any_rank(trainer.strategy, error is not None):
        if isinstance(error, CallbackConfigError):
            raise error
        raise CallbackConfigError(
            f"the scoring dry run failed: {type(error).__name__}: {error}"
            if error is not None
            else "the scoring dry run failed on another rank (see its error)"
        ) from error


def _samples(trainer: Trainer, num_train_samples: int, num_val_samples: int, seed: int) -> dict[str, Any]:
    """One batch of (up to) two samples per split, on the module's device; warns when scoring would be cut."""
    train_loader = data_utils.first_loader(training_source_loader(trainer))
    val_loader = data_utils.first_loader(
        validation_source_loader(trainer) if validation_defined(trainer) else None
    )
    _warn_truncation("training", train_loader, num_train_samples, "num_train_samples")
    _warn_truncation("validation", val_loader, num_val_samples, "num_val_samples")
    batches = {
        "training": data_utils.training_batches(train_loader, DRY_RUN_SAMPLES, seed, DRY_RUN_SAMPLES)[0],
        "validation": data_utils.validation_batches(val_loader, DRY_RUN_SAMPLES, DRY_RUN_SAMPLES)[0],
    }
    return {k: trainer.strategy.batch_to_device(b) for k, b in batches.items()}


def _check_gradients(
    pl_module: LightningModule,
    per_sample: PerSampleLoss,
    batches: dict[str, Any],
    scope: str,
    capture_options: dict[str, Any],
    origin: tuple[str, str],
) -> None:
    """The scoring pass itself on the two batches, sketched: it fails where scoring would."""
    options = {k: v for k, v in capture_options.items() if k in ("modules", "blocks")}
    try:
        capture_statistics(
            pl_module,
            [batches["training"]],
            [batches["validation"]],
            per_sample,
            scope=scope,
            projection_dim=_SKETCH_DIM,
            progress=False,
            show_plan=False,
            **options,
        )
    except NonFiniteGradientError as exc:  # finite losses, non-finite gradients
        verdict = _weights_verdict(pl_module)
        raise CallbackConfigError(
            f"scoring got non-finite gradients ({exc}) because {verdict}"
            if verdict is not None
            else f"scoring got non-finite gradients from finite losses: {exc}"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - reported with the fix
        raise CallbackConfigError(
            f"scoring cannot differentiate {origin[0]} with respect to the {scope} parameters of the "
            f"MoE-LoRA layers ({exc}); {origin[1]} computes the loss with autograd through the model "
            "(no torch.no_grad(), no .detach() on the logits)"
        ) from exc


def _call(
    per_sample: PerSampleLoss, pl_module: LightningModule, batch: Any, split: str, origin: tuple[str, str]
) -> Any:
    name, fix = origin
    try:
        return per_sample(pl_module, batch)
    except UnsupportedBatchError as exc:  # its message already names the fix
        raise CallbackConfigError(f"scoring a {split} batch ({_describe(batch)}): {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - reported with the batch structure and the fix
        raise CallbackConfigError(
            f"{name} failed on a {split} batch ({_describe(batch)}): {type(exc).__name__}: {exc}. "
            f"Scoring passes batches exactly as the loader yields them: {fix} accepts them"
        ) from exc
