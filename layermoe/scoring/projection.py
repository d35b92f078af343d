"""Seeded random projection of per-sample gradients to k coordinates (a CountSketch).

Each coordinate j of a gradient piece goes to bucket h(j) in [0, k) with a random sign s(j); the
sketch is sum_j s(j) x_j e_h(j). Inner products are preserved in expectation (E[<Sx, Sy>] = <x, y>,
variance <= 2 ||x||^2 ||y||^2 / k), and the cost is one pass over the coordinates with O(d) memory,
where a dense Gaussian projection of a 300k-coordinate block would need a 300k x k matrix. The hash is
derived from (seed, block, module, parameter), so every process builds the same sketch.
"""

from __future__ import annotations

import zlib

import torch


def _piece_seed(seed: int, key: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2**63 - 1)


class CountSketch:
    """Sketch (rows, d) -> (rows, k) for one parameter piece; buckets and signs built once per device."""

    def __init__(self, dim: int, k: int, seed: int, key: str) -> None:
        if k < 1:
            raise ValueError(f"projection_dim must be an int >= 1, got {k}")
        generator = torch.Generator().manual_seed(_piece_seed(seed, key))
        self.k = int(k)
        self.bucket = torch.randint(0, self.k, (dim,), generator=generator)
        self.sign = torch.randint(0, 2, (dim,), generator=generator).mul_(2).sub_(1)
        self._on: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        key = (rows.device, rows.dtype)
        if key not in self._on:
            self._on[key] = (self.bucket.to(rows.device), self.sign.to(device=rows.device, dtype=rows.dtype))
        bucket, sign = self._on[key]
        out = torch.zeros(rows.shape[0], self.k, dtype=rows.dtype, device=rows.device)
        return out.index_add_(1, bucket, rows * sign)
