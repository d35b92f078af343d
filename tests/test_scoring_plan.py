"""Scoring memory plan: exact vs sketched rows from the store size, one pass, fidelity of the sketch."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import spearmanr

from layermoe.adapters import MoELoRAConfig, inject
from layermoe.scoring import (
    BlockStatistics,
    CountSketch,
    ScoringError,
    adapter_block_dim,
    base_block_dim,
    capture_per_sample_gradients,
    capture_plan,
    capture_statistics,
    causal_lm_per_sample_loss,
    get_scorer,
    plan_capture,
    projection_error_bound,
    statistics_from_pieces,
)
from layermoe.scoring.plan import MIN_PROJECTION_DIM, PROJECTION_GRANULE, sketch_relative_std
from tests.test_scoring_capture import adapted, padded_batch
from tests.tiny_models import VOCAB, tiny_llama


def test_plan_keeps_exact_rows_when_they_fit():
    plan = plan_capture({0: 1000, 1: 2000}, samples=10, store_bytes=10 * 3000 * 4)
    assert [b.projection_dim for b in plan.blocks] == [None, None]
    assert plan.passes == ((0, 1),)
    assert plan.stored_bytes == plan.exact_bytes == 120_000


def test_auto_plan_sketches_the_widest_blocks_to_the_largest_fitting_width_in_one_pass():
    dims = {0: 3_000, 1: 50_000, 2: 200_000, 3: 200_000}
    samples, store = 100, 100 * 4 * 120_000
    plan = plan_capture(dims, samples, store)
    k = plan.block(2).projection_dim
    assert k is not None and k % PROJECTION_GRANULE == 0
    assert plan.block(0).projection_dim is None  # narrower than k: stays exact
    assert plan.block(3).projection_dim == k
    assert len(plan.passes) == 1
    need = lambda width: sum(samples * 4 * min(d, width) for d in dims.values())  # noqa: E731
    assert need(k) <= store < need(k + PROJECTION_GRANULE)  # the largest granule-aligned width
    assert plan.peak_pass_bytes == need(k) and plan.exact_bytes == need(max(dims.values()))
    assert "1 pass(es)" in plan.describe() and f"k={k:,}" in plan.describe()


def test_plan_modes_exact_passes_fixed_width_and_minimum_width():
    dims = {b: 10_000 for b in range(4)}
    exact = plan_capture(dims, 10, 10 * 4 * 20_000, projection_dim=None)
    assert exact.passes == ((0, 1), (2, 3)) and all(b.projection_dim is None for b in exact.blocks)
    fixed = plan_capture(dims, 10, 10**9, projection_dim=512)
    assert {b.projection_dim for b in fixed.blocks} == {512}
    # a store too small for MIN_PROJECTION_DIM: the minimum width, in more passes, rather than more noise
    tiny = plan_capture(dims, 10, 10 * 4 * MIN_PROJECTION_DIM * 2)
    assert {b.projection_dim for b in tiny.blocks} == {MIN_PROJECTION_DIM} and len(tiny.passes) == 2
    with pytest.raises(ScoringError, match="projection_dim"):
        plan_capture(dims, 10, 100, projection_dim=None)


def test_block_dims_from_shapes_match_the_injected_model():
    model = tiny_llama(num_blocks=2, hidden=32)
    inject(model, MoELoRAConfig(experts={0: 1, 1: 3}, rank=2))
    shapes = [
        (m.in_features, m.out_features)
        for n, m in model.named_modules()
        if n.startswith("model.layers.0.") and hasattr(m, "lora_A")
    ]
    plan = capture_plan(model, samples=4, max_store_bytes=10**9)
    for block, experts in ((0, 1), (1, 3)):
        params = sum(
            p.numel() for n, p in model.named_parameters() if f"layers.{block}." in n and "lora_" in n
        )
        assert plan.block(block).dim == params == adapter_block_dim(shapes, experts, 2)
    base = capture_plan(model, samples=4, scope="base", max_store_bytes=10**9)
    assert base.block(0).dim == base_block_dim(shapes) == sum(a * b for a, b in shapes)


def test_default_store_is_a_fraction_of_available_memory():
    model = adapted()
    plan = capture_plan(model, samples=4)
    assert "available RAM" in plan.store_source and plan.store_bytes > 0
    with pytest.raises(ValueError, match="store_fraction"):
        capture_plan(model, samples=4, store_fraction=0.0)
    with pytest.raises(ValueError, match="max_store_bytes"):
        capture_plan(model, samples=4, max_store_bytes=-1)


def _counting(loss_fn):
    calls = []

    def counted(model, batch):
        calls.append(1)
        return loss_fn(model, batch)

    return counted, calls


def test_capture_sketches_only_the_blocks_that_do_not_fit_in_a_single_pass():
    """Block 0 (1 expert, narrow) stays exact, block 1 (4 experts) is sketched; its statistics are the
    CountSketch of the explicit per-sample gradients, block 0's the exact ones; one pass over the data."""
    model = adapted(experts={0: 1, 1: 4})
    train, val = [padded_batch(5, seed=1)], [padded_batch(3, seed=2)]
    dims = capture_plan(model, 8, max_store_bytes=10**9)
    narrow, wide = dims.block(0).dim, dims.block(1).dim
    k = 1280
    assert narrow < k < wide  # the store below fits block 0 exactly and block 1 at width k
    store = 8 * 8 * (narrow + k)  # float64 model: 8 bytes per number
    loss_fn, calls = _counting(causal_lm_per_sample_loss)
    stats = capture_statistics(model, train, val, loss_fn, max_store_bytes=store, projection_seed=3)
    assert len(calls) == 2  # one forward+backward per chunk (one val, one train chunk): a single pass
    assert stats[0].projected_dim is None and stats[1].projected_dim == k
    train_grads = capture_per_sample_gradients(model, train)
    val_grads = capture_per_sample_gradients(model, val)
    for block, width in ((0, None), (1, k)):

        def rows(grads, block=block, width=width):
            total = []
            for key in sorted(grads):
                module, piece = key.rsplit(".", 1)
                flat = grads[key].reshape(grads[key].shape[0], -1)
                total.append(
                    flat
                    if width is None
                    else CountSketch(flat.shape[1], width, 3, f"{block}/{module}/{piece}")(flat)
                )
            return [torch.cat(total, 1)] if width is None else [sum(total)]

        expected = statistics_from_pieces(rows(train_grads[block]), rows(val_grads[block]), stats[block].dim)
        torch.testing.assert_close(stats[block].K_tt, expected.K_tt, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(stats[block].K_vt, expected.K_vt, rtol=1e-9, atol=1e-12)
    assert projection_error_bound(stats[0]) is None and projection_error_bound(stats[1]) > 0


def _task_batch(batch: int, seed: int, length: int = 12) -> dict[str, torch.Tensor]:
    """Variations of one template sequence (two tokens changed per sample): samples of one task have
    correlated gradients, as fine-tuning data does, unlike independent random token strings."""
    generator = torch.Generator().manual_seed(seed)
    template = torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(123))
    ids = template.repeat(batch, 1)
    positions = torch.randint(0, length, (batch, 2), generator=generator)
    ids.scatter_(1, positions, torch.randint(0, VOCAB, (batch, 2), generator=generator))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_auto_sketch_keeps_the_block_ranking_of_exact_scores():
    """8 blocks of 34,844 adapter coordinates; a store of a quarter of the exact rows gives one pass at
    k = 8,704: every scorer ranks the blocks as the exact statistics do (Spearman >= 0.95)."""
    blocks = 8
    model = tiny_llama(num_blocks=blocks, hidden=64, seed=0)
    inject(model, MoELoRAConfig(experts=4, rank=8))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                block = int(name.split("layers.")[1].split(".")[0])
                scale = 0.5 + 0.25 * block if "lora_B" in name else 1.0  # blocks differ in influence
                param.copy_(0.3 * scale * torch.randn(param.shape, generator=generator))
    train, val = [_task_batch(8, 1), _task_batch(8, 3)], [_task_batch(8, 2)]
    exact = capture_statistics(model, train, val, projection_dim=None)
    store = 24 * 4 * blocks * exact[0].dim // 4
    sketched = capture_statistics(model, train, val, max_store_bytes=store)
    assert {s.projected_dim for s in sketched.values()} == {8704}
    for name in ("layerif", "fisher_influence", "curvature_gain", "grad_norm"):
        a, b = get_scorer(name).score(exact), get_scorer(name).score(sketched)
        rho = spearmanr([a[i] for i in sorted(a)], [b[i] for i in sorted(a)]).statistic
        assert rho >= 0.95, (name, rho)


def test_sketch_error_bound_holds_empirically_and_matches_its_closed_form():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4000, generator=generator, dtype=torch.float64)
    y = 0.3 * x + torch.randn(4000, generator=generator, dtype=torch.float64)
    k = 256
    estimates = torch.stack(
        [
            (CountSketch(4000, k, seed, "p")(x[None]) * CountSketch(4000, k, seed, "p")(y[None])).sum()
            for seed in range(300)
        ]
    )
    assert float(estimates.mean()) == pytest.approx(float(x @ y), rel=0.05)  # unbiased
    assert float(estimates.std()) <= sketch_relative_std(k) * float(x.norm() * y.norm())
    stats = BlockStatistics(
        K_tt=torch.diag(torch.tensor([4.0, 9.0], dtype=torch.float64)),
        K_vt=torch.tensor([[1.0, -2.0]], dtype=torch.float64),
        train_sq_norms=torch.tensor([4.0, 9.0], dtype=torch.float64),
        val_sq_norms=torch.tensor([16.0], dtype=torch.float64),
        val_mean_grad_sq=torch.tensor(16.0, dtype=torch.float64),
        K_gt=torch.tensor([1.0, -2.0], dtype=torch.float64),
        dim=10_000,
        projected_dim=2048,
    )
    expected = math.sqrt(2 / 2048) * math.sqrt(16.0 * 6.5) / math.sqrt(2.5)
    assert projection_error_bound(stats) == pytest.approx(expected)
