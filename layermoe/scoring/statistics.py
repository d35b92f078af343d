"""Per-block gradient statistics: everything the gradient scorers need, and nothing per parameter.

The scorers only ever see inner products of per-sample gradients (Gram matrices), so a block's
statistics are a few small float64 matrices whatever the block's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .errors import NonFiniteGradientError, ScoringError

_SLAB = 1 << 16  # columns per float64 slab when forming Grams from float32 rows (bounds the temporaries)


@dataclass(frozen=True)
class BlockStatistics:
    """Statistics of one block's per-sample gradients g_i (training, n) and v_j (validation, m).

    K_tt: (n, n) g_i . g_k.  K_vt: (m, n) v_j . g_i.  train_sq_norms: (n,) ||g_i||^2.
    val_sq_norms: (m,) ||v_j||^2.  val_mean_grad_sq: () ||mean_j v_j||^2.  K_gt: (n,) (mean_j v_j) . g_i.
    K_vv: (m, m) v_j . v_k (None when built by hand without it; needed only by `subset`).
    dim: d_l, the number of scored coordinates (before any projection; the damping rule uses it).
    projected_dim: k when the gradients were sketched to k coordinates (then every product above is
    the sketch's unbiased estimate), None when exact.
    exact_mean: with projected_dim, the mean validation gradient gbar was kept exact and the sketch
    applied to the directions orthogonal to it (`statistics_with_exact_mean`): K_gt and val_mean_grad_sq
    are exact, and the other products are Grams of the mapped rows. All tensors are float64.
    """

    K_tt: torch.Tensor
    K_vt: torch.Tensor
    train_sq_norms: torch.Tensor
    val_sq_norms: torch.Tensor
    val_mean_grad_sq: torch.Tensor
    K_gt: torch.Tensor
    dim: int
    projected_dim: int | None = None
    K_vv: torch.Tensor | None = None
    exact_mean: bool = False

    def subset(self, train: torch.Tensor, val: torch.Tensor) -> BlockStatistics:
        """The statistics the same gradients give on a subset of the samples (index tensors): exactly
        what capturing only those samples would give, with no new forward or backward pass. Used to
        resample the scored samples (standard errors). With `exact_mean`, a subset of the training
        samples alone keeps the exact K_gt; a subset of the validation samples gets the mean of the
        mapped rows (the sketch's estimate, not what a re-capture with its own exact mean would give)."""
        if self.K_vv is None:
            raise ValueError("BlockStatistics.subset needs K_vv (statistics built by statistics_from_pieces)")
        k_vt = self.K_vt[val][:, train]
        k_vv = self.K_vv[val][:, val]
        exact_mean = self.exact_mean and _everything(val, self.m)
        return BlockStatistics(
            K_tt=self.K_tt[train][:, train],
            K_vt=k_vt,
            train_sq_norms=self.train_sq_norms[train],
            val_sq_norms=self.val_sq_norms[val],
            # the exact mean's products, not their (equal up to rounding) recomputation from K_vt, K_vv
            val_mean_grad_sq=self.val_mean_grad_sq if exact_mean else k_vv.mean(),
            K_gt=self.K_gt[train] if exact_mean else k_vt.mean(dim=0),
            dim=self.dim,
            projected_dim=self.projected_dim,
            K_vv=k_vv,
            exact_mean=exact_mean,
        )

    @property
    def n(self) -> int:
        """Number of training samples."""
        return int(self.K_tt.shape[0])

    @property
    def m(self) -> int:
        """Number of validation samples."""
        return int(self.K_vt.shape[0])

    def check_finite(self, block: int) -> None:
        """Raise NonFiniteGradientError naming `block` if any statistic is NaN or inf."""
        for name in ("K_tt", "K_vt", "train_sq_norms", "val_sq_norms", "val_mean_grad_sq", "K_gt"):
            if not bool(torch.isfinite(getattr(self, name)).all()):
                raise NonFiniteGradientError(
                    f"block {block}: gradient statistic {name} contains NaN or inf (the loss or the "
                    "model produced non-finite gradients); check the loss on the scoring batches, lower "
                    "the learning rate, or score in float32"
                )


def _everything(index: torch.Tensor, count: int) -> bool:
    """Whether `index` lists each of 0..count-1 exactly once (in any order)."""
    return index.numel() == count and torch.equal(index.sort().values.cpu(), torch.arange(count))


def statistics_with_exact_mean(
    train_rows: torch.Tensor,
    val_rows: torch.Tensor,
    mean_products: torch.Tensor,
    mean_sq: torch.Tensor,
    dim: int,
    projected_dim: int,
) -> BlockStatistics:
    """Statistics of sketched rows Sg_i (n, k) and Sv_j (m, k) whose mean validation gradient gbar is
    known exactly: mean_products (n,) = gbar . g_i and mean_sq = ||gbar||^2, both exact.

    Every vector is mapped by T x = (x . u, S(x - (x . u) u)) with u = gbar / ||gbar||: the gbar
    direction is kept exactly as one extra coordinate and only the rest is sketched. E<Tx, Ty> = x . y
    (the sketched part is unbiased and orthogonal to u), and T is linear, so all statistics are the Gram
    matrices of one set of mapped vectors: consistent (positive semi-definite; a validation mean in the
    span of the training gradients is solved for exactly, as with a plain sketch), with K_gt and
    ||gbar||^2 exact and no sketch noise along gbar. Only linear images of the rows are needed:
    S gbar = mean_j Sv_j, so Tg_i = (a_i, Sg_i - a_i Su) with a_i = gbar . g_i / ||gbar||. For a
    validation row v_j . u is not known exactly (the rows are sketched before gbar is complete); it is
    estimated as ||gbar|| + (Sv_j - S gbar) . Su, which averages to ||gbar|| over the samples, so the
    mapped validation rows average to T gbar exactly. Why not simply replace the sketched K_gt by the
    exact one: mixed with a sketched training Gram it is no longer a Gram matrix, and on SmolLM2's
    attention weights that turned fisher_influence's ranking to noise and curvature gains negative
    (BENCHMARKS.md, "Memory plan at any model size").
    """
    n = int(train_rows.shape[0])
    train = train_rows.to(torch.float64)
    val = val_rows.to(torch.float64)
    products = mean_products.to(dtype=torch.float64, device=train.device)
    mean_sq = torch.as_tensor(mean_sq, dtype=torch.float64, device=train.device)
    if products.shape != (n,) or mean_sq.ndim != 0:
        raise ValueError(f"mean_products must have shape ({n},) and mean_sq must be a scalar")
    norm = float(mean_sq.sqrt())
    if norm > 0.0:
        sketched_mean = val.mean(dim=0)  # S gbar, by linearity
        direction = sketched_mean / norm  # S u
        along_train = products / norm
        along_val = norm + (val - sketched_mean) @ direction
        train_pieces = [along_train.unsqueeze(1), train - along_train.unsqueeze(1) * direction]
        val_pieces = [along_val.unsqueeze(1), val - along_val.unsqueeze(1) * direction]
    else:  # gbar = 0: every product with it is 0, and the plain sketch already gives S gbar = 0
        train_pieces, val_pieces = [train], [val]
    stats = statistics_from_pieces(train_pieces, val_pieces, dim, projected_dim)
    # the exact values themselves, not their (equal up to rounding) reconstruction from the mapped rows
    return replace(stats, K_gt=products, val_mean_grad_sq=mean_sq, exact_mean=True)


def gram(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b.T in float64, slab by slab over columns so float32 rows never need a full float64 copy."""
    b = a if b is None else b
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[1], _SLAB):
        sa = a[:, start : start + _SLAB].double()
        sb = sa if b is a else b[:, start : start + _SLAB].double()
        out += sa @ sb.T
    return out


def statistics_from_rows(
    train_rows: torch.Tensor, val_rows: torch.Tensor, dim: int, projected_dim: int | None = None
) -> BlockStatistics:
    """Build a block's statistics from its per-sample gradient rows (n, d') and (m, d')."""
    return statistics_from_pieces([train_rows], [val_rows], dim, projected_dim)


def statistics_from_pieces(
    train_pieces: list[torch.Tensor],
    val_pieces: list[torch.Tensor],
    dim: int,
    projected_dim: int | None = None,
) -> BlockStatistics:
    """Statistics from a block's gradient split into pieces (one per parameter): the block's gradient
    is their concatenation, so every Gram is the sum of the pieces' Grams and nothing is concatenated.
    """
    if not train_pieces or len(train_pieces) != len(val_pieces):
        raise ValueError("train_pieces and val_pieces must be non-empty lists of the same length")
    n, m = int(train_pieces[0].shape[0]), int(val_pieces[0].shape[0])
    if n == 0 or m == 0:
        raise ValueError(f"scoring needs at least one training and one validation sample; got n={n}, m={m}")
    device = train_pieces[0].device
    k_tt = torch.zeros(n, n, dtype=torch.float64, device=device)
    k_vt = torch.zeros(m, n, dtype=torch.float64, device=device)
    k_vv = torch.zeros(m, m, dtype=torch.float64, device=device)
    val_sq = torch.zeros(m, dtype=torch.float64, device=device)
    mean_sq = torch.zeros((), dtype=torch.float64, device=device)
    for train, val in zip(train_pieces, val_pieces, strict=True):
        if train.ndim != 2 or val.ndim != 2 or train.shape[1] != val.shape[1]:
            raise ValueError(
                f"gradient pieces must be 2-D with matching widths, got {tuple(train.shape)} and {tuple(val.shape)}"
            )
        if train.shape[0] != n or val.shape[0] != m:
            raise ValueError("every gradient piece must have one row per sample (n training, m validation)")
        k_tt += gram(train)
        k_vt += gram(val, train)
        k_vv += gram(val)
        val_sq += gram_diagonal(val)
        mean_val = val.double().mean(dim=0)
        mean_sq += mean_val @ mean_val
    return BlockStatistics(
        K_tt=k_tt,
        K_vt=k_vt,
        train_sq_norms=torch.diagonal(k_tt).clone(),
        val_sq_norms=val_sq,
        val_mean_grad_sq=mean_sq,
        K_gt=k_vt.mean(dim=0),
        dim=int(dim),
        projected_dim=projected_dim,
        K_vv=k_vv,
    )


def gram_diagonal(rows: torch.Tensor) -> torch.Tensor:
    """Squared row norms in float64, slab by slab."""
    out = torch.zeros(rows.shape[0], dtype=torch.float64, device=rows.device)
    for start in range(0, rows.shape[1], _SLAB):
        out += (rows[:, start : start + _SLAB].double() ** 2).sum(dim=1)
    return out


def relative_damping(stats: BlockStatistics, scale: float) -> float:
    """LayerIF/DataInf's layer-wise damping lambda_l = scale * mean_i ||g_i||^2 / d_l (scale 0.1)."""
    return scale * float(stats.train_sq_norms.mean()) / max(stats.dim, 1)


def finite_float(value: torch.Tensor | float, block: int, what: str) -> float:
    """float(value), raising ScoringError naming the block when it is NaN or inf."""
    number = float(value)
    if not math.isfinite(number):
        raise ScoringError(f"block {block}: {what} is {number}; the statistics are degenerate or overflowed")
    return number
