"""Filters for the known harmless messages of our dependencies, each matched by its own text.

Every command printed them; none says anything a user of layermoe can act on. Each filter drops one
message and nothing else (no blanket ``ignore``), so any other warning from the same library still shows.
:func:`silence_import_noise` runs when ``layermoe`` is imported (these arise in any use of it);
:func:`silence_trainer_noise` runs where ``train.py`` builds its Trainer.
"""

from __future__ import annotations

import logging
import warnings

# bitsandbytes (0.50) on CPUs with AVX512-BF16 tries, at import, to fetch a faster 4-bit inference kernel
# from the Hugging Face hub (kernels-community; offline or without trust_remote_code it fails) and logs a
# warning; it then uses its own kernel. layermoe turns that inference path off for 4-bit layers anyway
# (layermoe.adapters.base.keep_four_bit_base_differentiable), so the message is noise.
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNEL_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
# Lightning (2.6) builds a torch LeafSpec in its own pytree helper (CombinedLoader, every loop), which torch
# (2.13) deprecates in favour of TreeSpec.is_leaf(); nothing to change on our side.
LEAFSPEC_MESSAGE = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
LEAFSPEC_MODULE = r"lightning\.pytorch\.utilities\._pytree"
# Lightning's advertisements for its cloud products (litlogger, litmodels), shown at every fit.
LIGHTNING_TIP_PREFIX = "💡 Tip: For seamless cloud"
# rank_zero_info logs through lightning_utilities' module logger, which lightning.fabric and
# lightning.pytorch each rename on import: whichever imported last owns it.
LIGHTNING_RANK_ZERO_LOGGERS = (
    "lightning.fabric.utilities.rank_zero",
    "lightning.pytorch.utilities.rank_zero",
)
# The model summary sizes parameters by the precision's bits and knows no "bf16-mixed"/"16-mixed"; it then
# assumes 32 bits, which is right: under mixed precision the parameters are float32.
SUMMARY_PRECISION_MESSAGE = r"Precision (bf16|16)-mixed is not supported by the model summary"
SUMMARY_PRECISION_MODULE = r"lightning\.pytorch\.utilities\.model_summary\.model_summary"


class _DropMessage(logging.Filter):
    """Drops log records whose unformatted message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _drop_log_message(logger_name: str, prefix: str) -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in logger.filters):
        logger.addFilter(_DropMessage(prefix))


def silence_import_noise() -> None:
    """bitsandbytes' kernels-community warning and torch's LeafSpec deprecation raised inside Lightning."""
    _drop_log_message(BNB_CPU_LOGGER, BNB_KERNEL_MESSAGE)
    warnings.filterwarnings(
        "ignore", message=LEAFSPEC_MESSAGE, category=FutureWarning, module=LEAFSPEC_MODULE
    )


def silence_trainer_noise() -> None:
    """Lightning's cloud tips and its model-summary warning about mixed precision."""
    for name in LIGHTNING_RANK_ZERO_LOGGERS:
        _drop_log_message(name, LIGHTNING_TIP_PREFIX)
    warnings.filterwarnings(
        "ignore", message=SUMMARY_PRECISION_MESSAGE, category=UserWarning, module=SUMMARY_PRECISION_MODULE
    )
