"""Checkpoints that prove their integrity: a content checksum, finite weights, readable files.

Why: a few corrupted bytes inside a tensor's storage unpickle without complaint, and the loss only turns
NaN at the next step, after which the non-finite weights are written to the next checkpoint. Here every
checkpoint written by :class:`AtomicCheckpointIO` carries a SHA-256 digest of each of its top-level
sections (``state_dict``, ``optimizer_states``, ``loops``, ...), computed over a canonical walk of the
content (tensor dtype, shape and bytes; keys, lists and primitives), and loading recomputes them and
names the section that changed. A checkpoint without the digest (written by other code) still loads.
Non-finite floats in a ``state_dict`` or the optimizer state are refused both when writing and when
reading.
"""

from __future__ import annotations

import errno
import hashlib
import pickle
import stat
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..messages import listed
from .layout_check import validate_checkpoint_layout
from .optimizer_guard import MANIFEST_KEY

CHECKSUM_KEY = "layermoe_checksum"
_ALGORITHM = "sha256"
_MAX_LISTED = 6
# The fix named by every "this file is unusable" message: what to load instead.
_USE_ANOTHER = (
    "Resume from (or load) another checkpoint instead: last.ckpt, or the one saved before this file (an earlier"
    " step=*.ckpt)."
)
# weights_only refusals whose torch message names the cause and its fix (a class that needs allowlisting,
# a module to import); every other unpickling failure of a weights-only load means damaged bytes.
_EXPLAINED_BY_TORCH = ("Unsupported global", "must be imported to load", "is blocked")
# RuntimeErrors of torch.load that come from this machine, not the file: tensors saved on a device it
# lacks (map_location not set), too little memory.
_NOT_DAMAGE = ("Attempting to deserialize object on", "out of memory", "can't allocate memory")
# what torch.load raises for bytes it cannot read as a checkpoint
_DAMAGE_ERRORS = (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, OSError, ValueError)
# what the weights-only unpickler raises on a malformed stream (a memo or stack entry that is not there, a
# rebuild call with other arguments): damaged bytes too, since no code from the file ran
_MALFORMED_PICKLE = (KeyError, IndexError, TypeError, AttributeError, AssertionError)


class CheckpointIntegrityError(ValueError):
    """A checkpoint file is empty, truncated, corrupt, or holds non-finite weights."""


class NotACheckpointError(CheckpointIntegrityError):
    """A path or file that is not a Lightning checkpoint: a folder, a bare state_dict, another object."""


# What every "this is not a checkpoint" message suggests instead.
_PASS_A_CKPT = (
    "Pass a .ckpt file written by the Trainer (ModelCheckpoint or Trainer.save_checkpoint), e.g. last.ckpt in"
    " the run's checkpoint folder."
)


def _folder_message(path: Path) -> str:
    if (path / "layermoe_adapters.json").is_file():
        return (
            f"{path} is an adapter folder (save_adapters), not a checkpoint: load it with"
            " layermoe.checkpointing.load_adapters(model, folder)."
        )
    found = sorted(p.name for p in path.glob("*.ckpt"))
    listed = f" It holds {', '.join(found[:6])}." if found else " It holds no .ckpt file."
    return f"{path} is a folder, not a checkpoint file.{listed} {_PASS_A_CKPT}"


def check_lightning_checkpoint(checkpoint: Any, source: str) -> None:
    """Raise ``NotACheckpointError`` unless ``checkpoint`` is a dict with what Lightning reads first (its
    version and a ``state_dict``): other objects fail deep inside Lightning with a bare ``KeyError`` or
    ``AttributeError``."""
    if not isinstance(checkpoint, Mapping):
        raise NotACheckpointError(
            f"{source} is not a Lightning checkpoint: it holds a {type(checkpoint).__name__} (written by"
            f" torch.save, not by the Trainer). {_PASS_A_CKPT}"
        )
    missing = [k for k in ("pytorch-lightning_version", "state_dict") if k not in checkpoint]
    if not missing:
        return
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise NotACheckpointError(
            f"{source} is a bare state_dict ({len(checkpoint)} tensors, e.g. {next(iter(checkpoint))!r}), not"
            " a Lightning checkpoint: load it with module.load_state_dict(torch.load(path)), or "
            + _PASS_A_CKPT[0].lower()
            + _PASS_A_CKPT[1:]
        )
    keys = sorted(map(str, checkpoint))
    raise NotACheckpointError(
        f"{source} is not a Lightning checkpoint: it lacks {missing} (its keys: {keys[:8]}). {_PASS_A_CKPT}"
    )


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().to("cpu").contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, Mapping):
        digest.update(f"D{len(value)}".encode())
        for key in sorted(value, key=repr):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    elif isinstance(value, (set, frozenset)):  # repr order follows string hashing, random per process
        digest.update(f"S{len(value)}".encode())
        for item in sorted(value, key=repr):
            _feed(digest, item)
    elif type(value).__repr__ is object.__repr__:  # the default repr is a memory address: type only
        digest.update(f"O{type(value).__module__}.{type(value).__qualname__};".encode())
    else:
        digest.update(f"{type(value).__name__}:{value!r};".encode())


def content_digest(value: Any) -> str:
    """SHA-256 of ``value``'s content (tensors by dtype, shape and bytes; containers in key order)."""
    digest = hashlib.sha256()
    _feed(digest, value)
    return digest.hexdigest()


def section_digests(checkpoint: Mapping[str, Any]) -> dict[str, str]:
    """One digest per top-level section of a checkpoint (the checksum entry itself excluded)."""
    return {str(k): content_digest(v) for k, v in checkpoint.items() if k != CHECKSUM_KEY}


def with_checksum(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """A shallow copy of ``checkpoint`` carrying its section digests under ``layermoe_checksum``."""
    return {
        **checkpoint,
        CHECKSUM_KEY: {"algorithm": _ALGORITHM, "sections": section_digests(checkpoint)},
    }


def verify_checksum(
    checkpoint: Mapping[str, Any], source: str = "the checkpoint", skip: Iterable[str] = ()
) -> bool:
    """Raise ``CheckpointIntegrityError`` naming every section whose content no longer matches its digest.

    Returns False when the checkpoint carries no checksum (written by other code), True when verified.
    ``skip`` lists sections a caller legitimately changed after loading (e.g. ``hyper_parameters``
    updated by ``load_from_checkpoint(..., **overrides)``).
    """
    entry = checkpoint.get(CHECKSUM_KEY)
    if entry is None:
        return False
    if not isinstance(entry, Mapping) or entry.get("algorithm") != _ALGORITHM:
        raise CheckpointIntegrityError(
            f"{source}: {CHECKSUM_KEY} is malformed ({entry!r}); the file is corrupt."
        )
    saved = entry.get("sections")
    if not isinstance(saved, Mapping):
        raise CheckpointIntegrityError(f"{source}: {CHECKSUM_KEY} has no 'sections'; the file is corrupt.")
    skipped = set(skip)
    current = {k: v for k, v in section_digests(checkpoint).items() if k not in skipped}
    expected = {k: v for k, v in saved.items() if k not in skipped}
    problems = [f"section {k!r} is missing" for k in sorted(set(expected) - set(current))]
    problems += [
        f"section {k!r} was not in the checksummed file" for k in sorted(set(current) - set(expected))
    ]
    problems += [
        f"section {k!r} does not match its checksum"
        for k in sorted(set(current) & set(expected))
        if current[k] != expected[k]
    ]
    if problems:
        raise CheckpointIntegrityError(
            f"{source} is corrupt: "
            + listed(problems, _MAX_LISTED, sep="; ")
            + ". Its bytes changed after it was"
            f" written (disk or copy error, or an edit). {_USE_ANOTHER}"
        )
    return True


def non_finite_tensors(state: Mapping[str, Any]) -> list[str]:
    """Names of floating-point tensors in ``state`` holding NaN or infinity."""
    return [str(name) for name, value in state.items() if _non_finite(value)]


def _non_finite(value: Any) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and not bool(torch.isfinite(value).all())
    )


def _parameter_names(optimizer_state: Mapping[str, Any], manifest: Any) -> dict[Any, str]:
    """Parameter id in an optimizer state_dict -> the parameter's name (from ``OptimizerStateGuard``'s
    manifest: names per group, in the order of the group's ``params``)."""
    names: dict[Any, str] = {}
    groups = optimizer_state.get("param_groups")
    if not isinstance(groups, list) or not isinstance(manifest, list) or len(manifest) != len(groups):
        return names
    for group, named in zip(groups, manifest, strict=True):
        params = group.get("params") if isinstance(group, Mapping) else None
        if isinstance(params, list) and isinstance(named, list) and len(params) == len(named):
            names.update({index: str(entry[0]) for index, entry in zip(params, named, strict=True)})
    return names


def non_finite_optimizer_state(checkpoint: Mapping[str, Any]) -> list[str]:
    """Each floating-point optimizer-state tensor holding NaN or infinity, as "optimizer K <state> of
    <parameter name>" (the name comes from ``OptimizerStateGuard``'s manifest, else the position)."""
    states = checkpoint.get("optimizer_states")
    if not isinstance(states, list):
        return []
    manifests = checkpoint.get(MANIFEST_KEY)
    found = []
    for k, optimizer_state in enumerate(states):
        per_param = optimizer_state.get("state") if isinstance(optimizer_state, Mapping) else None
        if not isinstance(per_param, Mapping):
            continue
        manifest = manifests[k] if isinstance(manifests, list) and k < len(manifests) else None
        names = _parameter_names(optimizer_state, manifest)
        for index, entry in per_param.items():
            if not isinstance(entry, Mapping):
                continue
            owner = names.get(index, f"parameter #{index}")
            found += [f"optimizer {k} {key} of {owner}" for key, value in entry.items() if _non_finite(value)]
    return found


def check_finite_state(checkpoint: Mapping[str, Any], source: str, action: str) -> None:
    """Raise ``CheckpointIntegrityError`` when the checkpoint's ``state_dict`` or optimizer state holds
    NaN or infinity, naming the tensors and the fix."""
    state = checkpoint.get("state_dict")
    weights = non_finite_tensors(state) if isinstance(state, Mapping) else []
    moments = non_finite_optimizer_state(checkpoint)
    if not weights and not moments:
        return
    found = (
        [f"{len(weights)} weight tensors hold NaN or infinity ({listed(weights, _MAX_LISTED)})"]
        if weights
        else []
    )
    if moments:
        found.append(
            f"{len(moments)} optimizer state tensors hold NaN or infinity ({listed(moments, _MAX_LISTED)})"
        )
    if action == "write":
        fix = (
            "The training diverged before this save; nothing was written (the previous checkpoint is"
            " intact). Resume from the last checkpoint with a lower learning rate (model.lr), and check"
            " the data."
        )
    else:
        fix = (
            "It was written by code that does not refuse non-finite values (training had diverged), or"
            " its bytes are damaged. Resume from an earlier checkpoint (an earlier step=*.ckpt) and lower"
            " the learning rate (model.lr) or check the data."
        )
    raise CheckpointIntegrityError(f"Refusing to {action} {source}: {'; '.join(found)}. {fix}")


def read_checkpoint(path: str | Path, map_location: Any = "cpu", weights_only: bool | None = True) -> Any:
    """``torch.load`` with errors that name the file and the fix: damaged bytes (empty, truncated, corrupt:
    ``CheckpointIntegrityError``) instead of torch's own errors (``EOFError``, a miniz error, or a "Weights
    only load failed ... re-run with weights_only=False" that damaged pickle bytes also raise), and a file
    that could not be opened or read as what it is: ``FileNotFoundError`` for a missing one,
    ``PermissionError`` for one this process may not read, another ``OSError`` for a failing disk. Neither
    those nor a load that failed for want of memory or of the device the tensors were saved from are
    called damaged: the file may be intact."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError as err:
        raise _read_failure(path, err) from err
    if stat.S_ISDIR(info.st_mode):
        raise NotACheckpointError(_folder_message(path))
    if not stat.S_ISREG(info.st_mode):
        raise NotACheckpointError(f"{path} is not a regular file (a device, pipe or socket). {_PASS_A_CKPT}")
    size = info.st_size
    if size == 0:
        raise CheckpointIntegrityError(
            f"checkpoint {path} is empty (0 bytes): the write that produced it never completed (a crash or a"
            f" full disk with a non-atomic writer). {_USE_ANOTHER}"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except (*_DAMAGE_ERRORS, *_MALFORMED_PICKLE) as err:
        if isinstance(err, _MALFORMED_PICKLE) and weights_only is False:
            raise  # a full unpickler runs the file's code: its errors are not the bytes' fault alone
        if isinstance(err, OSError) and err.errno != errno.EINVAL:
            raise _read_failure(path, err) from err
        # EINVAL: torch's zip reader seeking before the start of a file cut short (a few KB to 64 KiB)
        text = str(err)
        if isinstance(err, pickle.UnpicklingError) and any(m in text for m in _EXPLAINED_BY_TORCH):
            raise  # a class the weights-only loader refuses: torch's message names it and the fix
        if isinstance(err, RuntimeError) and (
            isinstance(err, torch.OutOfMemoryError) or any(m in text for m in _NOT_DAMAGE)
        ):
            raise RuntimeError(f"checkpoint {path} was not loaded (the file is not damaged): {text}") from err
        first = next((line for line in text.splitlines() if line.strip()), "")
        detail = text.partition("WeightsUnpickler error:")[2].strip()
        if detail:  # torch's weights-only message: its cause line, not the "re-run unsafely" advice
            first = detail.splitlines()[0]
        raise CheckpointIntegrityError(
            f"checkpoint {path} ({size} bytes) cannot be read: it is truncated or damaged, or not a torch"
            f" checkpoint ({type(err).__name__}: {first}). {_USE_ANOTHER}"
        ) from err


def _read_failure(path: Path, err: OSError) -> OSError:
    """``err`` (from opening or reading ``path``) as the same kind of error, naming the file and the fix."""
    if isinstance(err, (FileNotFoundError, NotADirectoryError)):
        return FileNotFoundError(
            f"checkpoint {path} does not exist; check the path (--ckpt_path accepts 'last')."
        )
    reason = err.strerror or str(err)
    if isinstance(err, PermissionError):
        return PermissionError(
            err.errno,
            f"checkpoint {path} cannot be opened: this process may not read it ({reason}). Fix: give it read"
            " permission and its folders search permission (chmod u+r on the file, u+x on the folders), or"
            " copy it somewhere this process can read. The file itself is not known to be damaged.",
        )
    return type(err)(
        err.errno,
        f"reading checkpoint {path} failed: {reason}. The disk or filesystem failed while reading; the file"
        " itself may be intact: retry, and check the disk or the network mount it is on.",
    )


def verify_loaded_checkpoint(checkpoint: Mapping[str, Any], source: str) -> None:
    """The checks every loaded checkpoint passes before its weights are used, each error naming ``source``:
    the adapter layout (first: a broken layout is named layer by layer), the content checksum, finite
    weights."""
    validate_checkpoint_layout(checkpoint)
    verify_checksum(checkpoint, source)
    check_finite_state(checkpoint, source, "load")


def read_verified_checkpoint(
    path: str | Path,
    map_location: Any = "cpu",
    weights_only: bool | None = True,
    *,
    lightning: bool = True,
) -> Any:
    """:func:`read_checkpoint` then :func:`verify_loaded_checkpoint`: what ``--ckpt_path``,
    ``AtomicCheckpointIO``, ``MoELoRAFineTuner.load_from_checkpoint`` and ``load_adapted_checkpoint`` run
    on a local checkpoint file before Lightning or the module sees it. ``lightning``: the file must also be
    a Lightning checkpoint (:func:`check_lightning_checkpoint`); a ``CheckpointIO`` reads any dict."""
    checkpoint = read_checkpoint(path, map_location=map_location, weights_only=weights_only)
    source = f"checkpoint {path}"
    if lightning:
        check_lightning_checkpoint(checkpoint, source)
    elif not isinstance(checkpoint, Mapping):
        raise NotACheckpointError(f"{source} holds a {type(checkpoint).__name__}, not a checkpoint dict.")
    verify_loaded_checkpoint(checkpoint, source)
    return checkpoint
