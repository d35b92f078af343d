"""Stability for repeated rewiring: hysteresis and a cap on units moved, relative to the current layout.

Every rewire resizes adapters (and resets part of the optimizer state), so small score noise should not
shuffle capacity back and forth. Given the target from the programs and the current layout:

- ``hysteresis=h``: a block whose change (in units: experts plus rank steps) is below ``h`` keeps its
  current size.
- ``max_moves=m``: at most ``m`` units are added per rewire. Units are moved as transfers: the highest-scored
  block still below its target takes a unit, paid for by removing units from the lowest-scored blocks
  still above theirs.

The budget still wins: under ``total_experts`` the result has exactly T experts (if the budget changed, the
difference is applied even beyond the cap, to the blocks furthest from target, then by score); under
``params`` it never exceeds P, and is then filled greedily by score among the blocks hysteresis did not
freeze, within what is left of the cap. Maximality therefore holds only among the moves the cap and
hysteresis allow.
"""

from __future__ import annotations

import numpy as np

from .space import EXPERT, Space


def project(space: Space, layout: dict[int, dict[str, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Current layout in the space: experts clipped to bounds, rank to the highest rung not above it."""
    e = np.array([layout[b]["experts"] for b in space.blocks], dtype=np.int64)
    e = np.clip(e, space.e_lo, space.e_hi).astype(np.int64)
    k = np.array(
        [
            max(0, int(np.searchsorted(lad, layout[b]["rank"], side="right")) - 1)
            for b, lad in zip(space.blocks, space.ladders, strict=True)
        ],
        dtype=np.int64,
    )
    return e, k


def _steps(
    space: Space, order: np.ndarray, e0: np.ndarray, k0: np.ndarray, e1: np.ndarray, k1: np.ndarray, sign: int
) -> list[tuple[int, str]]:
    """Unit steps (block position, kind) that move e0/k0 toward e1/k1 in direction ``sign``."""
    out: list[tuple[int, str]] = []
    for i in order:
        for kind in space.kinds() if sign > 0 else space.kinds()[::-1]:
            diff = (e1[i] - e0[i]) if kind == EXPERT else (k1[i] - k0[i])
            out.extend([(int(i), kind)] * max(0, int(diff * sign)))
    return out


def stabilize(
    space: Space,
    target: tuple[np.ndarray, np.ndarray],
    current: tuple[np.ndarray, np.ndarray],
    hysteresis: float = 0.0,
    max_moves: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Move from ``current`` toward ``target`` under hysteresis and the move cap (module docstring)."""
    te, tk = target
    ce, ck = current
    dist = np.abs(te - ce) + np.abs(tk - ck)
    frozen = (dist < hysteresis) if hysteresis > 0 else np.zeros(space.n, dtype=bool)
    ge, gk = np.where(frozen, ce, te), np.where(frozen, ck, tk)
    cap = np.inf if max_moves is None else max_moves
    incs = _steps(space, space.by_score(), ce, ck, ge, gk, +1)
    decs = _steps(space, space.by_score(descending=False), ce, ck, ge, gk, -1)
    e, k = ce.copy(), ck.copy()
    moves = 0
    ii = di = 0
    while ii < len(incs) and moves < cap:
        i, kind = incs[ii]
        if space.cost(e, k) + space.step_delta(i, kind, +1, e, k) <= space.budget:
            space.apply(i, kind, +1, e, k)
            moves += 1
            ii += 1
        elif di < len(decs):
            j, dkind = decs[di]
            space.apply(j, dkind, -1, e, k)
            di += 1
        else:
            break
    if space.kind == "total_experts":
        _exact_total(space, e, k, incs[ii:], decs[di:], frozen)
    else:
        while space.cost(e, k) > space.budget and di < len(decs):
            j, dkind = decs[di]
            space.apply(j, dkind, -1, e, k)
            di += 1
        space.repair_down(e, k, allowed=~frozen)
        space.greedy_fill(e, k, allowed=~frozen, max_moves=cap - moves)
    return e, k


def _exact_total(
    space: Space, e: np.ndarray, k: np.ndarray, incs: list, decs: list, frozen: np.ndarray
) -> None:
    """Bring the expert total to exactly T: pending target steps first, then by score (unfrozen first)."""
    total = int(space.budget)
    for i, kind in decs:
        if e.sum() <= total:
            break
        if kind == EXPERT and space.can_step(i, EXPERT, -1, e, k):
            e[i] -= 1
    for i, kind in incs:
        if e.sum() >= total:
            break
        if kind == EXPERT and space.can_step(i, EXPERT, +1, e, k):
            e[i] += 1
    for pool in (~frozen, np.ones(space.n, dtype=bool)):
        for i in space.by_score(descending=False):
            while e.sum() > total and pool[i] and e[i] > space.e_lo[i]:
                e[i] -= 1
        for i in space.by_score():
            while e.sum() < total and pool[i] and e[i] < space.e_hi[i]:
                e[i] += 1
    assert e.sum() == total  # bounds were checked against T before
