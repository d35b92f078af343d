"""Combining per-rank captures so every rank ends with identical statistics and scores.

What is all-gathered: for every scored block and every parameter piece, each rank's per-sample
gradient rows, training (n_r, d'_p) and validation (m_r, d'_p), where d'_p is the piece's size or,
with `projection_dim=k`, the block's k sketch coordinates (one (n_r, k) and one (m_r, k) tensor per
block). Cross-rank Gram entries g_i . g_j need both rows, so reducing local Grams alone cannot work;
communication is (n + m) * d' numbers per block, which is why `projection_dim` is recommended under DDP.
Every rank then builds the same Grams from the rows concatenated in rank order. A sketched block with an
exact mean validation gradient (`BlockPlan.exact_mean`) also gathers each rank's exact validation sum
per parameter piece once the validation chunks are done (d_l numbers per rank; every rank then holds the
same mean before its training chunks), and the training rows' n_r exact products with that mean.

`reduce_fn(tensor) -> sequence of tensors, one per rank in rank order` (an all-gather). Shards may
have different sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

ReduceFn = Callable[[torch.Tensor], Sequence[torch.Tensor]]


def torch_distributed_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """All-gather along dim 0 over the default torch.distributed group, padding unequal shards."""
    import torch.distributed as dist

    world = dist.get_world_size()
    size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.int64)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(int(s) for s in sizes))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return [part[: int(s)] for part, s in zip(parts, sizes, strict=True)]


def gather_rows(rows: torch.Tensor, reduce_fn: ReduceFn | None) -> torch.Tensor:
    """This rank's rows, or every rank's rows concatenated in rank order when reduce_fn is given."""
    if reduce_fn is None:
        return rows
    parts = list(reduce_fn(rows))
    if not parts or any(p.ndim != rows.ndim or p.shape[1:] != rows.shape[1:] for p in parts):
        raise ValueError(
            "reduce_fn must return one tensor per rank shaped like its input except along dim 0 "
            "(an all-gather); see layermoe.scoring.torch_distributed_gather"
        )
    return torch.cat([p.to(rows.device) for p in parts], dim=0)
