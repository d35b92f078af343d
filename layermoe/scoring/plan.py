"""Memory plan of a scoring pass, from shapes alone: how many passes, how many bytes of per-sample
gradient rows, and which blocks are CountSketched to how many coordinates.

Why a plan: exact rows cost (n + m) * d_l numbers per block, which grows with the model (4.2 GB for
SmolLM2-135M's adapters at the callback's defaults, hundreds of GB for a 7B model's base weights).
Splitting the blocks into several passes keeps the rows exact but repeats the forward+backward per
pass; a CountSketch keeps every block in one pass at a bounded, unbiased error. The plan keeps exact
rows when everything fits the store and otherwise sketches only the blocks wider than one common
width k, the largest k whose rows fit (water-filling), so memory stays at the store size whatever the
model's size. The store size is a fraction of the memory actually available (free CUDA memory on a
GPU, MemAvailable on a CPU) unless given.

A sketched block also keeps its mean validation gradient gbar exact when that fits (one exact row, d_l
numbers, per block; `BlockPlan.exact_mean`): the validation chunks run first, so every training
gradient's product with gbar (K_gt, the vector every influence scorer solves against the training
Gram) is taken exactly before the row is sketched, and the statistics keep the gbar direction exactly
and sketch only the rest (`statistics.statistics_with_exact_mean`). Why this is worth a narrower
sketch: the scorers' damped inverse of a badly conditioned training Gram amplifies the sketch's noise in
K_gt, which reorders blocks whose scores are close (BENCHMARKS.md, "Memory plan at any model size", has
the per-seed measurements). "auto" therefore reserves the means first and water-fills k in the rest, as
long as k stays >= MIN_PROJECTION_DIM.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

import torch

from .errors import ScoringError
from .statistics import BlockStatistics

#: Fraction of the available memory the rows may use when no store size is given.
DEFAULT_STORE_FRACTION = 0.1
#: Share of training's peak memory a scoring pass inside training may add for its rows.
TRAINING_MEMORY_ALLOWANCE = 0.1
#: Narrowest automatic sketch: its entries' relative error bound is sqrt(2 / k) ~ 4.4%; below it the
#: plan takes more passes instead of a noisier sketch.
MIN_PROJECTION_DIM = 1024
#: Automatic sketch widths are rounded down to a multiple of this (no effect on accuracy, tidy numbers).
PROJECTION_GRANULE = 256


@dataclass(frozen=True)
class BlockPlan:
    """One block's rows: d_l coordinates, stored as `projection_dim` (None: exact) of `element_bytes`;
    `exact_mean`: a sketched block also holds its exact mean validation gradient (d_l numbers)."""

    block: int
    dim: int
    projection_dim: int | None
    element_bytes: int
    exact_mean: bool = False

    @property
    def width(self) -> int:
        """Numbers stored per sample."""
        return self.dim if self.projection_dim is None else self.projection_dim

    def row_bytes(self) -> int:
        """Bytes of one sample's stored row."""
        return self.width * self.element_bytes

    def mean_bytes(self) -> int:
        """Bytes of the exact mean validation gradient (0 when not kept)."""
        return self.dim * self.element_bytes if self.exact_mean else 0

    def bytes(self, samples: int) -> int:
        """Bytes this block holds during its pass: `samples` rows and the exact mean, if kept."""
        return samples * self.row_bytes() + self.mean_bytes()


@dataclass(frozen=True)
class CapturePlan:
    """What one capture will hold: rows of `samples` samples for every block, in `passes` groups."""

    samples: int
    store_bytes: int
    store_source: str
    blocks: tuple[BlockPlan, ...]
    passes: tuple[tuple[int, ...], ...]

    def block(self, index: int) -> BlockPlan:
        """The plan of block `index`."""
        for plan in self.blocks:
            if plan.block == index:
                return plan
        raise KeyError(index)

    @property
    def exact_bytes(self) -> int:
        """Bytes the exact rows of every block would need together."""
        return sum(self.samples * b.dim * b.element_bytes for b in self.blocks)

    @property
    def stored_bytes(self) -> int:
        """Bytes of rows (and exact means) the plan keeps over all passes (the peak is the largest pass)."""
        return sum(b.bytes(self.samples) for b in self.blocks)

    @property
    def peak_pass_bytes(self) -> int:
        """Bytes of rows (and exact means) held at once: the largest pass."""
        rows = {b.block: b.bytes(self.samples) for b in self.blocks}
        return max(sum(rows[b] for b in group) for group in self.passes)

    def describe(self) -> str:
        """Human-readable plan: one summary line and one line per distinct block kind."""
        kinds = sorted(
            {(b.projection_dim, b.exact_mean) for b in self.blocks},
            key=lambda kind: (kind[0] is not None, kind[0] or 0, kind[1]),
        )
        sketched = [b for b in self.blocks if b.projection_dim is not None]
        held = "rows and exact means" if any(b.exact_mean for b in self.blocks) else "rows"
        lines = [
            f"scoring plan: {len(self.passes)} pass(es) over {self.samples} samples, {len(self.blocks)} "
            f"blocks; {held} {_size(self.peak_pass_bytes)} held at once (exact rows would need "
            f"{_size(self.exact_bytes)}); store {_size(self.store_bytes)} ({self.store_source})"
        ]
        for width, exact_mean in kinds:
            members = [b for b in self.blocks if (b.projection_dim, b.exact_mean) == (width, exact_mean)]
            dims = sorted({b.dim for b in members})
            what = (
                "exact"
                if width is None
                else f"CountSketch to k={width:,} (relative error <= {sketch_relative_std(width):.1%} per product)"
            )
            if exact_mean:
                what += "; mean validation gradient exact"
            lines.append(
                f"  blocks {_ranges([b.block for b in members])}: d_l {', '.join(f'{d:,}' for d in dims)} -> {what}"
            )
        if sketched and len(self.passes) == 1:
            lines.append("  (exact rows do not fit the store: sketched in the same single pass)")
        return "\n".join(lines)


def sketch_relative_std(k: int) -> float:
    """CountSketch bound on the standard deviation of <Sx, Sy>, relative to ||x|| ||y||: sqrt(2 / k)."""
    return math.sqrt(2.0 / k)


def plan_capture(
    block_dims: Mapping[int, int],
    samples: int,
    store_bytes: int,
    projection_dim: int | str | None = "auto",
    *,
    element_bytes: int | Mapping[int, int] = 4,
    store_source: str = "max_store_bytes",
) -> CapturePlan:
    """The capture plan for blocks of d_l = `block_dims[b]` coordinates and `samples` (n + m) samples.

    projection_dim: "auto" (exact when every block's rows fit `store_bytes` together, else one pass with
    the blocks wider than the largest fitting common width k sketched to k), None (exact rows, blocks
    split into passes of at most `store_bytes`) or an int k (every block sketched to k). Sketched blocks
    keep their exact mean validation gradient whenever that takes no extra pass ("auto": whenever k
    stays >= MIN_PROJECTION_DIM with the means reserved). Raises ScoringError when even one block's
    rows cannot fit.
    """
    if not block_dims:
        raise ValueError("plan_capture needs at least one block")
    if samples < 1 or store_bytes < 1:
        raise ValueError(f"samples and store_bytes must be >= 1, got {samples} and {store_bytes}")
    sizes = {b: element_bytes if isinstance(element_bytes, int) else element_bytes[b] for b in block_dims}
    widths = _widths(block_dims, sizes, samples, store_bytes, projection_dim)
    blocks = tuple(BlockPlan(b, int(block_dims[b]), widths[b], sizes[b]) for b in block_dims)
    passes = _passes(blocks, samples, store_bytes)
    with_means = tuple(replace(b, exact_mean=b.projection_dim is not None) for b in blocks)
    if with_means != blocks:
        try:
            mean_passes = _passes(with_means, samples, store_bytes)
        except ScoringError:  # a block's rows and mean together exceed the store: sketch its mean too
            mean_passes = ()
        if mean_passes and len(mean_passes) <= len(passes):
            blocks, passes = with_means, mean_passes
    return CapturePlan(samples, int(store_bytes), store_source, blocks, passes)


def _widths(
    dims: Mapping[int, int],
    sizes: Mapping[int, int],
    samples: int,
    store: int,
    projection_dim: int | str | None,
) -> dict[int, int | None]:
    if projection_dim is None:
        return dict.fromkeys(dims)
    if projection_dim != "auto":
        return {b: int(projection_dim) for b in dims}  # type: ignore[arg-type]

    def need(k: int) -> int:
        return sum(samples * min(d, k) * sizes[b] for b, d in dims.items())

    widest = max(dims.values())
    if need(widest) <= store:
        return dict.fromkeys(dims)
    # First with every block's exact mean reserved (an upper bound: blocks that end up exact need none),
    # which keeps the search monotone; plan_capture keeps the means when they fit.
    means = sum(d * sizes[b] for b, d in dims.items())
    k = _largest_width(need, store - means, widest)
    if k < MIN_PROJECTION_DIM:
        k = max(MIN_PROJECTION_DIM, _largest_width(need, store, widest))
    return {b: (k if d > k else None) for b, d in dims.items()}


def _largest_width(need: Callable[[int], int], store: int, widest: int) -> int:
    """The largest granule-aligned k < widest with need(k) <= store (0 when none)."""
    low, high = 0, widest  # need(low) <= store < need(high), or low = 0
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if need(mid) <= store else (low, mid)
    return low - low % PROJECTION_GRANULE


def _passes(blocks: tuple[BlockPlan, ...], samples: int, store: int) -> tuple[tuple[int, ...], ...]:
    """Consecutive blocks whose rows fit `store` together."""
    groups: list[tuple[int, ...]] = []
    current: list[int] = []
    used = 0
    for plan in blocks:
        need = plan.bytes(samples)
        if need > store:
            raise ScoringError(
                f"block {plan.block}: its per-sample gradient rows need {need / 2**20:.0f} MiB, more than "
                f"the store ({store} bytes); pass projection_dim=k (e.g. 4096) or 'auto', or raise max_store_bytes"
            )
        if current and used + need > store:
            groups.append(tuple(current))
            current, used = [], 0
        current.append(plan.block)
        used += need
    groups.append(tuple(current))
    return tuple(groups)


def available_memory_bytes(device: torch.device) -> int:
    """Memory that can be allocated now: free CUDA memory on a GPU, else the OS's MemAvailable."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil ships with the dependencies; sysconf as a fallback
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def default_store_bytes(device: torch.device, fraction: float = DEFAULT_STORE_FRACTION) -> tuple[int, str]:
    """`fraction` of the available memory on `device`, and a description of where it came from."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"store_fraction must be in (0, 1], got {fraction}")
    available = available_memory_bytes(device)
    where = "free CUDA memory" if device.type == "cuda" else "available RAM"
    return max(1, int(available * fraction)), f"{fraction:.0%} of {_size(available)} {where}"


def peak_memory_bytes(device: torch.device) -> int:
    """The most memory this process has held so far: CUDA's peak allocation on a GPU, else the peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux


def training_store_bytes(device: torch.device, allowance: float = TRAINING_MEMORY_ALLOWANCE) -> int:
    """Store for a scoring pass inside training: `allowance` of the process's peak memory so far (what
    training already needed), so scoring raises the peak by about that fraction at most; never more
    than the default share of the available memory."""
    if not 0.0 < allowance <= 1.0:
        raise ValueError(f"allowance must be in (0, 1], got {allowance}")
    return max(1, min(int(allowance * peak_memory_bytes(device)), default_store_bytes(device)[0]))


def adapter_block_dim(module_shapes: Iterable[tuple[int, int]], experts: int, rank: int) -> int:
    """d_l at adapter scope of a block whose wrapped modules have (d_in, d_out) shapes: A, B, router."""
    router = lambda d_in: experts * d_in + experts if experts > 1 else 0  # noqa: E731
    return sum(experts * rank * (d_in + d_out) + router(d_in) for d_in, d_out in module_shapes)


def base_block_dim(module_shapes: Iterable[tuple[int, int]]) -> int:
    """d_l at base scope: the frozen weights of the wrapped modules."""
    return sum(d_in * d_out for d_in, d_out in module_shapes)


def projection_error_bound(stats: BlockStatistics) -> float | None:
    """Bound on the sketch's error in the products a block's scores use, relative to their size.

    Every CountSketch product <Sx, Sy> has standard deviation <= sqrt(2 / k) ||x|| ||y||; for one family
    of products the bound is the root mean square of that over its pairs divided by the root mean square
    of the products themselves (from the computed, sketched norms). The families: the training Gram K_tt
    and, unless the mean validation gradient was kept exact (`stats.exact_mean`: then K_gt is exact),
    the validation-training products K_vt; the bound is the larger. None for exact statistics. A value
    well below 1 means the products are resolved; near or above 1 the sketch noise is as large as the
    signal.
    """
    if stats.projected_dim is None:
        return None
    bound = _relative_bound(stats.train_sq_norms, stats.train_sq_norms, stats.K_tt, stats.projected_dim)
    if not stats.exact_mean:
        val = _relative_bound(stats.val_sq_norms, stats.train_sq_norms, stats.K_vt, stats.projected_dim)
        bound = max(bound, val)
    return bound


def _relative_bound(left_sq: torch.Tensor, right_sq: torch.Tensor, products: torch.Tensor, k: int) -> float:
    spread = math.sqrt(float(left_sq.mean()) * float(right_sq.mean()))
    size = float(products.pow(2).mean().sqrt())
    if size == 0.0:
        return math.inf if spread > 0 else 0.0
    return sketch_relative_std(k) * spread / size


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def _ranges(values: list[int]) -> str:
    values = sorted(values)
    out: list[str] = []
    start = prev = values[0]
    for v in values[1:] + [None]:  # type: ignore[list-item]
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(out)
