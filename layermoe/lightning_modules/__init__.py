"""Lightning pieces: the fine-tuning module, the data module, and the layout table."""

from layermoe.data import TextDataModule
from layermoe.lightning_modules.finetuner import MoELoRAFineTuner
from layermoe.lightning_modules.losses import candidate_logits, per_sample_loss_from_logits
from layermoe.lightning_modules.model_factory import build_model
from layermoe.lightning_modules.reporting import format_layout_table, layout_rows

TextClassificationDataModule = TextDataModule  # the name used in docs/architecture.md

__all__ = [
    "MoELoRAFineTuner",
    "TextClassificationDataModule",
    "TextDataModule",
    "build_model",
    "candidate_logits",
    "format_layout_table",
    "layout_rows",
    "per_sample_loss_from_logits",
]
