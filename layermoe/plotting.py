"""One figure per rewire: per-block experts and ranks before/after, next to the scores that decided them.

Built on ``matplotlib.figure.Figure`` with the Agg canvas (no pyplot, no display, thread-safe enough for
a callback); matplotlib is imported lazily (only when a figure is drawn).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from layermoe.layout import Layout


def _require_matplotlib() -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plotting needs matplotlib: pip install matplotlib (or pass plot=False to the callback)"
        ) from exc
    return Figure, FigureCanvasAgg


def rewire_figure(
    before: Layout,
    after: Layout,
    scores: dict[int, float],
    title: str | None = None,
    *,
    errors: dict[int, float] | None = None,
    shrunk: dict[int, float] | None = None,
) -> Any:
    """A ``Figure`` with three bar panels sharing the block axis: experts, rank, score. The score panel
    carries +- one standard error per block (``errors``) and marks the shrunk scores the allocator used
    (``shrunk``). Legends sit outside the axes, so they never cover a block."""
    figure_cls, canvas_cls = _require_matplotlib()
    blocks = sorted(set(before) | set(after) | set(scores))
    x = list(range(len(blocks)))
    width = 0.4
    fig = figure_cls(figsize=(max(6.0, 0.35 * len(blocks) + 4.5), 7.0), layout="constrained")
    canvas_cls(fig)
    axes = fig.subplots(3, 1, sharex=True)
    outside = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "borderaxespad": 0.0, "fontsize": "small"}
    for ax, key in zip(axes[:2], ("experts", "rank"), strict=True):
        ax.bar(
            [i - width / 2 for i in x], [before.get(b, {}).get(key, 0) for b in blocks], width, label="before"
        )
        ax.bar(
            [i + width / 2 for i in x], [after.get(b, {}).get(key, 0) for b in blocks], width, label="after"
        )
        ax.set_ylabel(key)
        ax.legend(**outside)
    score_ax = axes[2]
    score_ax.bar(x, [scores.get(b, 0.0) for b in blocks], 0.6, color="tab:green", label="score")
    if errors:
        with_error = [i for i, b in zip(x, blocks, strict=True) if b in errors]
        score_ax.errorbar(
            with_error,
            [scores.get(blocks[i], 0.0) for i in with_error],
            yerr=[errors[blocks[i]] for i in with_error],
            fmt="none",
            ecolor="black",
            capsize=2,
            label="+- 1 SE",
        )
    if shrunk:
        marked = [i for i, b in zip(x, blocks, strict=True) if b in shrunk]
        score_ax.scatter(
            marked,
            [shrunk[blocks[i]] for i in marked],
            marker="_",
            s=200,
            color="tab:red",
            label="shrunk",
            zorder=3,
        )
    score_ax.set_ylabel("score")
    score_ax.set_xlabel("block")
    score_ax.set_xticks(x, [str(b) for b in blocks])
    if errors or shrunk:
        score_ax.legend(**outside)
    if title:
        fig.suptitle(title)
    return fig


def save_rewire_figure(
    path: str | Path,
    before: Layout,
    after: Layout,
    scores: dict[int, float],
    title: str | None = None,
    **marks: dict[int, float] | None,
) -> Any:
    """Write :func:`rewire_figure` (``marks``: its ``errors`` and ``shrunk``) as PNG, creating the folder,
    and return it, e.g. for TensorBoard's ``add_figure``."""
    fig = rewire_figure(before, after, scores, title, **marks)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return fig
