"""Growth allocation: capacity is only ever added, never removed, on a schedule of rounds.

A growth run starts from an even share of the parameter budget (:func:`plan_growth`: the same experts and
rank in every block, ``initial_fraction`` of the budget; below rank 1 in every block, rank 1 in evenly
spaced blocks and none in the others) and, at each of ``rounds`` rounds, adds the
round's increment (:meth:`GrowthPlan.allowance`) to the blocks the scores favour (:func:`grow_layout`),
until the last round has spent the budget. Every block keeps at least its current experts and rank.

**Which unit a block grows by** (parameter terms, ``S = sum(d_in + d_out)``, ``R = sum(d_in + 1)`` over
the block's modules; costs from :func:`layermoe.layout.block_cost`). A block with E experts of rank r can
take one *rank unit* (every expert's rank r -> r + 1: ``E * S`` parameters) or one *new expert* (``r * S``
for its A and B, plus the router it brings: ``2R`` from one expert to two, where the router appears, ``R``
for each expert after that). The block takes a new expert when the expert's own parameters pay at least
``router_ratio`` (default 1) times the router parameters it brings, ``r * S >= router_ratio * router``;
otherwise (a router worth more than its expert: low ranks) a rank unit. When the preferred unit is at its
bound (``experts_bounds``/``rank_bounds`` highs) the block takes the other one. In the round that reaches
the total budget, a block whose preferred unit no longer fits takes the other one if that fits (experts
only where the budget affords their routers); in earlier rounds what the preferred units leave carries to
the next round instead. A block with 0 experts grows by a fresh expert.

**Where the increment goes.** Scores are shrunk toward their mean by ``error_shrinkage`` standard errors
(as in :func:`layermoe.allocation.allocate`). The program spreads the round's target total (current
parameters + increment) over the blocks in units of one expert at the block's current rank, every block
held at least at its current size: ``power_law`` gives block l ``max(current_l, x w_l)`` (w the power-law
weights, x the level that spends the total), ``mdl`` its program with lower bounds at the current sizes.
Blocks already above their share keep what they have; the others catch up toward the static
allocation of the new total (equal scores even the blocks out). Each block's share above its current
size is its desired increment. Blocks first take whole units inside their share, then
one rounded-up unit in order of the largest uncovered fraction, then further units greedily by
priority while any fits the increment. Priority: uncovered fraction (round-up pass only), shrunk score,
raw score, then the block with fewer parameters (an even spread), then the rounding's tie order
(``rounding.tie_positions`` of the raw scores and the round's total, rotated by the round's seed): never the
block index. The result never exceeds the increment nor the total budget, and when it ends no block can
take one more unit within the increment (its preferred unit; either unit in the round that reaches the
budget), so the last round spends the budget up to less than one unit of any block.

Controls for the same increments: :func:`uniform_grow` (equal scores: the increment spread evenly, empty
blocks adapted in an evenly spread order over the depth) and
:func:`placebo_grow` (the scores and errors permuted across blocks with a seeded, per-round permutation:
the scored arm's increments placed at random).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from layermoe.layout import block_cost, block_key, is_int_at_least

from .aliases import BlockDims, Bounds, Layout, Scores
from .errors import AllocationError
from .programs import continuous_share, method_options, power_law_weights
from .rounding import priority_order, tie_key, tie_positions
from .shrink import shrink_toward_mean
from .validation import bounds_arrays, normalize_block_dims, normalize_layout, score_array

EXPERT, RANK = "experts", "rank"
GROWTH_CONTROLS = ("none", "uniform", "placebo")


@dataclass(frozen=True)
class GrowthPlan:
    """The schedule of a growth run: the starting layout and the cumulative parameter target after each
    round (the last is the budget). Plain data, so it can sit in a callback's checkpointed state."""

    initial: Layout
    initial_params: int
    targets: tuple[int, ...]
    budget: int

    @property
    def rounds(self) -> int:
        return len(self.targets)

    @property
    def increments(self) -> tuple[int, ...]:
        """Parameters each round adds to the schedule's target (they sum to budget - initial cost)."""
        previous = (self.initial_params, *self.targets[:-1])
        return tuple(t - p for t, p in zip(self.targets, previous, strict=True))

    def to_dict(self) -> dict[str, Any]:
        """Plain ints, lists and dicts (what a checkpointed callback state may hold)."""
        return {
            "initial": {b: dict(spec) for b, spec in self.initial.items()},
            "initial_params": self.initial_params,
            "targets": list(self.targets),
            "budget": self.budget,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GrowthPlan:
        """Inverse of :meth:`to_dict` (block keys may come back as strings from JSON)."""
        try:
            plan = cls(
                initial=normalize_layout(data["initial"], None, "growth plan initial"),
                initial_params=int(data["initial_params"]),
                targets=tuple(int(t) for t in data["targets"]),
                budget=int(data["budget"]),
            )
        except (KeyError, TypeError) as err:
            raise AllocationError(
                f"growth plan {dict(data)!r} is not a GrowthPlan.to_dict(): missing or bad field {err}"
            ) from None
        if not plan.targets or plan.targets[-1] != plan.budget:
            raise AllocationError(
                f"growth plan: targets {list(plan.targets)} must end at the budget {plan.budget}"
            )
        return plan

    def allowance(self, round_index: int, current_params: int) -> int:
        """What round ``round_index`` (0-based) may add to a model holding ``current_params``: its
        cumulative target minus what is there, so what a round could not place carries to the next."""
        if not is_int_at_least(round_index, 0) or round_index >= self.rounds:
            raise AllocationError(
                f"growth round {round_index!r} is outside the schedule's {self.rounds} rounds (0-based)"
            )
        return max(0, self.targets[round_index] - int(current_params))


def plan_growth(
    block_dims: BlockDims, budget: int, rounds: int, initial_fraction: float = 0.25, experts: int = 1
) -> GrowthPlan:
    """The starting layout, ``initial_fraction`` of ``budget`` spread evenly, and ``rounds`` equal
    increments that bring the target to ``budget``.

    The start is ``experts`` experts per block at the largest common rank whose cost is within the share;
    where even rank 1 in every block is above it, rank 1 on the largest evenly spaced set of blocks within
    it (:func:`evenly_spaced`; at least one block), the others empty: the rounds then choose which blocks
    to adapt as well as how much."""
    if not is_int_at_least(rounds):
        raise AllocationError(f"grow_rounds = {rounds!r} must be an int >= 1")
    if not is_int_at_least(budget):
        raise AllocationError(f"budget = {budget!r} must be a positive int (parameters)")
    if not is_int_at_least(experts):
        raise AllocationError(f"experts = {experts!r} must be an int >= 1 (experts per block at the start)")
    if not (isinstance(initial_fraction, (int, float)) and 0 < initial_fraction <= 1):
        raise AllocationError(f"initial_fraction = {initial_fraction!r} must be in (0, 1]")
    blocks = sorted(int(b) for b in block_dims)
    s, r = normalize_block_dims(block_dims, blocks)
    one = [block_cost(experts, 1, int(si), int(ri)) for si, ri in zip(s, r, strict=True)]

    def cost(rank: int, covered: Sequence[int]) -> int:
        return sum(block_cost(experts, rank, int(s[i]), int(r[i])) for i in covered)

    share = initial_fraction * budget
    covered = list(range(len(blocks)))
    if sum(one) > share:
        count = len(blocks)
        while count > 1 and cost(1, evenly_spaced(len(blocks), count)) > share:
            count -= 1
        covered = evenly_spaced(len(blocks), count)
        if cost(1, covered) > budget:
            raise AllocationError(
                f"budget params:{budget} is below the smallest layout ({cost(1, covered)} parameters: "
                f"{experts} expert(s) of rank 1 in one block); raise the budget or start with fewer experts"
            )
    rank = 1
    # costs are linear in rank: at most share / cost(1) iterations; a start on some blocks stays at rank 1
    while len(covered) == len(blocks) and cost(rank + 1, covered) <= share:
        rank += 1
    start = cost(rank, covered)
    targets = tuple(start + (budget - start) * (t + 1) // rounds for t in range(rounds))
    initial = {b: {"experts": experts if i in covered else 0, "rank": rank} for i, b in enumerate(blocks)}
    return GrowthPlan(initial=initial, initial_params=start, targets=targets, budget=int(budget))


def evenly_spaced(n: int, count: int) -> list[int]:
    """``count`` of the positions ``0..n-1`` spread evenly: the middle of each of ``count`` equal runs
    (``n = 30``, ``count = 15``: 1, 3, ..., 29; ``count = n``: all of them)."""
    return sorted({min(n - 1, int((i + 0.5) * n / count)) for i in range(count)})


def spread_order(covered: np.ndarray, tie_position: np.ndarray) -> np.ndarray:
    """A priority key (higher first) that adapts empty blocks in an evenly spread order: each next one is
    the empty block farthest from every adapted block (the network's ends count at half a gap, as in
    :func:`evenly_spaced`: a block's distance to an end is twice its distance to the boundary), ties in
    ``tie_position`` order. Adapted blocks all get 0, so they keep their own order."""
    n = len(covered)
    taken = [int(i) for i in np.flatnonzero(covered)]
    key = np.zeros(n)
    empty = [i for i in range(n) if not covered[i]]
    count = len(empty)
    for place in range(count):

        def distance(i: int) -> float:
            to_ends = min(2 * (i + 0.5), 2 * (n - 0.5 - i))
            return min([to_ends, *(abs(i - j) for j in taken)])

        pick = min(empty, key=lambda i: (-distance(i), int(tie_position[i])))
        key[pick] = count - place
        taken.append(pick)
        empty.remove(pick)
    return key


@dataclass
class _Blocks:
    """Growth state of one call: per-block experts/ranks, sizes and bounds (positions, not block ids)."""

    e: np.ndarray
    k: np.ndarray
    s: np.ndarray
    r: np.ndarray
    e_hi: np.ndarray
    k_hi: np.ndarray
    router_ratio: float

    def params(self, i: int) -> int:
        return block_cost(int(self.e[i]), int(self.k[i]), int(self.s[i]), int(self.r[i]))

    def unit_cost(self, i: int, kind: str) -> int:
        e, k = int(self.e[i]), int(self.k[i])
        ne, nk = (e + 1, k) if kind == EXPERT else (e, k + 1)
        return block_cost(ne, nk, int(self.s[i]), int(self.r[i])) - self.params(i)

    def allowed(self, i: int, kind: str) -> bool:
        if kind == EXPERT:
            return self.e[i] + 1 <= self.e_hi[i]
        return self.e[i] > 0 and self.k[i] + 1 <= self.k_hi[i]  # an empty block has no rank to grow

    def next_unit(self, i: int, room: float, fallback: bool = True) -> str | None:
        """The unit block i takes next within `room` parameters (module docstring's rule), or None;
        without `fallback` only the preferred unit (or the other when the preferred is at its bound)."""
        e, k = int(self.e[i]), int(self.k[i])
        router = 0 if e == 0 else (2 if e == 1 else 1) * int(self.r[i])
        preferred = EXPERT if e == 0 or k * int(self.s[i]) >= self.router_ratio * router else RANK
        other = RANK if preferred == EXPERT else EXPERT
        if not self.allowed(i, preferred):
            preferred, other = other, preferred
        for kind in (preferred, other) if fallback else (preferred,):
            if self.allowed(i, kind) and self.unit_cost(i, kind) <= room:
                return kind
        return None

    def take(self, i: int, kind: str) -> int:
        delta = self.unit_cost(i, kind)
        if kind == EXPERT:
            self.e[i] += 1
        else:
            self.k[i] += 1
        return delta


def _growth_values(raw: np.ndarray, method: str, opts: dict[str, Any], shrunk: np.ndarray) -> np.ndarray:
    """What the program reads: the shrunk scores, with power_law's shift taken from the raw minimum (as
    ``allocate`` does: blocks shrunk to the mean must keep an average block's share)."""
    if method == "power_law" and opts["shift"]:
        opts["shift"] = False
        return np.maximum(shrunk - raw.min(), 0.0)
    return shrunk


def _targets(
    method: str, values: np.ndarray, unit: np.ndarray, before: np.ndarray, total: float, opts: dict[str, Any]
) -> np.ndarray:
    """Parameters per block after the round, in the continuous program: the static allocation of
    `total` (in units of one expert at the block's rank, `unit` parameters each), with every block held
    at least at its present size `before` (blocks that are already above their share stay there; the
    others share the rest as the program says)."""
    if method == "mdl":
        return continuous_share(
            method, values, unit, before / unit, np.full(len(unit), math.inf), total, opts
        )
    w = power_law_weights(values, opts["beta"], opts["shift"])
    if not np.any(w > 0):
        w = np.ones_like(w)
    reach = w * unit  # parameters per unit of the water level x
    if total <= before.sum():
        return before.copy()
    # spend(x) = sum max(before_l, x reach_l) is piecewise linear with a knee at before_l / reach_l:
    # walk the knees in order until the spend at the next one reaches the total, then solve the line.
    # (A block with a tiny weight has a knee at inf: it keeps its size.)
    fixed, slope = float(before.sum()), 0.0
    with np.errstate(divide="ignore", over="ignore"):  # a knee past the float range is never reached
        knees = np.where(reach > 0, before / np.where(reach > 0, reach, 1.0), np.inf)
        for j in np.argsort(knees, kind="stable"):
            if not math.isfinite(knees[j]) or fixed + slope * knees[j] >= total:
                break
            fixed -= before[j]
            slope += reach[j]
    return np.maximum(before, (total - fixed) / slope * reach)


def grow_layout(
    current_layout: Mapping,
    scores: Scores,
    block_dims: BlockDims,
    allowance: int,
    budget: int,
    *,
    method: str = "power_law",
    score_errors: Mapping[int, float] | None = None,
    error_shrinkage: float = 0.0,
    experts_bounds: Bounds | None = None,
    rank_bounds: Bounds | None = None,
    router_ratio: float = 1.0,
    seed: int = 0,
    **method_options_: Any,
) -> Layout:
    """The next layout of a growth run: ``current_layout`` plus at most ``allowance`` parameters placed by
    the scores (module docstring), never above ``budget`` parameters in all, never below the current
    experts or rank of any block. Only the highs of ``experts_bounds``/``rank_bounds`` apply (growth never
    lowers a block); ``seed`` orders exact ties (pass the round index mixed into the run's seed)."""
    return _grow(
        current_layout,
        scores,
        block_dims,
        allowance,
        budget,
        method=method,
        score_errors=score_errors,
        error_shrinkage=error_shrinkage,
        experts_bounds=experts_bounds,
        rank_bounds=rank_bounds,
        router_ratio=router_ratio,
        seed=seed,
        even_spread=False,
        method_options_=method_options_,
    )


def _grow(
    current_layout: Mapping,
    scores: Scores,
    block_dims: BlockDims,
    allowance: int,
    budget: int,
    *,
    method: str,
    score_errors: Mapping[int, float] | None,
    error_shrinkage: float,
    experts_bounds: Bounds | None,
    rank_bounds: Bounds | None,
    router_ratio: float,
    seed: int,
    even_spread: bool,
    method_options_: Mapping[str, Any],
) -> Layout:
    """:func:`grow_layout`; ``even_spread`` adds :func:`spread_order` to the priority before the tie
    order (``uniform_grow``: which empty blocks are adapted first)."""
    blocks, raw = score_array(scores)
    current = normalize_layout(current_layout, blocks)
    s, r = normalize_block_dims(block_dims, blocks)
    if not is_int_at_least(allowance, 0):
        raise AllocationError(f"allowance = {allowance!r} must be an int >= 0 (parameters this round)")
    if not is_int_at_least(budget):
        raise AllocationError(f"budget = {budget!r} must be a positive int (parameters)")
    if not (isinstance(router_ratio, (int, float)) and math.isfinite(router_ratio) and router_ratio >= 0):
        raise AllocationError(f"router_ratio = {router_ratio!r} must be a finite number >= 0")
    opts = method_options(method, dict(method_options_))
    _, e_hi = bounds_arrays(experts_bounds, blocks, "experts_bounds")
    _, k_hi = bounds_arrays(rank_bounds, blocks, "rank_bounds")
    state = _Blocks(
        e=np.array([current[b]["experts"] for b in blocks], dtype=np.int64),
        k=np.array([current[b]["rank"] for b in blocks], dtype=np.int64),
        s=s,
        r=r,
        e_hi=e_hi,
        k_hi=k_hi,
        router_ratio=float(router_ratio),
    )
    over = [b for i, b in enumerate(blocks) if state.e[i] > e_hi[i] or state.k[i] > k_hi[i]]
    if over:
        raise AllocationError(
            f"current layout of block(s) {over} is above experts_bounds/rank_bounds highs; growth never "
            "removes capacity: raise the highs"
        )
    before = np.array([state.params(i) for i in range(len(blocks))], dtype=np.int64)
    spent_before = int(before.sum())
    if spent_before > budget:
        raise AllocationError(
            f"current layout has {spent_before} parameters, above the budget {budget}; growth cannot remove"
        )
    room = float(min(int(allowance), budget - spent_before))
    # The other unit only where the round reaches the total budget: earlier, what the preferred units
    # leave carries to the next round (GrowthPlan.allowance), and rank units taken to fill a gap would
    # make every later expert of that block dearer.
    last = int(allowance) >= budget - spent_before
    shrunk = shrink_toward_mean(blocks, raw, score_errors, error_shrinkage)
    values = _growth_values(raw, method, opts, shrunk)

    unit = np.array(
        [max(int(state.k[i]) * int(s[i]) + int(r[i]), 1) for i in range(len(blocks))], dtype=np.float64
    )
    desired = _targets(method, values, unit, before.astype(np.float64), spent_before + room, opts) - before
    if not np.all(np.isfinite(desired)):  # never let a NaN share take units unranked
        raise AllocationError(
            f"growth: the {method} program gave non-finite shares for scores {raw.tolist()}"
        )
    desired = np.maximum(desired, 0.0)

    # the rounding's tie rule (rounding.tie_positions) on this round's total; the seed rotates it over rounds
    tie_position = tie_positions(raw, spent_before + room, seed)
    added = np.zeros(len(blocks))

    spread = [spread_order(state.e > 0, tie_position)] if even_spread else []

    def priority(extra: list[np.ndarray]) -> list[int]:
        sizes = -np.array([state.params(i) for i in range(len(blocks))], dtype=np.float64)
        return list(priority_order([*extra, shrunk, raw, sizes, *spread], tie_position))

    # 1. whole units inside each block's share
    for i in priority([]):
        while room > 0:
            kind = state.next_unit(i, min(room, desired[i] - added[i]), fallback=False)
            if kind is None:
                break
            delta = state.take(i, kind)
            added[i] += delta
            room -= delta
    # 2. one rounded-up unit per block, largest uncovered fraction of its next unit first
    fraction = np.zeros(len(blocks))
    for i in range(len(blocks)):
        kind = state.next_unit(i, math.inf, fallback=False)
        if kind is not None and desired[i] > added[i]:
            fraction[i] = (desired[i] - added[i]) / state.unit_cost(i, kind)
    fraction = tie_key(fraction)
    for i in priority([fraction]):
        if fraction[i] > 0:
            kind = state.next_unit(i, room, fallback=last)
            if kind is not None:
                room -= state.take(i, kind)
    # 3. greedy passes, one unit per block per pass, until nothing fits
    progressed = True
    while progressed:
        progressed = False
        for i in priority([]):
            kind = state.next_unit(i, room, fallback=last)
            if kind is not None:
                room -= state.take(i, kind)
                progressed = True
    return {b: {"experts": int(state.e[i]), "rank": int(state.k[i])} for i, b in enumerate(blocks)}


def uniform_grow(
    current_layout: Mapping,
    block_dims: BlockDims,
    allowance: int,
    budget: int,
    *,
    experts_bounds: Bounds | None = None,
    rank_bounds: Bounds | None = None,
    router_ratio: float = 1.0,
    seed: int = 0,
) -> Layout:
    """Control ``uniform-grow``: the round's increment spread evenly (equal scores, the smaller blocks
    first; empty blocks adapted in an evenly spread order, :func:`spread_order`; remaining ties in a seeded
    order). From a start on evenly spaced blocks its rounds keep the adapted blocks spread over the depth,
    as the static uniform layout of the same total is."""
    blocks = sorted(normalize_layout(current_layout, None))
    return _grow(
        current_layout,
        dict.fromkeys(blocks, 1.0),
        block_dims,
        allowance,
        budget,
        method="power_law",
        score_errors=None,
        error_shrinkage=0.0,
        experts_bounds=experts_bounds,
        rank_bounds=rank_bounds,
        router_ratio=router_ratio,
        seed=seed,
        even_spread=True,
        method_options_={},
    )


def placebo_grow(
    current_layout: Mapping,
    scores: Scores,
    block_dims: BlockDims,
    allowance: int,
    budget: int,
    *,
    seed: int = 0,
    score_errors: Mapping[int, float] | None = None,
    **grow_options: Any,
) -> Layout:
    """Control ``placebo-grow``: :func:`grow_layout` on the scores (and their errors) permuted across
    blocks by a permutation drawn from ``seed`` (pass a different seed each round): the scored arm's
    increments, placed at random."""
    blocks, values = score_array(scores)
    perm = np.random.default_rng(seed).permutation(len(blocks))
    permuted = {b: float(values[j]) for b, j in zip(blocks, perm, strict=True)}
    errors = None
    if score_errors is not None:
        given = {block_key(k, "score_errors", AllocationError): float(v) for k, v in score_errors.items()}
        errors = {b: given[blocks[j]] for b, j in zip(blocks, perm, strict=True)}
    return grow_layout(
        current_layout,
        permuted,
        block_dims,
        allowance,
        budget,
        seed=seed,
        score_errors=errors,
        **grow_options,
    )
