"""Errors raised by :class:`~layermoe.callbacks.LayerInfluenceCallback`.

Two kinds, so that users can tell a configuration mistake (raised before training starts) from a
failure during a rewire (raised mid-fit, after the model and optimizer were restored).
"""

from __future__ import annotations


class CallbackConfigError(ValueError):
    """A keyword argument or the trainer/module setup is not usable; the message names the field and the fix."""


class RewireError(RuntimeError):
    """Scoring, allocation or the surgery failed during fit.

    Raised after the model, the optimizer and the schedulers were put back exactly as they were, with
    the original exception chained as ``__cause__``.
    """
