"""The integer search space of one allocation call: per-block expert counts and rank ladders, a budget
(exactly T experts, or at most P parameters), and the unit moves that rounding, filling and stability use.

A *unit* is one expert, or one rank step (the next allowed rank on the block's ladder). Under
``total_experts`` only experts move; ranks are fixed (one-rung ladders).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .costs import block_cost
from .rounding import priority_order, tie_positions

EXPERT, RANK = "experts", "rank"


@dataclass
class Space:
    blocks: list[int]
    scores: np.ndarray
    e_lo: np.ndarray  # float, integral values
    e_hi: np.ndarray  # float, inf when unbounded
    ladders: list[list[int]]  # allowed ranks per block, ascending; one rung = fixed rank
    kind: str  # "total_experts" or "params"
    budget: int
    s: np.ndarray | None = None  # sum(d_in + d_out) per block (params mode)
    r: np.ndarray | None = None  # sum(d_in + 1) per block (params mode)
    rank_first: bool = False  # greedy fill tries a rank step before an expert (rank_policy="scores")
    # Ties of `scores` go to the higher raw (unshrunk) score, then to the lower tie position (rounding.py's
    # rule, never the block index); defaults: `scores`, and tie_positions(raw_scores, budget).
    raw_scores: np.ndarray | None = None
    tie_position: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.raw_scores is None:
            self.raw_scores = self.scores
        if self.tie_position is None:
            self.tie_position = tie_positions(self.raw_scores, self.budget)

    @property
    def n(self) -> int:
        return len(self.blocks)

    def block_cost(self, i: int, e: int, k: int) -> int:
        if self.kind == "total_experts":
            return int(e)
        assert self.s is not None and self.r is not None
        return block_cost(e, self.ladders[i][k], int(self.s[i]), int(self.r[i]))

    def cost(self, e: np.ndarray, k: np.ndarray) -> int:
        return sum(self.block_cost(i, int(e[i]), int(k[i])) for i in range(self.n))

    def min_cost(self) -> int:
        return sum(self.block_cost(i, int(self.e_lo[i]), 0) for i in range(self.n))

    def layout(self, e: np.ndarray, k: np.ndarray) -> dict[int, dict[str, int]]:
        return {
            b: {"experts": int(e[i]), "rank": int(self.ladders[i][k[i]])} for i, b in enumerate(self.blocks)
        }

    # ---- unit moves -------------------------------------------------------------------------------
    def can_step(self, i: int, kind: str, sign: int, e: np.ndarray, k: np.ndarray) -> bool:
        if kind == EXPERT:
            return e[i] + sign <= self.e_hi[i] if sign > 0 else e[i] + sign >= self.e_lo[i]
        # a block without experts has no rank to move (rank steps there would be free)
        return e[i] > 0 and 0 <= k[i] + sign < len(self.ladders[i])

    def step_delta(self, i: int, kind: str, sign: int, e: np.ndarray, k: np.ndarray) -> int:
        ne, nk = (e[i] + sign, k[i]) if kind == EXPERT else (e[i], k[i] + sign)
        return self.block_cost(i, int(ne), int(nk)) - self.block_cost(i, int(e[i]), int(k[i]))

    def apply(self, i: int, kind: str, sign: int, e: np.ndarray, k: np.ndarray) -> None:
        if kind == EXPERT:
            e[i] += sign
        else:
            k[i] += sign

    def kinds(self) -> tuple[str, ...]:
        return (RANK, EXPERT) if self.rank_first else (EXPERT, RANK)

    def priority(self, keys_desc: list[np.ndarray]) -> np.ndarray:
        """Block positions by `keys_desc` (each descending), then by the score and the tie rule."""
        return priority_order([*keys_desc, self.scores, self.raw_scores], self.tie_position)

    def by_score(self, descending: bool = True) -> np.ndarray:
        order = self.priority([])
        return order if descending else order[::-1]

    def greedy_fill(
        self, e: np.ndarray, k: np.ndarray, allowed: np.ndarray | None = None, max_moves: float = np.inf
    ) -> int:
        """Params: add units while one fits under the budget, in passes over the blocks by score (highest
        first, ties by the raw score, then the tie positions), at most one unit per block per pass. Ends when no allowed block
        can take one more unit. Returns the number of units added."""
        slack = self.budget - self.cost(e, k)
        moves = 0
        order = [i for i in self.by_score() if allowed is None or allowed[i]]
        progressed = True
        while progressed:
            progressed = False
            for i in order:
                if moves >= max_moves:
                    return moves
                for kind in self.kinds():
                    if self.can_step(i, kind, +1, e, k):
                        delta = self.step_delta(i, kind, +1, e, k)
                        if delta <= slack:
                            self.apply(i, kind, +1, e, k)
                            slack -= delta
                            moves += 1
                            progressed = True
                            break
        return moves

    def repair_down(self, e: np.ndarray, k: np.ndarray, allowed: np.ndarray | None = None) -> None:
        """Params: take units from the lowest-scored blocks until the layout fits the budget."""
        order = [i for i in self.by_score(descending=False) if allowed is None or allowed[i]]
        while self.cost(e, k) > self.budget:
            for i in order:
                stepped = False
                for kind in self.kinds():
                    if self.can_step(i, kind, -1, e, k):
                        self.apply(i, kind, -1, e, k)
                        stepped = True
                        break
                if stepped:
                    break
            else:
                if allowed is None:
                    raise AssertionError("repair_down: minimum layout exceeds the budget (checked before)")
                allowed = None
                order = list(self.by_score(descending=False))
