"""The rewire report: the table's columns align at any width, the shrunk score sits beside the raw one,
and the figure carries the score error bars with legends outside the data (issues 34 and 38)."""

from __future__ import annotations

from typing import Any

import pytest

from layermoe.callbacks.report import console_table, rewire_metrics, shrunk_scores


def _entry(**overrides: Any) -> dict[str, Any]:
    blocks = range(12)
    entry = {
        "index": 1,
        "step": 30,
        "epoch": 0,
        "scores": {b: 1.0 + 0.1 * b for b in blocks} | {11: 40.0},
        "score_errors": dict.fromkeys(blocks, 0.5) | {3: 12.25},
        "error_shrinkage": 1.0,
        "layout_before": {b: {"experts": 1, "rank": 8} for b in blocks},
        # one-, two- and three-digit experts and ranks, the 1x8 -> 1x10 among them
        "layout_after": {
            b: {"experts": (1, 1, 100, 12)[b % 4], "rank": (8, 10, 128, 8)[b % 4]} for b in blocks
        },
        "params_before": 100,
        "params_after": 100,
        "budget": 100,
        "time_scoring_s": 1.0,
        "time_rewire_s": 0.5,
        "time_surgery_s": 0.01,
    }
    return entry | overrides


def _table_rows(table: str, n_blocks: int) -> list[str]:
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("block"))
    return lines[start : start + 1 + n_blocks]


def _soft_threshold(entry: dict[str, Any]) -> dict[int, float]:
    """Independent reference: s' = mean + sign(d) max(|d| - k se, 0), d = s - mean."""
    scores, errors, k = entry["scores"], entry["score_errors"], entry["error_shrinkage"]
    mean = sum(scores.values()) / len(scores)
    out = {}
    for b, s in scores.items():
        d = s - mean
        out[b] = mean + (1 if d > 0 else -1) * max(abs(d) - k * errors[b], 0.0)
    return out


@pytest.mark.parametrize("with_errors", [True, False])
def test_table_columns_align_at_two_digit_ranks_and_experts(with_errors: bool) -> None:
    entry = _entry() if with_errors else _entry(score_errors=None)
    rows = _table_rows(console_table(entry), 12)
    assert len(rows) == 13 and "1x8 -> 1x10" in rows[2] and "1x8 -> 100x128" in rows[3]
    assert len({len(row) for row in rows}) == 1, rows  # every line as wide as the header
    assert len({row.index(" -> ") for row in rows[1:]}) == 1  # the arrows line up
    if with_errors:
        assert len({row.index(" +- ") for row in rows[1:]}) == 1  # so do the error bars
    # the number columns end where their headers end (right-aligned to the same edge)
    header = rows[0]
    for name in ("block", "score") + (("shrunk",) if with_errors else ()):
        edge = header.index(name) + len(name)
        assert all(row[edge - 1] != " " and (edge == len(row) or row[edge] == " ") for row in rows[1:]), name


def test_shrunk_scores_sit_beside_the_raw_ones() -> None:
    entry = _entry()
    reference = _soft_threshold(entry)
    shrunk = shrunk_scores(entry)
    assert shrunk is not None and shrunk == pytest.approx(reference)
    # block 3's error covers its distance to the mean: shrunk to exactly the mean; block 11 keeps most
    mean = sum(entry["scores"].values()) / 12
    assert shrunk[3] == pytest.approx(mean) and shrunk[11] == pytest.approx(40.0 - 0.5)
    rows = _table_rows(console_table(entry), 12)
    header = rows[0].split()
    assert header[:3] == ["block", "score", "shrunk"]
    for b, row in zip(range(12), rows[1:], strict=True):
        cells = row.split()
        assert int(cells[0]) == b
        assert float(cells[1]) == pytest.approx(entry["scores"][b], rel=1e-3)
        assert float(cells[2]) == pytest.approx(reference[b], rel=1e-3)
    assert "moved toward the mean by 1 SE" in console_table(entry)
    metrics = rewire_metrics("lm", entry)
    assert metrics["lm/score_shrunk/block_3"] == pytest.approx(mean)
    assert metrics["lm/score/block_3"] == pytest.approx(entry["scores"][3])
    # no shrinkage (or no errors, or an entry from before the field existed): raw scores only
    for off in (_entry(error_shrinkage=0.0), _entry(score_errors=None), _entry() | {"error_shrinkage": None}):
        assert shrunk_scores(off) is None
        assert "shrunk" not in console_table(off)
        assert not any("score_shrunk" in key for key in rewire_metrics("lm", off))


def _figure(entry: dict[str, Any]) -> Any:
    from layermoe.plotting import rewire_figure

    return rewire_figure(
        entry["layout_before"],
        entry["layout_after"],
        entry["scores"],
        "t",
        errors=entry.get("score_errors"),
        shrunk=shrunk_scores(entry),
    )


def test_figure_has_score_error_bars_and_shrunk_marks() -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.container import ErrorbarContainer

    entry = _entry()
    score_ax = _figure(entry).axes[2]
    bars = [c for c in score_ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 1
    # the error segments span score +- SE at every block
    segments = bars[0].lines[2][0].get_segments()
    assert len(segments) == 12
    for b, seg in enumerate(segments):
        (_, low), (_, high) = seg
        assert low == pytest.approx(entry["scores"][b] - entry["score_errors"][b])
        assert high == pytest.approx(entry["scores"][b] + entry["score_errors"][b])
    marks = score_ax.collections[-1].get_offsets()
    reference = _soft_threshold(entry)
    assert [float(y) for _, y in marks] == pytest.approx([reference[b] for b in range(12)])
    plain = _figure(_entry(score_errors=None)).axes[2]
    assert not any(isinstance(c, ErrorbarContainer) for c in plain.containers)


def test_figure_legends_do_not_cover_data() -> None:
    """Issue 38: the legend covered block 29. Legends now sit outside every panel's axes."""
    pytest.importorskip("matplotlib")
    blocks = range(30)
    entry = _entry(
        scores={b: 1.0 for b in blocks} | {29: 5.0},
        score_errors=dict.fromkeys(blocks, 0.2),
        layout_before={b: {"experts": 2, "rank": 8} for b in blocks},
        layout_after={b: {"experts": 2, "rank": 8} for b in blocks} | {29: {"experts": 9, "rank": 8}},
    )
    fig = _figure(entry)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 3
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer))


@pytest.mark.parametrize(
    ("budget", "shown"), [(5_484_360, "budget 5,484,360 params"), (None, "budget None params")]
)
def test_parameter_counts_read_like_the_data_lines(budget: int | None, shown: str) -> None:
    """The quickstart printed "params 5484360 -> 5484360" under data lines that say "26,414 rows"."""
    table = console_table(_entry(params_before=5_484_360, params_after=5_484_104, budget=budget))
    assert f"params 5,484,360 -> 5,484,104 ({shown});" in table
