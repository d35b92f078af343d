"""The LayerIF/DataInf influence loop written out literally, as the published code computes it.

Kept as the reference the closed form is tested against and the baseline the benchmark times: a
Python loop per validation sample, per training sample, per parameter tensor. Use the scorers for real
work (they compute the same numbers from Gram matrices, orders of magnitude faster).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def layerif_loop_influence_matrix(
    train_grads: Sequence[Mapping[str, torch.Tensor]],
    val_grads: Sequence[Mapping[str, torch.Tensor]],
    damping_scale: float = 0.1,
    damping: float | None = None,
) -> torch.Tensor:
    """(n, m) DataInf influence of training sample i on validation sample j's loss, for one block.

    train_grads[i][name] / val_grads[j][name]: per-sample gradients of the block's parameter tensors.
    The block is LayerIF's unit: one damping lambda = damping_scale * mean_i ||g_i||^2 / d for the whole
    block, and every inner product runs over all of the block's tensors. Arithmetic stays in the
    gradients' dtype (pass float64 gradients for a precise reference).
    """
    n = len(train_grads)
    names = list(val_grads[0])
    d = sum(val_grads[0][name].numel() for name in names)
    if damping is None:
        sq_norms = []
        for grads in train_grads:
            total = 0.0
            for name in names:
                total += float(torch.sum(grads[name] ** 2))
            sq_norms.append(total)
        damping = damping_scale * (sum(sq_norms) / n) / d
    influence = torch.zeros(n, len(val_grads), dtype=torch.float64)
    for j, val in enumerate(val_grads):
        hvp = {name: torch.zeros_like(val[name]) for name in names}
        for grads in train_grads:
            dot = 0.0
            sq = 0.0
            for name in names:
                dot += float(torch.sum(val[name] * grads[name]))
                sq += float(torch.sum(grads[name] ** 2))
            coefficient = dot / (damping + sq)
            for name in names:
                hvp[name] += (val[name] - coefficient * grads[name]) / (n * damping)
        for i, grads in enumerate(train_grads):
            value = 0.0
            for name in names:
                value += float(torch.sum(hvp[name] * grads[name]))
            influence[i, j] = -value
    return influence


def layerif_loop_influences(
    train_grads: Sequence[Mapping[str, torch.Tensor]],
    val_grads: Sequence[Mapping[str, torch.Tensor]],
    damping_scale: float = 0.1,
    damping: float | None = None,
) -> torch.Tensor:
    """(n,) influence of each training sample on the mean validation loss (the loop's matrix averaged
    over validation samples), the quantity the `layerif` scorer aggregates."""
    return layerif_loop_influence_matrix(train_grads, val_grads, damping_scale, damping).mean(dim=1)
