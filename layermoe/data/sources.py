"""Rows of a data source as plain dicts: local files, a local folder, or a Hugging Face dataset name.

Local ``.jsonl``/``.csv``/``.tsv`` files go through :mod:`layermoe.data.io` (line-numbered errors); every
other source goes through Hugging Face ``datasets``: ``.json`` (JSON lines or one JSON array) and
``.parquet`` files, a folder of data files (``train.*``/``test.*``/``validation.*`` become splits), or a
dataset name with a config and a split. Names come from the local ``datasets`` cache when offline
(``HF_HUB_OFFLINE=1``/``HF_DATASETS_OFFLINE=1``, or no network); one that is not cached fails with a
:class:`DataError` saying so instead of a connection traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from layermoe.data.io import DataError, _read_records
from layermoe.paths import resolve_path

# suffix -> (datasets builder, builder options)
DATASETS_BUILDERS: dict[str, tuple[str, dict[str, Any]]] = {
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"sep": "\t"}),
    ".parquet": ("parquet", {}),
}
PROJECT_READER_SUFFIXES = (".jsonl", ".csv", ".tsv")


def _looks_local(source: str) -> bool:
    """A path rather than a Hub name: it exists, or it is written like a path (absolute, ./, ~, suffix)."""
    path = resolve_path(source)
    return (
        path.exists()
        or source.startswith((".", "/", "~", "{"))
        or Path(source).suffix.lower() in DATASETS_BUILDERS
    )


def _load(args: tuple[Any, ...], kwargs: dict[str, Any], what: str, split: str, field: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(*args, split=split, **kwargs)
    except ConnectionError as err:
        raise DataError(
            f"{what} is not in the local datasets cache and the Hugging Face Hub cannot be reached ({err}). "
            "Load it once on a machine with network (it is kept in HF_DATASETS_CACHE, or in "
            "data.dataset_cache_dir), or save it as local files and point data.dataset at them"
        ) from None
    except (ValueError, FileNotFoundError) as err:
        message = str(err)
        if "split" in message.lower():
            raise DataError(f"{field}={split!r} is not a split of {what}: {message}") from None
        raise DataError(f"cannot load {what}: {message}; check data.dataset / data.dataset_config") from None
    except datasets.exceptions.DatasetNotFoundError as err:
        raise DataError(f"{what} was not found: {err}; check data.dataset") from None


def load_split(
    source: str,
    split: str = "train",
    config: str | None = None,
    cache_dir: str | None = None,
    field: str = "train_split",
) -> list[dict[str, Any]]:
    """All rows of one split of ``source`` (a local file or folder, or a dataset name) through ``datasets``.

    A single local file is one split called ``train``. ``split`` may use ``datasets``' slicing syntax
    (``"train[:1000]"``); ``field`` names the setting in error messages.
    """
    kwargs: dict[str, Any] = {}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(resolve_path(cache_dir))
    if _looks_local(source):
        path = resolve_path(source)
        if path.is_file():
            builder = DATASETS_BUILDERS.get(path.suffix.lower())
            if builder is None:
                known = ", ".join(sorted(DATASETS_BUILDERS))
                raise DataError(f"{path}: unknown file type {path.suffix!r}; use one of {known}")
            name, options = builder
            args: tuple[Any, ...] = (name,)
            kwargs.update(options, data_files={"train": str(path)})
        elif path.is_dir():
            args = (str(path),) if config is None else (str(path), config)
        else:
            raise DataError(f"data source {path} does not exist (from {source!r}); check the path")
        what = f"{path}"
    else:
        args = (source,) if config is None else (source, config)
        what = f"dataset {source!r}" + (f" (config {config!r})" if config else "")
    dataset = _load(args, kwargs, what, split, field)
    if len(dataset) == 0:
        raise DataError(f"{what} split {split!r} has no rows")
    return dataset.to_list()


def read_source(path: str) -> list[dict[str, Any]]:
    """Rows of one local data file: the project's reader for ``.jsonl``/``.csv``/``.tsv``, ``datasets``
    for the other kinds (``.json``, ``.parquet``)."""
    file = resolve_path(path)
    if file.suffix.lower() not in PROJECT_READER_SUFFIXES:
        return load_split(path)
    if not file.is_file():
        raise DataError(f"data file {file} does not exist (from {path!r}); check the path or run the set-up")
    records = _read_records(file)
    if not records:
        raise DataError(f"{file} has no rows")
    return records
