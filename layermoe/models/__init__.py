"""Real-model preparation (offline). Where models and data live (``cache_dir`` etc.): :mod:`layermoe.paths`.

``python -m layermoe.models prepare smollm2`` converts the SmolLM2 GGUF from PyPI into a cached HF folder.
"""

from layermoe.models.smollm2 import ModelPrepareError, find_gguf, is_prepared, prepare_smollm2, smollm2_dir

__all__ = [
    "ModelPrepareError",
    "find_gguf",
    "is_prepared",
    "prepare_smollm2",
    "smollm2_dir",
]
