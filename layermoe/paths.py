"""Where layermoe keeps prepared models and shared data, overridable by environment variables.

Every location that tests, benchmarks and set-up scripts agree on lives here, so that a fresh CI run can
point all of them somewhere new with one variable each.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "LAYERMOE_CACHE"
SHARED_DATA_ENV = "LAYERMOE_SHARED_DATA"
QUICKSTART_DATA_ENV = "LAYERMOE_QUICKSTART_DATA"

_REPO_ROOT = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    """The model cache: ``$LAYERMOE_CACHE`` or ``~/.cache/layermoe``."""
    value = os.environ.get(CACHE_ENV)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "layermoe"


def shared_data_dir() -> Path:
    """The read-only CoLA/SST-2 folder: ``$LAYERMOE_SHARED_DATA`` or ``../shared/data`` beside the repo."""
    value = os.environ.get(SHARED_DATA_ENV)
    return Path(value).expanduser() if value else _REPO_ROOT.parent / "shared" / "data"


def quickstart_data_dir() -> Path:
    """Where set-up writes the quickstart task: ``$LAYERMOE_QUICKSTART_DATA`` or ``<cache>/data/sarcasm``."""
    value = os.environ.get(QUICKSTART_DATA_ENV)
    return Path(value).expanduser() if value else cache_dir() / "data" / "sarcasm"


def resolve_path(value: str) -> Path:
    """Expand ``~``, ``$VARS`` and the placeholders ``{cache}``, ``{shared}``, ``{quickstart}`` in a path.

    Configs name their files this way so one YAML works on every machine: ``{cache}`` is
    :func:`cache_dir`, ``{shared}`` is :func:`shared_data_dir`, ``{quickstart}`` is
    :func:`quickstart_data_dir`, each following its environment variable at run time.
    """
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"expected a path string, got {type(value).__name__}")
    text = os.fspath(value)
    for key, func in (
        ("{cache}", cache_dir),
        ("{shared}", shared_data_dir),
        ("{quickstart}", quickstart_data_dir),
    ):
        if key in text:
            text = text.replace(key, str(func()))
    return Path(os.path.expandvars(text)).expanduser()
