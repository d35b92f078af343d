"""Score standard errors (issue 22, part 2): the jackknife from the captured statistics equals a
brute-force jackknife that re-captures (forward + backward) every left-out subset; shrinking by the
errors; the callback's table, history and metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from layermoe.adapters import MoELoRAConfig, inject
from layermoe.allocation import AllocationError, allocate
from layermoe.allocation.shrink import shrink_toward_mean
from layermoe.callbacks import CallbackConfigError, LayerInfluenceCallback
from layermoe.callbacks.report import console_table, rewire_metrics
from layermoe.callbacks.rewiring import block_dims
from layermoe.scoring import capture_statistics, causal_lm_per_sample_loss, get_scorer, jackknife_errors
from tests.tiny_models import random_tokens, tiny_llama

N_TRAIN, N_VAL = 6, 4


def _samples(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    ids = random_tokens(batch=count, length=8, seed=seed)
    return [{"input_ids": ids[i : i + 1], "labels": ids[i : i + 1]} for i in range(count)]


def _model() -> torch.nn.Module:
    model = tiny_llama()
    inject(model, MoELoRAConfig(experts=2, rank=2, lora_alpha=8.0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def _capture(model, train, val):
    return capture_statistics(model, train, val, causal_lm_per_sample_loss, chunk_size=4, progress=False)


def _brute_force_errors(model, scorer, train, val, groups: int) -> dict[int, float]:
    """The same two-sided delete-a-group jackknife, each replicate captured again from its samples."""
    variance: dict[int, float] = {}
    for side, samples in (("train", train), ("val", val)):
        g = min(groups, len(samples))
        replicates = []
        for k in range(g):
            kept = [s for i, s in enumerate(samples) if i % g != k]
            stats = _capture(model, kept, val) if side == "train" else _capture(model, train, kept)
            replicates.append(scorer.score(stats))
        for block in replicates[0]:
            values = [r[block] for r in replicates]
            mean = sum(values) / g
            variance[block] = variance.get(block, 0.0) + (g - 1) / g * sum((v - mean) ** 2 for v in values)
    return {b: math.sqrt(v) for b, v in variance.items()}


@pytest.mark.parametrize(
    "name, options, groups",
    [
        ("layerif", {}, 10),
        ("curvature_gain", {}, 10),
        ("grad_norm", {}, 10),
        ("layerif", {"aggregation": "all"}, 3),
    ],
)
def test_jackknife_from_statistics_equals_brute_force_recapture(name, options, groups) -> None:
    model = _model()
    train, val = _samples(N_TRAIN, 1), _samples(N_VAL, 2)
    scorer = get_scorer(name, **options)
    stats = _capture(model, train, val)
    scores, errors = scorer.score_with_errors(stats, groups)
    assert scores == scorer.score(stats)
    reference = _brute_force_errors(model, scorer, train, val, groups)
    assert errors.keys() == reference.keys() == scores.keys()
    for block in errors:
        assert errors[block] > 0
        assert errors[block] == pytest.approx(reference[block], rel=1e-4, abs=1e-12), block


def test_subset_of_all_samples_is_the_statistics_themselves() -> None:
    stats = _capture(_model(), _samples(N_TRAIN, 1), _samples(N_VAL, 2))[0]
    same = stats.subset(torch.arange(N_TRAIN), torch.arange(N_VAL))
    for field in ("K_tt", "K_vt", "train_sq_norms", "val_sq_norms", "K_gt", "K_vv"):
        torch.testing.assert_close(getattr(same, field), getattr(stats, field))
    torch.testing.assert_close(same.val_mean_grad_sq, stats.val_mean_grad_sq)


def test_constant_score_has_zero_error_and_bad_groups_raise() -> None:
    stats = _capture(_model(), _samples(N_TRAIN, 1), _samples(N_VAL, 2))
    assert jackknife_errors(lambda s: dict.fromkeys(s, 1.0), stats) == dict.fromkeys(stats, 0.0)
    with pytest.raises(ValueError, match="groups"):
        jackknife_errors(lambda s: dict.fromkeys(s, 1.0), stats, groups=1)


def test_placebo_moves_errors_with_scores_and_inverse_keeps_them() -> None:
    stats = _capture(_model(), _samples(N_TRAIN, 1), _samples(N_VAL, 2))
    scores, errors = get_scorer("grad_norm").score_with_errors(stats)
    placebo_scores, placebo_errors = get_scorer("placebo", scorer="grad_norm", seed=1).score_with_errors(
        stats
    )
    for block, value in placebo_scores.items():
        (source,) = [b for b, s in scores.items() if s == value]
        assert placebo_errors[block] == errors[source]
    assert get_scorer("inverse", scorer="grad_norm").score_with_errors(stats)[1] == errors


def test_shrinkage_soft_thresholds_toward_the_mean() -> None:
    values = np.array([1.0, 2.0, 6.0])  # mean 3
    out = shrink_toward_mean([0, 1, 2], values, {0: 0.5, 1: 2.0, 2: 1.0}, 1.0)
    np.testing.assert_allclose(out, [3.0 - 1.5, 3.0, 3.0 + 2.0])
    np.testing.assert_array_equal(shrink_toward_mean([0, 1, 2], values, None, 0.0), values)
    with pytest.raises(AllocationError, match="score_errors"):
        shrink_toward_mean([0, 1, 2], values, None, 1.0)


def test_allocation_moves_capacity_only_outside_the_noise() -> None:
    scores = {0: 1.0, 1: 1.2, 2: 5.0, 3: 1.1}
    current = {b: {"experts": 4, "rank": 2} for b in scores}
    dims = {b: [(16, 16)] * 2 for b in scores}
    plain = allocate(scores, "power_law", "current", current, dims)
    exact = allocate(
        scores,
        "power_law",
        "current",
        current,
        dims,
        score_errors=dict.fromkeys(scores, 0.0),
        error_shrinkage=2,
    )
    assert exact == plain
    noisy = allocate(
        scores,
        "power_law",
        "current",
        current,
        dims,
        score_errors=dict.fromkeys(scores, 10.0),
        error_shrinkage=1,
    )
    assert noisy == current  # every difference within its noise: the uniform layout
    # block 2 stands out by more than its error, the three others are within theirs of each other
    partial = allocate(
        scores,
        "power_law",
        "current",
        current,
        dims,
        score_errors={0: 1.0, 1: 1.0, 2: 0.1, 3: 1.0},
        error_shrinkage=1,
    )
    assert partial[2]["experts"] == max(v["experts"] for v in partial.values())
    assert partial[0]["experts"] == partial[1]["experts"] == partial[3]["experts"]


def test_blocks_shrunk_to_the_mean_keep_an_average_share_under_shift() -> None:
    """Shift's zero is the raw minimum, not the shrunk one: when no block stays below the mean, the blocks
    shrunk to it are treated like average blocks, not emptied (the sweep's sst2/tight/shrink-layerif seed 1
    lost 27 of 30 blocks that way). Reference: power_law without shift on the hand-shrunk, hand-shifted
    scores."""
    scores = {0: 0.0, 1: 1.0, 2: 2.0, 3: 9.0}  # mean 3
    errors = {0: 5.0, 1: 5.0, 2: 5.0, 3: 1.0}  # shrunk: 3, 3, 3, 3 + (6 - 1) = 8
    current = {b: {"experts": 4, "rank": 2} for b in scores}
    options = {"experts_bounds": (0, None), "rank": 2}
    shrunk = allocate(
        scores,
        "power_law",
        "total_experts:17",
        current,
        None,
        score_errors=errors,
        error_shrinkage=1,
        **options,
    )
    reference = allocate(
        {0: 3.0, 1: 3.0, 2: 3.0, 3: 8.0},
        "power_law",
        "total_experts:17",
        current,
        None,
        shift=False,
        **options,
    )
    assert [shrunk[b]["experts"] for b in scores] == [reference[b]["experts"] for b in scores] == [3, 3, 3, 8]


def test_callback_table_metrics_and_config_checks() -> None:
    entry = {
        "index": 0,
        "step": 3,
        "epoch": 0,
        "scores": {0: 2.0, 1: 6.0},
        "score_errors": {0: 0.5, 1: 1.0},
        "layout_before": {0: {"experts": 2, "rank": 4}, 1: {"experts": 2, "rank": 4}},
        "layout_after": {0: {"experts": 1, "rank": 4}, 1: {"experts": 3, "rank": 4}},
        "params_before": 10,
        "params_after": 10,
        "budget": 10,
        "time_scoring_s": 0.1,
        "time_rewire_s": 0.1,
        "time_surgery_s": 0.01,
    }
    table = console_table(entry)
    assert "score/mean|score| +- SE" in table
    assert "0.500 +- 0.125" in table and "1.500 +- 0.250" in table  # divided by the mean |score|, 4
    assert "layout unchanged" not in table
    unchanged = console_table({**entry, "layout_after": entry["layout_before"]})
    assert unchanged.splitlines()[-1].startswith("layout unchanged (scores are shrunk")
    assert console_table({**entry, "layout_after": entry["layout_before"], "score_errors": None}).endswith(
        "\nlayout unchanged"
    )
    metrics = rewire_metrics("lm", entry)
    assert metrics["lm/score_error/block_1"] == 1.0
    with pytest.raises(CallbackConfigError, match="error_shrinkage"):
        LayerInfluenceCallback(scorer="uniform", allocator_options={"error_shrinkage": 1.0})
    with pytest.raises(CallbackConfigError, match="error_shrinkage"):
        LayerInfluenceCallback(scorer="grad_norm", allocator_options={"error_shrinkage": 1.0}, error_groups=0)
    LayerInfluenceCallback(scorer="grad_norm", allocator_options={"error_shrinkage": 1.0})
    # bad values fail at construction, not at the first rewire (where on_error="skip" would only warn)
    for bad in (-1, "one", float("nan"), True):
        with pytest.raises(CallbackConfigError, match=r"error_shrinkage = .* must be a number >= 0"):
            LayerInfluenceCallback(allocator_options={"error_shrinkage": bad})
    with pytest.raises(CallbackConfigError, match=r"'error_shrinkag'.*allocate takes \[.*'error_shrinkage'"):
        LayerInfluenceCallback(allocator_options={"error_shrinkag": 1})


def test_error_shrinkage_in_a_fit_from_a_layout_with_an_empty_block() -> None:
    """The fit-start checks (budget on equal scores, dry run through a block without adapter) accept
    error_shrinkage; the rewire's layout is the allocator's on the recorded scores and errors."""
    from lightning.pytorch import seed_everything
    from torch.utils.data import DataLoader

    from layermoe.adapters import layout
    from layermoe.layout import layout_params
    from tests.fixtures import cpu_trainer, quiet_influence
    from tests.scripts.callback_fixtures import CountingDataset, TinyLlamaModule

    seed_everything(0)
    module = TinyLlamaModule(adapt=False)
    inject(module.model, MoELoRAConfig(experts={0: 0, 1: 2, 2: 2}, rank=4, lora_alpha=8.0))
    options = {"experts_bounds": [0, None], "error_shrinkage": 0.5}
    cb = quiet_influence("layerif", allocator_options=options, schedule={"warmup": 2, "interval": "step"})
    trainer = cpu_trainer([cb], max_steps=3, limit_val_batches=1)
    trainer.fit(
        module,
        DataLoader(CountingDataset(32, 0), batch_size=4),
        DataLoader(CountingDataset(16, 1), batch_size=4),
    )
    (entry,) = cb.history
    assert sorted(entry["score_errors"]) == [0, 1, 2] and all(v > 0 for v in entry["score_errors"].values())
    dims = block_dims(module)
    expected = allocate(
        entry["scores"],
        "power_law",
        cb.state.resolved_budget,
        entry["layout_before"],
        dims,
        score_errors=entry["score_errors"],
        **options,
    )
    assert entry["layout_after"] == expected == layout(module)
    assert layout_params(expected, dims) <= entry["budget"]


def test_default_shrinks_by_one_standard_error_where_scores_have_errors() -> None:
    """Issue 27's sweep chose the uncertainty option as a default; scorers without errors go without it."""
    assert LayerInfluenceCallback().allocator_options == {"error_shrinkage": 1.0}
    given = LayerInfluenceCallback(allocator_options={"beta": 0.5})
    assert given.allocator_options == {"beta": 0.5, "error_shrinkage": 1.0}  # given keys kept, default added
    assert LayerInfluenceCallback(allocator_options={"error_shrinkage": 0}).allocator_options == {
        "error_shrinkage": 0
    }
    assert LayerInfluenceCallback(scorer="uniform").allocator_options == {}  # reads no statistics
    assert LayerInfluenceCallback(scorer="pattern").allocator_options == {}
    assert LayerInfluenceCallback(error_groups=0).allocator_options == {}  # error bars turned off
    placebo = LayerInfluenceCallback(scorer="placebo", scorer_options={"scorer": "layerif"})
    assert placebo.allocator_options == {"error_shrinkage": 1.0}  # a control allocates as its arm does
