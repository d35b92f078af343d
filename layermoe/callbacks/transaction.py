"""Make a rewire all-or-nothing at the level of the module tree.

The adapter resize rebinds parameters, buffers and plain attributes (it never writes into the old
tensors), so a shallow record of every module's ``__dict__`` (with copies of its ``_parameters``,
``_buffers`` and ``_modules`` dicts) plus each parameter's ``requires_grad`` is enough to undo it, no
matter how far the surgery, the DDP re-wrap or the optimizer rebuild got.
"""

from __future__ import annotations

from typing import Any

from torch import nn

_DICTS = ("_parameters", "_buffers", "_modules")


class ModuleSnapshot:
    """Undo record of a module tree (no tensor copies; cheap)."""

    def __init__(self, root: nn.Module) -> None:
        self._records: list[tuple[nn.Module, dict[str, Any], dict[str, dict[str, Any]]]] = []
        for module in root.modules():
            attrs = {k: v for k, v in module.__dict__.items() if k not in _DICTS}
            dicts = {k: dict(module.__dict__[k]) for k in _DICTS if k in module.__dict__}
            self._records.append((module, attrs, dicts))
        self._requires_grad = [(p, p.requires_grad) for p in root.parameters()]

    def restore(self) -> None:
        """Rebind every recorded attribute, parameter, buffer and child, and reset ``requires_grad``."""
        for module, attrs, dicts in self._records:
            for key in [k for k in module.__dict__ if k not in _DICTS and k not in attrs]:
                del module.__dict__[key]
            module.__dict__.update(attrs)
            for key, saved in dicts.items():
                live = module.__dict__[key]
                live.clear()
                live.update(saved)
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)
