"""Real-model preparation (offline) and model construction helpers.

``python -m layermoe.models prepare smollm2`` converts the SmolLM2 GGUF from PyPI into a cached HF folder.
"""

from layermoe.models.paths import cache_dir, quickstart_data_dir, resolve_path, shared_data_dir
from layermoe.models.smollm2 import ModelPrepareError, find_gguf, is_prepared, prepare_smollm2, smollm2_dir

__all__ = [
    "ModelPrepareError",
    "cache_dir",
    "find_gguf",
    "is_prepared",
    "prepare_smollm2",
    "quickstart_data_dir",
    "resolve_path",
    "shared_data_dir",
    "smollm2_dir",
]
