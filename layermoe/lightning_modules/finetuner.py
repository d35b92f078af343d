"""`MoELoRAFineTuner`: a Hugging Face causal LM with MoE-LoRA adapters, trained by Lightning.

Every init argument is plain data (strings, numbers, dicts, lists), so hyperparameters and checkpoints
load with ``torch.load(..., weights_only=True)``. Checkpoints hold the adapter tensors only (the frozen
base is rebuilt from ``model`` when loading) unless ``save_base_weights`` is set; adapters that the
influence callback resized come back at their new size because each layer re-allocates itself from its
``lora_shape`` buffer while loading.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Mapping
from typing import IO, Any, Literal, Self

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics import MeanMetric, MetricCollection, SumMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassMatthewsCorrCoef
from torchmetrics.text import Perplexity
from transformers import modeling_utils

from layermoe.adapters import MoELoRAConfig, collect_router_losses, inject, layout
from layermoe.checkpointing import exact_resume_callbacks, validate_checkpoint_layout
from layermoe.checkpointing.base_identity import BASE_KEY, base_identity
from layermoe.checkpointing.integrity import check_finite_state, read_verified_checkpoint, verify_checksum
from layermoe.layout import LAYOUT_KEY, is_adapter_key, is_int_at_least, normalize_layout
from layermoe.lightning_compat import attached_trainer, forget_logged_position
from layermoe.lightning_modules.losses import (
    LOSS_AGGREGATIONS,
    aggregate_losses,
    greedy_exact_match,
    label_loss,
    label_positions,
    per_sample_loss_from_logits,
    supervised_log_likelihood,
)
from layermoe.lightning_modules.model_factory import QUANTIZATIONS, build_model, check_vocabulary
from layermoe.lightning_modules.progress_bar import ROUTER_BAR_METRICS
from layermoe.lightning_modules.reporting import format_layout_table
from layermoe.lightning_modules.resume_settings import (
    OPTIMIZER_SETTINGS,
    apply_optimizer_settings,
    refuse_changed_settings,
    settings_differences,
)
from layermoe.lightning_modules.schedule import SCHEDULES, lr_multiplier
from layermoe.messages import listed

# Per-row positions in ``logits_to_keep`` (a (B, 1) tensor): transformers' models slice with this helper
# since it exists; older releases (the GPU machine's 5.17) read such a tensor as one index list for every row.
PER_ROW_LOGITS_TO_KEEP = hasattr(modeling_utils, "slice_logits_to_keep")

Task = Literal["classification", "causal_lm", "instruction", "multiple_choice"]
TASKS = ("classification", "causal_lm", "instruction", "multiple_choice")
CHOICE_SCORES = ("sum", "mean")
ADAPTER_ONLY_KEY = "layermoe_adapter_only"
STAGES = ("train", "val", "test")
# What on_load_checkpoint verifies against the checksum: the sections Lightning never rewrites while
# loading (it migrates loops and versions, and load_from_checkpoint merges overrides into hparams).
_VERIFIED_SECTIONS = ("state_dict", LAYOUT_KEY, BASE_KEY)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the fit stops before the optimizer step applies it."""


class MoELoRAFineTuner(pl.LightningModule):
    """Fine-tunes a causal LM's MoE-LoRA adapters; loss = task loss + router auxiliary losses.

    Args:
        model: a model folder (``{cache}`` placeholders or the alias ``smollm2`` allowed) or a dict
            config for a tiny random model, e.g. ``{"type": "llama", "hidden_size": 32, ...}``.
        adapter: ``MoELoRAConfig.to_dict()`` form (missing fields take their defaults).
        task: "classification" (next-token prediction over verbalized labels; accuracy and Matthews
            correlation), "causal_lm" (token accuracy and perplexity), "instruction" (loss on the response
            tokens only; token accuracy, perplexity and exact match: every response token is the greedy
            choice) or "multiple_choice" (trained on the correct option; perplexity and exact match of it,
            and in validation/test ``acc``: the best-scored option is the correct one).
        choice_score: multiple_choice option score: "sum" (summed log-likelihood of the option's tokens)
            or "mean" (per token, i.e. length-normalized).
        num_classes: classes for the metrics; None takes it from the data module at setup.
        lr / weight_decay / betas: AdamW settings. warmup_steps / scheduler / min_lr_ratio: per-step
            LR schedule (cosine, linear or constant after a linear warmup).
        quantization: None, "4bit" or "8bit": a bitsandbytes frozen base (transformers'
            ``BitsAndBytesConfig``; needs a model folder).
        dtype: dtype of the base weights ("float32"; bf16 only helps where bf16 is native).
        gradient_checkpointing: recompute activations in backward (less memory, ~30% slower).
        model_seed: seed of a tiny model's random weights (the global RNG is untouched).
        save_base_weights: also store the frozen base in checkpoints (large; only needed when the base
            cannot be rebuilt from ``model``).
        print_layout: print the per-block layout table at fit start.
        print_metrics: print the validation metrics after each validation run.
        exact_resume: add ``layermoe.checkpointing.exact_resume_callbacks()`` (RNG states in checkpoints,
            optimizer-state manifest check) so ``--ckpt_path`` resumes bit-exactly, mid-epoch included.
        loss_aggregation: how the training loss reduces a batch: "token_mean" (every supervised token
            weighs the same, as Hugging Face, peft and TRL do) or "sample_mean" (every row weighs the
            same). Identical for classification. Validation/test losses and the influence callback's
            scoring stay per-sample means.
    """

    def __init__(
        self,
        model: str | dict[str, Any],
        adapter: dict[str, Any] | None = None,
        task: Task = "classification",
        num_classes: int | None = None,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        betas: list[float] | tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        scheduler: str = "cosine",
        min_lr_ratio: float = 0.0,
        quantization: str | None = None,
        dtype: str = "float32",
        gradient_checkpointing: bool = False,
        model_seed: int = 0,
        save_base_weights: bool = False,
        print_layout: bool = True,
        print_metrics: bool = True,
        exact_resume: bool = True,
        choice_score: str = "sum",
        loss_aggregation: str = "token_mean",
    ) -> None:
        super().__init__()
        if loss_aggregation not in LOSS_AGGREGATIONS:
            raise ValueError(
                f"loss_aggregation must be one of {list(LOSS_AGGREGATIONS)}, got {loss_aggregation!r}"
            )
        if task not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
        if choice_score not in CHOICE_SCORES:
            raise ValueError(f"choice_score must be one of {list(CHOICE_SCORES)}, got {choice_score!r}")
        if scheduler not in SCHEDULES:
            raise ValueError(f"scheduler must be one of {SCHEDULES}, got {scheduler!r}")
        if quantization is not None and quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS} or null, got {quantization!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not is_int_at_least(warmup_steps, 0):
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"num_classes must be an int >= 2 or null, got {num_classes!r}")
        adapter_config = MoELoRAConfig.from_dict(adapter or {})
        self.save_hyperparameters()
        # Plain data only: the adapter dict is stored in its normalized to_dict() form, betas as a list.
        self.hparams["adapter"] = adapter_config.to_dict()
        self.hparams["betas"] = [float(b) for b in betas]
        self.task = task
        self.model = build_model(model, quantization=quantization, dtype=dtype, seed=model_seed)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.config.use_cache = False
        inject(self.model, adapter_config)
        # from_pretrained returns eval mode; Lightning (>= 2.2) keeps submodule modes as they are, so the
        # whole model starts in train mode (dropout, router statistics) and evaluation loops switch it.
        self.model.train()
        self.metrics = nn.ModuleDict()
        self._adapter_only_incoming = False
        self._base_identity: dict[str, Any] | None = None
        self._resumed_settings: dict[str, Any] | None = None
        if task != "classification" or num_classes is not None:
            self._build_metrics(num_classes)

    # ------------------------------------------------------------------ metrics
    def _build_metrics(self, num_classes: int | None) -> None:
        for stage in STAGES:
            if self.task == "classification":
                assert num_classes is not None
                collection = MetricCollection(
                    {
                        "acc": MulticlassAccuracy(num_classes=num_classes, average="micro"),
                        "mcc": MulticlassMatthewsCorrCoef(num_classes=num_classes),
                    }
                )
            else:
                collection = MetricCollection(self._generation_metrics(stage))
            self.metrics[f"{stage}_metrics"] = collection
            self.metrics[f"{stage}_loss"] = MeanMetric()
        # for the printed validation line: rows evaluated and, for multiple choice, the accuracy of guessing
        self.metrics["val_rows"] = SumMetric()
        if self.task == "multiple_choice":
            self.metrics["val_chance"] = MeanMetric()

    def _generation_metrics(self, stage: str) -> dict[str, Any]:
        """Perplexity on the supervised tokens; token accuracy (``acc``) except for multiple_choice, whose
        ``acc`` (validation/test) is option accuracy; ``exact_match`` for instruction and multiple_choice."""
        metrics: dict[str, Any] = {"ppl": Perplexity(ignore_index=-100)}
        if self.task != "multiple_choice":
            vocab = int(self.model.config.vocab_size)
            metrics["acc"] = MulticlassAccuracy(num_classes=vocab, average="micro", ignore_index=-100)
        elif stage != "train":
            metrics["acc"] = MeanMetric()
        if self.task in ("instruction", "multiple_choice"):
            metrics["exact_match"] = MeanMetric()
        return metrics

    def setup(self, stage: str) -> None:
        """Check that the data module serves this task and its tokenizer fits the model's vocabulary; take
        num_classes from the data module when it was not given (classification only)."""
        datamodule = getattr(self.trainer, "datamodule", None) if attached_trainer(self) is not None else None
        data_task = getattr(datamodule, "task", None)
        if isinstance(data_task, str) and data_task != self.task:
            raise ValueError(
                f"model.task={self.task!r} but data.task={data_task!r}; set both to the same task"
            )
        prepare_tokenizer = getattr(datamodule, "prepare_tokenizer", None)
        if callable(prepare_tokenizer):
            check_vocabulary(self.model, prepare_tokenizer())
        num_classes = getattr(datamodule, "num_classes", None)
        given = self.hparams.get("num_classes")
        if self.task == "classification" and None not in (num_classes, given) and num_classes != given:
            raise ValueError(
                f"model.num_classes={given} but the data module has {num_classes} classes (label_words); "
                "make them agree or leave model.num_classes null"
            )
        if len(self.metrics):
            return
        if num_classes is None:
            raise ValueError(
                "task 'classification' needs model.num_classes, or a data module with a num_classes "
                "attribute (TextDataModule has one: len(label_words))"
            )
        self.hparams["num_classes"] = int(num_classes)
        self._build_metrics(int(num_classes))

    # ------------------------------------------------------------------ forward and losses
    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits (B, T, V) of the wrapped model for a contract batch."""
        return self.model(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False
        ).logits

    def label_logits(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, V) logits at the position that predicts each row's label token (classification).

        Only those positions are projected onto the vocabulary when the model takes Hugging Face's
        ``logits_to_keep``: SmolLM2's 49k-word head over every position costs ~15% of a training step.
        """
        position = label_positions(batch["labels"]).to(batch["input_ids"].device) - 1
        if PER_ROW_LOGITS_TO_KEEP and "logits_to_keep" in inspect.signature(self.model.forward).parameters:
            logits = self.model(
                input_ids=batch["input_ids"],
                attention_mask=batch.get("attention_mask"),
                use_cache=False,
                logits_to_keep=position[:, None],
            ).logits
            return logits[:, 0]
        rows = torch.arange(position.shape[0], device=position.device)
        return self(batch)[rows, position]

    def per_sample_loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B,) task loss per sample, as the training loss uses it (router losses excluded).

        Router statistics recorded by this forward are discarded, so a scoring pass never leaks into
        the next training step's auxiliary loss.
        """
        losses = self._task_losses(batch)[0]
        collect_router_losses(self.model)
        return losses

    def _task_losses(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) per-sample task losses and the logits the metrics need: (B, V) at the label position
        for classification, (B, T, V) for causal LM."""
        if self.task == "classification":
            logits = self.label_logits(batch)
            return label_loss(logits, batch["labels"]), logits
        logits = self(batch)
        return per_sample_loss_from_logits(logits, batch["labels"]), logits

    @torch.no_grad()
    def choice_scores(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, K) score of every option of a multiple_choice evaluation batch (``choice_score``: summed or
        per-token log-likelihood of its tokens); options that ``choice_mask`` marks absent get -inf.

        One forward per option index (not all B*K rows at once) bounds the (rows, T, vocab) logits.
        Router statistics of these forwards are discarded: they are not training steps.
        """
        if "choice_input_ids" not in batch:
            raise ValueError(
                "multiple_choice evaluation batches need choice_input_ids/choice_labels/choice_mask "
                "(TextDataModule's validation and test loaders with task: multiple_choice provide them)"
            )
        ids, mask, labels = batch["choice_input_ids"], batch["choice_attention_mask"], batch["choice_labels"]
        present = batch["choice_mask"].bool()
        scores = torch.full(present.shape, float("-inf"), device=ids.device)
        for k in range(ids.shape[1]):
            rows = present[:, k]
            if not bool(rows.any()):
                continue
            logits = self.model(input_ids=ids[rows, k], attention_mask=mask[rows, k], use_cache=False).logits
            scores[rows, k] = supervised_log_likelihood(
                logits, labels[rows, k], mean=self.hparams.choice_score == "mean"
            ).to(scores.dtype)
        collect_router_losses(self.model)
        return scores

    def _shared_step(self, batch: Mapping[str, torch.Tensor], stage: str) -> torch.Tensor:
        task_losses, logits = self._task_losses(batch)
        # Evaluation losses stay per-sample means: the metric the callback and earlier results compare.
        how = self.hparams.loss_aggregation if stage == "train" else "sample_mean"
        task_loss = aggregate_losses(task_losses, batch["labels"], how)
        router = collect_router_losses(self.model)
        loss = task_loss + router.loss
        size = batch["input_ids"].shape[0]
        on_step = stage == "train"
        # `{stage}/loss` is the task loss in every stage, so train/loss and val/loss read alike; the router
        # terms that training adds to it (zero outside training) are shown beside it under their own names
        mean_loss = self.metrics[f"{stage}_loss"]
        mean_loss.update(task_loss.detach(), weight=size)
        self.log(
            f"{stage}/loss",
            task_loss.detach() if on_step else mean_loss,
            prog_bar=True,
            on_step=on_step,
            on_epoch=True,
            batch_size=size,
        )
        if stage == "train":
            # logger only: a prog_bar tensor is copied to the host at every step; FitProgressBar shows
            # these beside the loss when it redraws (ROUTER_BAR_METRICS)
            self.log_dict(
                dict(zip(ROUTER_BAR_METRICS, (router.aux_loss, router.z_loss), strict=True)),
                prog_bar=False,
                on_step=True,
                on_epoch=False,
                batch_size=size,
            )
        metrics = self.metrics[f"{stage}_metrics"]
        with torch.no_grad():
            if self.task == "classification":
                scores = logits.detach().gather(1, batch["candidate_token_ids"].to(logits.device))
                metrics.update(scores, batch["class_label"])
            else:
                shifted = logits.detach()[:, :-1].float()
                targets = batch["labels"][:, 1:].to(shifted.device)
                metrics["ppl"].update(shifted, targets)
                if self.task == "multiple_choice":
                    if stage != "train":
                        correct = self.choice_scores(batch).argmax(dim=1) == batch["class_label"]
                        metrics["acc"].update(correct.float())
                        if stage == "val":
                            self.metrics["val_chance"].update(1.0 / batch["choice_mask"].float().sum(dim=1))
                else:
                    metrics["acc"].update(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1))
                if "exact_match" in metrics:
                    metrics["exact_match"].update(
                        greedy_exact_match(logits.detach(), batch["labels"]).float()
                    )
        if stage == "val":
            self.metrics["val_rows"].update(float(size))
        if stage != "train":
            self.log_dict(
                {f"{stage}/{k}": v for k, v in metrics.items()}, prog_bar=True, on_epoch=True, batch_size=size
            )
        return loss

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._shared_step(batch, "train")
        if not bool(torch.isfinite(loss.detach())):
            raise NonFiniteLossError(
                f"training loss is {float(loss):.4g} at global step {self.global_step} (batch {batch_idx}); the"
                " fit stops before this step updates the adapters, and no checkpoint of it is written. Lower"
                " model.lr (or raise warmup_steps), check the data, or resume from an earlier checkpoint."
            )
        return loss

    def on_train_epoch_end(self) -> None:
        metrics = self.metrics["train_metrics"]
        self.log_dict({f"train/{k}": v.float() for k, v in metrics.compute().items()})
        metrics.reset()
        self.metrics["train_loss"].reset()

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val")

    def on_validation_epoch_start(self) -> None:
        self.metrics["val_rows"].reset()
        if "val_chance" in self.metrics:
            self.metrics["val_chance"].reset()

    def on_validation_epoch_end(self) -> None:
        """Print one line of validation metrics (outside the sanity check) so CPU runs show progress, with
        the rows they cover and, for multiple choice, the accuracy of guessing among each row's options."""
        if self.trainer.state.fn == "fit":  # validate/test print their metrics as a table: keep it clean
            self._log_step_for_loggers()
        if self.trainer.sanity_checking or not self.hparams.print_metrics:
            return
        values = {k: float(v) for k, v in self.metrics["val_metrics"].compute().items()}
        values["loss"] = float(self.metrics["val_loss"].compute())
        shown = ", ".join(f"val/{k}={v:.4f}" for k, v in sorted(values.items()))
        rows = int(self.metrics["val_rows"].compute())
        if "val_chance" in self.metrics:
            shown += f" (chance acc {float(self.metrics['val_chance'].compute()):.4f})"
        self.print(f"[step {self.global_step}] {shown} on {rows:,} validation rows")

    def on_validation_end(self) -> None:
        # after every callback's on_validation_end (ModelCheckpoint saves there, naming files by this step)
        if self.trainer.state.fn == "fit":
            forget_logged_position(self.trainer)

    def _log_step_for_loggers(self) -> None:
        """Validation metrics of a fit reach the loggers at the number of optimizer steps done (``global_step``, as
        the console line, checkpoint names and the influence callback's metrics say), not at Lightning's
        default, which is one lower for a validation inside the epoch (its counter of stepped batches is
        advanced only after that validation). A logged ``step`` is the step Lightning hands the loggers; it
        then no longer adds ``epoch`` itself. Both are dropped again at the validation's end
        (:func:`layermoe.lightning_compat.forget_logged_position`)."""
        at = {"step": float(self.global_step), "epoch": float(self.current_epoch)}
        self.log_dict(at, on_step=False, on_epoch=True, batch_size=1)

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "test")

    # ------------------------------------------------------------------ optimization
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Trainable parameters sorted by name: a deterministic function of the current architecture, so
        optimizer state (matched by position) lands on the right tensors after a resize or a resume."""
        return sorted((name, p) for name, p in self.named_parameters() if p.requires_grad)

    def configure_callbacks(self) -> list[pl.Callback]:
        return exact_resume_callbacks() if self.hparams.exact_resume else []

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for _, p in self.trainable_parameters()]
        if not params:
            current = layout(self.model)
            raise ValueError(
                f"no trainable parameters: every one of the {len(current)} adapted blocks has 0 experts"
                " (model.adapter.experts), so there is no adapter to train; give blocks experts >= 1"
                " (e.g. model.adapter.experts: 2) or list a task head in model.adapter.modules_to_save"
                if current
                else "no trainable parameters: MoELoRAConfig.target_modules matched nothing trainable"
            )
        hp = self.hparams
        optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas))
        total = self.trainer.estimated_stepping_batches
        if hp.scheduler != "constant" and not (isinstance(total, (int, float)) and total < float("inf")):
            raise ValueError(
                f"scheduler {hp.scheduler!r} needs a finite run length: set trainer.max_steps or "
                "trainer.max_epochs, or use scheduler: constant"
            )
        if math.isfinite(total) and hp.warmup_steps > total:
            raise ValueError(
                f"model.warmup_steps={hp.warmup_steps} is longer than the run ({int(total)} optimizer steps):"
                f" the LR would end at {total / hp.warmup_steps:.0%} of model.lr without ever reaching it;"
                " lower model.warmup_steps or lengthen the run (trainer.max_steps / max_epochs)"
            )
        multiplier = lr_multiplier(hp.scheduler, hp.warmup_steps, int(min(total, 2**31)), hp.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ reporting and checkpoints
    def on_fit_start(self) -> None:
        if self.hparams.print_layout:
            self.print(format_layout_table(self.model, title="MoE-LoRA layout at fit start:"))

    def on_train_start(self) -> None:
        """Resumed with other optimizer settings than the checkpoint's: apply them from this step on
        (runs after Lightning restored the optimizer and scheduler states, which hold the old ones)."""
        saved, self._resumed_settings = self._resumed_settings, None
        if saved is None:
            return
        changed = [k for k in OPTIMIZER_SETTINGS if k in saved and saved[k] != self.hparams[k]]
        if not changed:
            return
        schedulers = [config.scheduler for config in self.trainer.lr_scheduler_configs]
        lrs = apply_optimizer_settings(self.trainer.optimizers, schedulers, self.hparams)
        shown = ", ".join(f"{k} {saved[k]!r} -> {self.hparams[k]!r}" for k in changed)
        self.print(f"Resumed at step {self.global_step} with changed settings ({shown}); LR now {lrs[:1]}")

    def base_identity(self) -> dict[str, Any]:
        """The frozen base's source and weight fingerprint (computed once: the base does not train)."""
        if self._base_identity is None:
            self._base_identity = base_identity(self.model, self.hparams.model)
        return self._base_identity

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the layout (plain ints) and, by default, drop the frozen base weights from the checkpoint."""
        checkpoint[LAYOUT_KEY] = normalize_layout(layout(self.model))
        checkpoint[BASE_KEY] = dict(self.base_identity())
        if not self.hparams.save_base_weights:
            trainable = {name for name, p in self.named_parameters() if p.requires_grad}
            state = checkpoint["state_dict"]
            checkpoint["state_dict"] = {k: v for k, v in state.items() if k in trainable or is_adapter_key(k)}
            checkpoint[ADAPTER_ONLY_KEY] = True

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | os.PathLike | IO,
        map_location: Any = None,
        hparams_file: str | os.PathLike | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> Self:
        """Lightning's ``load_from_checkpoint``, after the checks ``--ckpt_path`` runs on a local file.

        Lightning reads the file with a bare ``torch.load``, so an empty, truncated or damaged file would
        surface as torch's own error (``EOFError``, a miniz error, or "Weights only load failed"), and
        ``on_load_checkpoint`` (which verifies the checksum) does not know the file's name. Reading it
        through :func:`read_verified_checkpoint` first turns each into a ``CheckpointIntegrityError`` that
        names the file and the fix. The file is read twice (once here, once by Lightning): a one-off cost,
        small for the default adapter-only checkpoints. File objects and URLs go to Lightning unchecked
        here (the checksum is still verified in ``on_load_checkpoint``).
        """
        if isinstance(checkpoint_path, (str, os.PathLike)) and "://" not in str(checkpoint_path):
            read_verified_checkpoint(
                checkpoint_path, weights_only=True if weights_only is None else weights_only
            )
        return super().load_from_checkpoint(
            checkpoint_path,
            map_location=map_location,
            hparams_file=hparams_file,
            strict=strict,
            weights_only=weights_only,
            **kwargs,
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Runs right before load_state_dict (Lightning's restore order), for fit/validate/test --ckpt_path
        # and load_from_checkpoint alike: corrupt bytes, non-finite weights, a missing or corrupt layout,
        # another base model or settings that cannot change are reported by name here, before any weight
        # loads; then remember whether the frozen base is absent from the incoming state_dict.
        validate_checkpoint_layout(checkpoint)
        verify_checksum(checkpoint, skip=[k for k in checkpoint if k not in _VERIFIED_SECTIONS])
        check_finite_state(checkpoint, "the checkpoint", "load")
        saved = checkpoint.get("hyper_parameters")
        if isinstance(saved, Mapping):
            saved_base = checkpoint.get(BASE_KEY)
            refused, _ = settings_differences(
                saved,
                dict(self.hparams),
                saved_base if isinstance(saved_base, Mapping) else None,
                self.base_identity()["fingerprint"] if saved_base is not None else None,
            )
            refuse_changed_settings(refused)
            self._resumed_settings = {k: saved[k] for k in OPTIMIZER_SETTINGS if k in saved}
        self._adapter_only_incoming = bool(checkpoint.get(ADAPTER_ONLY_KEY, False))

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Strict loading that accepts adapter-only checkpoints: only frozen base keys may be missing."""
        if not (strict and self._adapter_only_incoming):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._adapter_only_incoming = False
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        missing = [k for k in result.missing_keys if k in trainable or is_adapter_key(k)]
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"checkpoint does not match the adapters: missing [{listed(missing, 8)}], unexpected "
                f"[{listed(result.unexpected_keys, 8)}]; was it written with a different model or adapter config?"
            )
        return result
