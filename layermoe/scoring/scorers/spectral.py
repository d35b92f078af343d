"""alpha_hill: AlphaLoRA's PL_Alpha_Hill from the spectra of a block's frozen base weights.

Heavy-tailed self-regularization: the eigenvalues of W^T W of a well-trained layer follow a power law
p(x) ~ x^-alpha in their tail, and a smaller alpha means a more heavily trained layer. AlphaLoRA gives
more experts to blocks with larger alpha (less trained), so the score is alpha itself.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ScoringError
from ..modules import base_weight, scored_layers
from .base import Scorer, register_scorer


def hill_alpha_xmin_peak(eigenvalues: torch.Tensor, bins: int = 100) -> float:
    """Hill estimate of the power-law exponent of the eigenvalue tail, xmin by the "xmin_peak" rule.

    xmin_peak (WeightWatcher/AlphaLoRA): histogram log10 of the nonzero eigenvalues in `bins` equal
    bins between their min and max (log-spaced bins of the eigenvalues); the left edge of the fullest
    bin is the peak p. Every eigenvalue x in [0.95 p, 1.5 p] (except the largest) is tried as xmin:
    alpha = 1 + n / sum_{x_i >= xmin} ln(x_i / xmin) over the n tail eigenvalues, and the candidate whose
    fitted CDF 1 - (x/xmin)^(1-alpha) is closest to the tail's empirical CDF i/n (Kolmogorov-Smirnov
    distance) wins. With no candidate in the window, the first eigenvalue >= p is xmin.
    """
    values = eigenvalues.detach().double().flatten()
    values = values[values > values.abs().max() * 1e-12] if values.numel() else values
    values = torch.sort(values).values
    count = values.numel()
    if count < 2:
        raise ValueError(f"alpha_hill needs at least 2 nonzero eigenvalues, got {count}")
    logs = torch.log10(values)
    low, high = float(logs[0]), float(logs[-1])
    if high == low:
        raise ValueError("alpha_hill: all eigenvalues are equal, the power-law tail is undefined")
    counts = torch.histc(logs, bins=bins, min=low, max=high)
    edges = torch.linspace(low, high, bins + 1, dtype=torch.float64)
    peak = 10 ** float(edges[int(torch.argmax(counts))])
    candidates = [i for i in range(count - 1) if 0.95 * peak <= float(values[i]) <= 1.5 * peak]
    if not candidates:
        first = int(torch.searchsorted(values, torch.tensor(peak, dtype=torch.float64)))
        candidates = [min(first, count - 2)]
    best_alpha, best_distance = float("nan"), float("inf")
    for i in candidates:
        tail = values[i:]
        n = tail.numel()
        xmin = tail[0]
        alpha = 1.0 + n / float(torch.log(tail / xmin).sum())
        fitted = 1.0 - (tail / xmin) ** (1.0 - alpha)
        empirical = torch.arange(n, dtype=torch.float64) / n
        distance = float((fitted - empirical).abs().max())
        if distance < best_distance:
            best_alpha, best_distance = alpha, distance
    return best_alpha


@register_scorer("alpha_hill")
class AlphaHillScorer(Scorer):
    """Mean over a block's wrapped modules of PL_Alpha_Hill of the base weight's W^T W spectrum.

    Raw quantity: alpha (typically 2-6). Score = alpha: larger alpha = less trained block = more capacity
    (AlphaLoRA). `modules`: substrings selecting which modules count (default: every wrapped module).
    """

    needs_statistics = False

    def __init__(self, modules: list[str] | None = None, bins: int = 100) -> None:
        if bins < 2:
            raise ValueError(f"bins must be >= 2, got {bins}")
        self.modules = modules
        self.bins = bins

    def score(self, model: nn.Module) -> dict[int, float]:  # type: ignore[override]
        out: dict[int, float] = {}
        for block, layers in scored_layers(model, self.modules).items():
            alphas = []
            for name, layer in layers.items():
                weight = base_weight(layer).double()
                if not bool(torch.isfinite(weight).all()):
                    raise ScoringError(f"block {block}: base weight of {name} contains NaN or inf")
                eigenvalues = torch.linalg.svdvals(weight) ** 2
                alphas.append(hill_alpha_xmin_peak(eigenvalues, self.bins))
            value = sum(alphas) / len(alphas)
            if not math.isfinite(value):
                raise ScoringError(f"block {block}: alpha_hill is {value}")
            out[block] = value
        return out
