"""Benchmark: how long one allocation takes for a Mistral-7B-sized model (32 blocks, 7 modules each), and
the MDL bisection against scipy's SLSQP on the same program, side by side in one run.

Run: ``python benchmarks/allocation_speed.py``. Prints a markdown table. scipy is only needed here.
"""

from __future__ import annotations

import time

import numpy as np

from layermoe.allocation import allocate, mdl_units

LAYERIF = [1, 9, 10, 8, 9, 12, 10, 7, 9, 9, 9, 8, 6, 9, 6, 4, 7, 3, 2, 1, 3, 4, 2, 1, 4, 1, 1, 1, 1, 1, 1, 1]
D, KV, FF = 4096, 1024, 14336
MISTRAL_BLOCK = [(D, D), (D, KV), (D, KV), (D, D), (D, FF), (D, FF), (FF, D)]


def _time(fn, repeat: int = 20) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - t0) / repeat)
    return best


def main() -> None:
    scores = {b: float(v - 1) for b, v in enumerate(LAYERIF)}
    dims = {b: MISTRAL_BLOCK for b in range(32)}
    cur = {b: {"experts": 5, "rank": 8} for b in range(32)}
    rows = []
    for method in ("power_law", "mdl"):
        cases = {
            "total_experts:160": dict(budget="total_experts:160"),
            "current params, fixed rank": dict(budget="current"),
            "current params, ranks from scores (step 2)": dict(
                budget="current", rank_policy="scores", rank_step=2
            ),
            "total_experts:160, max_moves=8, hysteresis=2": dict(
                budget="total_experts:160", max_moves=8, hysteresis=2
            ),
        }
        for name, kw in cases.items():
            sec = _time(
                lambda kw=kw, method=method: allocate(
                    scores, method, current_layout=cur, block_dims=dims, **kw
                )
            )
            rows.append((method, name, sec * 1e3))
    print("| method | budget / options | ms per allocate |")
    print("|---|---|---|")
    for m, n, ms in rows:
        print(f"| {m} | {n} | {ms:.2f} |")

    from scipy.optimize import minimize

    q = np.array(LAYERIF, dtype=float)
    q = q / q.mean()
    c = np.ones(32)
    budget = 160.0
    g = 0.9 * q**2

    def scipy_solve() -> np.ndarray:
        res = minimize(
            lambda u: -(g @ np.log(u) - 0.5 * u.sum()),
            np.full(32, budget / 32),
            jac=lambda u: -(g / u - 0.5),
            bounds=[(1.0, None)] * 32,
            constraints=[{"type": "eq", "fun": lambda u: c @ u - budget, "jac": lambda u: c}],
            method="SLSQP",
            options={"ftol": 1e-14, "maxiter": 500},
        )
        return res.x

    ours = _time(lambda: mdl_units(q, c, budget))
    ref = _time(scipy_solve, repeat=5)
    gap = float(np.max(np.abs(mdl_units(q, c, budget)[0] - scipy_solve())))
    print()
    print("| MDL program, 32 blocks | ms | ratio |")
    print("|---|---|---|")
    print(f"| bisection (mdl_units) | {ours * 1e3:.3f} | 1.00 |")
    print(f"| scipy SLSQP | {ref * 1e3:.3f} | {ref / ours:.1f}x slower |")
    print(f"\nmax |u_bisection - u_scipy| = {gap:.2e}")


if __name__ == "__main__":
    main()
