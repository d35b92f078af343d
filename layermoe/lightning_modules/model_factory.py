"""Build the Hugging Face causal LM a fine-tuning run starts from: a local folder or a tiny in-process config.

Both forms are plain data (a path string or a dict), so they can sit in hyperparameters and checkpoints
and a checkpoint can rebuild the exact same base model before its adapter weights are loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM

from layermoe.models.smollm2 import smollm2_dir
from layermoe.paths import resolve_path

ALIASES = {"smollm2": smollm2_dir}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZATIONS = ("4bit", "8bit")


def _check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"model dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def build_tiny_model(spec: dict[str, Any], seed: int = 0, dtype: str = "float32") -> nn.Module:
    """A randomly initialized causal LM from ``{"type": "llama", "hidden_size": 32, ...}`` (no download).

    Weights depend only on ``spec`` and ``seed`` (the global RNG is left untouched), so a checkpoint that
    stores only the adapters rebuilds the same frozen base.
    """
    config_kwargs = dict(spec)
    model_type = config_kwargs.pop("type", None)
    if not isinstance(model_type, str):
        raise ValueError(
            "a model dict needs a 'type' (a transformers model_type such as 'llama', 'qwen2', 'gpt2'), "
            f"got keys {sorted(spec)}"
        )
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING), n=3)
        raise ValueError(
            f"model type {model_type!r} is not a transformers model_type"
            f"{f' (did you mean {close}?)' if close else ''}; set model.model.type to one such as 'llama'"
        )
    torch_dtype = _check_dtype(dtype)
    try:
        config = AutoConfig.for_model(model_type, **config_kwargs)
    except (StrictDataclassError, ValueError, TypeError, KeyError) as err:
        raise ValueError(_spec_error(model_type, config_kwargs, err)) from err
    problem = _unknown_spec_fields_problem(config, config_kwargs)
    if problem:
        raise ValueError(problem)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    except KeyError as err:
        # a value the config accepts unchecked (hidden_act) is looked up only when the model is built
        if _spec_holders(config_kwargs, err):
            raise ValueError(_spec_error(model_type, config_kwargs, err)) from err
        raise


def known_spec_fields(config: Any) -> list[str]:
    """The fields a transformers config class takes: its own and the standard names it maps onto them
    (GPT-2's ``hidden_size`` for ``n_embd``)."""
    fields = {f.name for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else set()
    return sorted(fields | set(getattr(config, "attribute_map", {})))


def unknown_spec_fields(config: Any, spec: dict[str, Any]) -> list[str]:
    """The model-dict keys ``config`` neither knows nor consumed: transformers keeps any other keyword as a
    plain attribute that nothing reads (a misspelled ``hiden_size`` would silently build the default size),
    while the legacy keywords it converts (``rope_theta`` into ``rope_parameters``) are not stored as given."""
    known = set(known_spec_fields(config))
    return sorted(k for k in spec if k not in known and k in vars(config))


def unknown_fields_message(section: str, unknown: list[str], known: list[str]) -> str:
    """One line naming each unknown ``section.field``, the closest known field where difflib finds one,
    and the known fields."""
    named = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1)
        named.append(f"{section}.{name}" + (f" (did you mean {section}.{close[0]}?)" if close else ""))
    verb = "is not a known field" if len(unknown) == 1 else "are not known fields"
    return f"{' and '.join(named)} {verb} of {section}; known fields: {', '.join(known)}."


def model_dict_problem(spec: Any) -> str | None:
    """What is wrong with the names in a model dict (unknown fields), or None; other problems (bad values)
    are left to :func:`build_tiny_model`, which names them when it builds the model."""
    if not isinstance(spec, dict):
        return None
    config_kwargs = dict(spec)
    model_type = config_kwargs.pop("type", None)
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        return None
    try:
        config = AutoConfig.for_model(model_type, **config_kwargs)
    except (StrictDataclassError, ValueError, TypeError, KeyError):
        return None
    return _unknown_spec_fields_problem(config, config_kwargs)


def _choice_problem(field: str, value: Any, choices: list[str], nullable: bool) -> str | None:
    if value is None and nullable or isinstance(value, str) and value in choices:
        return None
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    allowed = ", ".join(repr(c) for c in choices) + (" or null" if nullable else "")
    return f"{field}={value!r}{hint}: must be one of {allowed}."


def model_source_problem(source: Any) -> str | None:
    """What is wrong with a model given by name or folder (``model.model``), or None; a dict is checked by
    :func:`model_dict_problem`."""
    if not isinstance(source, str):
        return None
    try:
        resolve_model_dir(source)
    except (FileNotFoundError, KeyError, ValueError) as err:
        close = difflib.get_close_matches(source, list(ALIASES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close and close[0] != source else ""
        known = ", ".join(repr(a) for a in ALIASES)
        return f"model.model={source!r}{hint}: {err}. Known names: {known}, or a model folder path."
    return None


def model_settings_problem(quantization: Any, dtype: Any, source: Any) -> str | None:
    """The first bad value among ``model.quantization``, ``model.dtype`` and ``model.model`` (a name or a
    folder), named so a config can be fixed before anything is built, or None."""
    return (
        _choice_problem("model.quantization", quantization, list(QUANTIZATIONS), nullable=True)
        or _choice_problem("model.dtype", dtype, sorted(DTYPES), nullable=False)
        or model_source_problem(source)
    )


def _unknown_spec_fields_problem(config: Any, spec: dict[str, Any]) -> str | None:
    unknown = unknown_spec_fields(config, spec)
    known = sorted(["type", *known_spec_fields(config)])
    return unknown_fields_message("model.model", unknown, known) if unknown else None


def _spec_error(model_type: str, spec: dict[str, Any], err: Exception) -> str:
    """transformers' refusal of a model dict, as one line naming the field(s) to fix."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    cause = (lines[-1] if lines else repr(err)).rstrip(".")
    field = re.search(r"field '([^']+)'", lines[0]) if lines else None
    if field:
        what, fix = f"its field {field.group(1)!r}", f"model.model.{field.group(1)}"
    elif isinstance(err, KeyError):
        unknown = err.args[0] if err.args else None
        holders = _spec_holders(spec, err)
        what = f"a value it does not know ({unknown!r})"
        fix = " / ".join(holders) if holders else "the field holding that value in model.model"
    else:
        what, fix = "its fields", "the fields this names in model.model"
    return (
        f"the model dict (type {model_type!r}) is not a valid transformers {model_type} config: transformers"
        f" refused {what}: {cause}. Fix {fix}."
    )


def _spec_holders(spec: dict[str, Any], err: KeyError) -> list[str]:
    """The model-dict fields holding the value a KeyError did not know."""
    unknown = err.args[0] if err.args else None
    return [
        f"model.model.{k}"
        for k, v in spec.items()
        if v == unknown or (isinstance(v, dict) and unknown in v.values())
    ]


def quantization_config(quantization: str, compute_dtype: torch.dtype) -> Any:
    """transformers' ``BitsAndBytesConfig`` for a 4-bit (NF4, double quant) or 8-bit frozen base."""
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization must be one of {QUANTIZATIONS} or null, got {quantization!r}")


def resolve_model_dir(source: str) -> str:
    """A model folder from a path (placeholders allowed) or an alias such as ``smollm2``."""
    folder = ALIASES[source]() if source in ALIASES else resolve_path(source)
    if not (folder / "config.json").is_file():
        hint = (
            "run `python -m layermoe.models prepare smollm2`"
            if "smollm2" in str(folder)
            else "check the path"
        )
        raise FileNotFoundError(f"model folder {folder} (from {source!r}) has no config.json; {hint}")
    return str(folder)


def build_model(
    source: str | dict[str, Any],
    *,
    quantization: str | None = None,
    dtype: str = "float32",
    seed: int = 0,
) -> nn.Module:
    """Load (folder) or build (dict) the base causal LM; ``quantization`` needs a folder."""
    torch_dtype = _check_dtype(dtype)
    if isinstance(source, dict):
        if quantization is not None:
            raise ValueError(
                "quantization needs a model folder (transformers quantizes while loading); save the tiny "
                "model with save_pretrained and pass its path as `model`, or set quantization: null"
            )
        return build_tiny_model(source, seed=seed, dtype=dtype)
    if not isinstance(source, str):
        raise ValueError(f"model must be a folder path or a config dict, got {type(source).__name__}")
    folder = resolve_model_dir(source)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if quantization is not None:
        kwargs["quantization_config"] = quantization_config(quantization, torch_dtype)
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs)


def check_vocabulary(model: nn.Module, tokenizer: Any) -> None:
    """The model's input embedding must have a row for every token id the tokenizer can produce.

    Raises ValueError naming ``model.model.vocab_size`` and the size needed: otherwise the first training
    step fails with an ``IndexError`` deep inside the embedding. (The tiny tokenizer has 259 ids, 3 specials
    and 256 bytes, plus one per added label word.)
    """
    embeddings = model.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None)
    needed = len(tokenizer)
    if rows is not None and needed > rows:
        raise ValueError(
            f"the tokenizer has {needed} tokens but the model's embedding has only {rows} rows; set "
            f"model.model.vocab_size >= {needed} (for a dict model) or use the tokenizer saved with the model"
        )
