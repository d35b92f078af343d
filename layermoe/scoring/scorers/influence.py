"""Influence-type scorers from per-block Gram matrices: layerif, fisher_influence, curvature_gain.

Notation for block l: g_i (i < n) training per-sample gradients, K = G G^T their Gram matrix,
gbar the mean validation gradient, K_gt = G gbar, d_l the number of scored coordinates.
Damping: lambda_l = damping_scale * mean_i ||g_i||^2 / d_l (LayerIF/DataInf use damping_scale = 0.1),
or a fixed `damping`. All solves are n x n, in float64.

Influence of training sample i on the validation loss: I_i = -gbar^T H^-1 g_i, with H a damped
curvature. I_i < 0 means up-weighting sample i lowers the validation loss (beneficial).
"""

from __future__ import annotations

import math

import torch

from ..errors import ScoringError, check_damping
from ..statistics import BlockStatistics, finite_float, relative_damping
from .base import Scorer, register_scorer

AGGREGATIONS = ("beneficial", "top25", "all")


def block_damping(stats: BlockStatistics, block: int, damping: float | None, damping_scale: float) -> float:
    """lambda_l for one block; ScoringError when it is not a positive finite number."""
    lam = damping if damping is not None else relative_damping(stats, damping_scale)
    if not (math.isfinite(lam) and lam > 0):
        raise ScoringError(
            f"block {block}: damping lambda={lam} (every training gradient of the block is zero or "
            "non-finite); score with more training samples or pass a fixed damping=... > 0"
        )
    return lam


def aggregate_influence(influence: torch.Tensor, mode: str) -> float:
    """One capacity score from per-sample influences (higher = more capacity).

    beneficial: sum over samples of max(-I_i, 0), the total benefit of the samples that lower the
    validation loss (>= 0; LayerIF's default). top25: the same over the 25% most beneficial of those
    samples (ceil). all: sum of -I_i (net benefit; may be negative).
    """
    benefit = -influence
    if mode == "all":
        return float(benefit.sum())
    if mode == "beneficial":
        return float(benefit.clamp_min(0).sum())
    if mode == "top25":
        positive = benefit[benefit > 0]
        if positive.numel() == 0:
            return 0.0
        k = math.ceil(0.25 * positive.numel())
        return float(positive.topk(k).values.sum())
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {mode!r}")


class _DampedScorer(Scorer):
    def __init__(self, damping: float | None = None, damping_scale: float = 0.1) -> None:
        self.damping = None if damping is None else check_damping(damping, "damping")
        self.damping_scale = check_damping(damping_scale, "damping_scale")

    def score(self, stats: dict[int, BlockStatistics]) -> dict[int, float]:
        out: dict[int, float] = {}
        for block in sorted(stats):
            block_stats = stats[block]
            block_stats.check_finite(block)
            lam = block_damping(block_stats, block, self.damping, self.damping_scale)
            out[block] = finite_float(self.block_score(block_stats, lam), block, f"{self.name} score")
        return out

    def block_score(self, stats: BlockStatistics, lam: float) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


class _InfluenceScorer(_DampedScorer):
    def __init__(
        self, aggregation: str = "beneficial", damping: float | None = None, damping_scale: float = 0.1
    ) -> None:
        super().__init__(damping=damping, damping_scale=damping_scale)
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        self.aggregation = aggregation

    def influences(self, stats: BlockStatistics, lam: float) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def block_score(self, stats: BlockStatistics, lam: float) -> float:
        return aggregate_influence(self.influences(stats, lam), self.aggregation)


def datainf_influences(stats: BlockStatistics, lam: float) -> torch.Tensor:
    """DataInf closed form: I = -[K_gt/lam - K (K_gt / D) / (n lam)], D_i = lam + ||g_i||^2.

    DataInf replaces (lam I + G^T G / n)^-1 by (1/n) sum_i (lam I + g_i g_i^T)^-1 and applies
    Sherman-Morrison to each term; the n x n Gram makes the whole sum one matrix-vector product.
    """
    k_gt = stats.K_gt
    diag = lam + stats.train_sq_norms
    return -(k_gt - stats.K_tt @ (k_gt / diag) / stats.n) / lam


def _damped_gram_factor(stats: BlockStatistics, lam: float) -> torch.Tensor:
    """Cholesky factor of (n lam I + K), the matrix Woodbury leaves to invert."""
    n = stats.n
    matrix = stats.K_tt + n * lam * torch.eye(n, dtype=torch.float64, device=stats.K_tt.device)
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        raise ScoringError(f"damped Gram matrix is not positive definite (lambda={lam}); raise the damping")
    return factor


def fisher_influences(stats: BlockStatistics, lam: float) -> torch.Tensor:
    """Exact damped empirical-Fisher influence: I = -G (lam I + G^T G/n)^-1 gbar.

    Woodbury: (lam I + G^T G/n)^-1 = (1/lam)[I - G^T (n lam I + K)^-1 G], and
    (1/lam)[K_gt - K (n lam I + K)^-1 K_gt] = n (n lam I + K)^-1 K_gt, which avoids the cancellation.
    """
    factor = _damped_gram_factor(stats, lam)
    return -stats.n * torch.cholesky_solve(stats.K_gt.unsqueeze(1), factor).squeeze(1)


@register_scorer("layerif")
class LayerIFScorer(_InfluenceScorer):
    """LayerIF (arXiv 2505.23811) with the DataInf approximation of the inverse curvature.

    Raw quantity: I_i, the DataInf influence of training sample i on the block's validation loss
    (negative = beneficial). Score = aggregation of -I_i (default "beneficial": sum of max(-I_i, 0)),
    so a block whose training data reduces validation loss most gets the most capacity.
    """

    def influences(self, stats: BlockStatistics, lam: float) -> torch.Tensor:
        return datainf_influences(stats, lam)


@register_scorer("fisher_influence")
class FisherInfluenceScorer(_InfluenceScorer):
    """The same influence as `layerif` with the exact damped empirical Fisher inverse (no DataInf swap).

    Raw quantity: I_i = -gbar^T (lam I + G^T G/n)^-1 g_i; score = aggregation of -I_i, as for layerif.
    """

    def influences(self, stats: BlockStatistics, lam: float) -> torch.Tensor:
        return fisher_influences(stats, lam)


@register_scorer("curvature_gain")
class CurvatureGainScorer(_DampedScorer):
    """Curvature-aware gain zeta_l^2 = gbar^T (lam I + F_l)^-1 gbar (arXiv 2603.00910), F = G^T G / n.

    Raw quantity: the decrease of the validation loss a damped natural-gradient step on the block can
    buy; it is >= 0 and the score is zeta^2 itself (bigger gain = more capacity). By Woodbury,
    zeta^2 = (1/lam)[||gbar||^2 - K_gt^T (n lam I + K)^-1 K_gt].
    """

    def block_score(self, stats: BlockStatistics, lam: float) -> float:
        factor = _damped_gram_factor(stats, lam)
        solved = torch.cholesky_solve(stats.K_gt.unsqueeze(1), factor).squeeze(1)
        total = float(stats.val_mean_grad_sq)
        value = (total - float(stats.K_gt @ solved)) / lam
        if value < 0:
            # Mathematically >= 0; tiny negatives are round-off of a gbar lying in the training span.
            if value < -1e-9 * max(total / lam, 1e-300):
                raise ScoringError(f"curvature gain came out negative ({value}); statistics inconsistent")
            value = 0.0
        return value
