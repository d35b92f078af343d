"""Scoring memory plan: exact vs sketched rows from the store size, one pass, fidelity of the sketch."""

from __future__ import annotations

import dataclasses
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
    statistics_with_exact_mean,
)
from layermoe.scoring.plan import MIN_PROJECTION_DIM, PROJECTION_GRANULE, sketch_relative_std
from layermoe.scoring.scorers import fisher_influences
from tests.test_scoring_capture import (
    adapted,
    assert_matches_sketched_reference,
    padded_batch,
    sketched_reference,
)
from tests.tiny_models import VOCAB, tiny_llama


def test_plan_keeps_exact_rows_when_they_fit():
    plan = plan_capture({0: 1000, 1: 2000}, samples=10, store_bytes=10 * 3000 * 4)
    assert [b.projection_dim for b in plan.blocks] == [None, None]
    assert plan.passes == ((0, 1),)
    assert plan.stored_bytes == plan.exact_bytes == 120_000


def test_auto_plan_sketches_the_widest_blocks_to_the_largest_fitting_width_in_one_pass():
    """Every block's exact mean (one row of d_l numbers) is reserved first; k fills the rest."""
    dims = {0: 3_000, 1: 50_000, 2: 200_000, 3: 200_000}
    samples, store = 100, 100 * 4 * 120_000
    plan = plan_capture(dims, samples, store)
    k = plan.block(2).projection_dim
    assert k is not None and k % PROJECTION_GRANULE == 0
    assert plan.block(0).projection_dim is None  # narrower than k: stays exact
    assert plan.block(3).projection_dim == k
    assert len(plan.passes) == 1
    assert [b.exact_mean for b in plan.blocks] == [False, True, True, True]
    need = lambda width: sum(samples * 4 * min(d, width) for d in dims.values())  # noqa: E731
    means = 4 * sum(dims.values())
    assert need(k) + means <= store < need(k + PROJECTION_GRANULE) + means  # the largest aligned width
    sketched_means = 4 * (dims[1] + dims[2] + dims[3])
    assert plan.peak_pass_bytes == need(k) + sketched_means and plan.exact_bytes == need(max(dims.values()))
    text = plan.describe()
    assert "1 pass(es)" in text and f"k={k:,}" in text and "mean validation gradient exact" in text


def test_plan_keeps_exact_means_only_without_an_extra_pass():
    dims = {b: 10_000 for b in range(4)}
    # a fixed k whose rows and means fit one pass: the means are kept
    fixed = plan_capture(dims, 10, 10 * 4 * 4 * 512 + 4 * 4 * 10_000, projection_dim=512)
    assert all(b.exact_mean for b in fixed.blocks) and len(fixed.passes) == 1
    # one byte less and the means would need a second pass: sketched means, one pass
    tight = plan_capture(dims, 10, 10 * 4 * 4 * 512 + 4 * 4 * 10_000 - 1, projection_dim=512)
    assert not any(b.exact_mean for b in tight.blocks) and len(tight.passes) == 1
    assert "mean validation gradient exact" not in tight.describe()
    # "auto" gives up the means rather than going below MIN_PROJECTION_DIM: with the means reserved
    # k would be 768, so k comes from the whole store (1,792: 160 bytes per coordinate over 4 blocks)
    auto = plan_capture(dims, 10, 160 * 1900)
    assert {b.projection_dim for b in auto.blocks} == {1792} and not any(b.exact_mean for b in auto.blocks)
    assert len(auto.passes) == 1


def test_plan_modes_exact_passes_fixed_width_and_minimum_width():
    dims = {b: 10_000 for b in range(4)}
    exact = plan_capture(dims, 10, 10 * 4 * 20_000, projection_dim=None)
    assert exact.passes == ((0, 1), (2, 3)) and all(b.projection_dim is None for b in exact.blocks)
    fixed = plan_capture(dims, 10, 10**9, projection_dim=512)
    assert {b.projection_dim for b in fixed.blocks} == {512}
    # a store too small for MIN_PROJECTION_DIM: the minimum width, in more passes, rather than more noise
    tiny = plan_capture(dims, 10, 10 * 4 * MIN_PROJECTION_DIM * 2)
    assert {b.projection_dim for b in tiny.blocks} == {MIN_PROJECTION_DIM} and len(tiny.passes) == 2
    assert not any(b.exact_mean for b in tiny.blocks)  # the means would need 4 passes instead of 2
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
    """Block 0 (1 expert, narrow) stays exact, block 1 (4 experts) is sketched with its exact mean
    validation gradient: its statistics are those of the explicit per-sample gradients mapped to the
    exact gbar direction plus the CountSketch of the rest (sketched_reference), with the exact K_gt and
    ||gbar||^2; block 0's statistics are the exact ones; one pass over the data."""
    model = adapted(experts={0: 1, 1: 4})
    train, val = [padded_batch(5, seed=1)], [padded_batch(3, seed=2)]
    dims = capture_plan(model, 8, max_store_bytes=10**9)
    narrow, wide = dims.block(0).dim, dims.block(1).dim
    k = 1280
    assert narrow < k < wide  # the store below fits block 0 exactly and block 1 at width k
    # float64 model: 8 bytes per number; 8 rows of each block at width <= k, and both blocks' means
    store = 8 * 8 * (narrow + k) + 8 * (narrow + wide)
    loss_fn, calls = _counting(causal_lm_per_sample_loss)
    stats = capture_statistics(model, train, val, loss_fn, max_store_bytes=store, projection_seed=3)
    assert len(calls) == 2  # one forward+backward per chunk (one val, one train chunk): a single pass
    assert stats[0].projected_dim is None and stats[1].projected_dim == k
    assert not stats[0].exact_mean and stats[1].exact_mean
    train_grads = capture_per_sample_gradients(model, train)
    val_grads = capture_per_sample_gradients(model, val)

    def rows(grads, block, width):
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

    # block 0: the exact statistics of the explicit gradients
    exact = statistics_from_pieces(rows(train_grads[0], 0, None), rows(val_grads[0], 0, None), narrow)
    for field in ("K_tt", "K_vt", "K_vv", "K_gt"):
        torch.testing.assert_close(getattr(stats[0], field), getattr(exact, field), rtol=1e-9, atol=1e-12)
    # block 1: the exact gbar direction plus the CountSketch of the rest, from the explicit gradients
    reference = sketched_reference(train_grads[1], val_grads[1], 1, k, 3)
    assert_matches_sketched_reference(stats[1], reference)
    # a plain sketch of the same rows would have given another K_gt: the exact mean changed something
    plain = statistics_from_pieces(rows(train_grads[1], 1, k), rows(val_grads[1], 1, k), wide)
    assert not torch.allclose(plain.K_gt, reference[1], rtol=1e-3, atol=0)
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
    k = 7,168 with the blocks' exact mean validation gradients: every scorer ranks the blocks as the
    exact statistics do (Spearman >= 0.95) for each of the sketch seeds 0-4.

    Without the exact means (every product sketched, k = 8,704) fisher_influence gave 0.857-1.0 over
    seeds 0-9: its exact Fisher inverse of the badly conditioned 16 x 16 training Gram amplifies errors in
    K_gt, and several blocks score within 1-2% of each other."""
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
    names = ("layerif", "fisher_influence", "curvature_gain", "grad_norm")
    exact_scores = {name: get_scorer(name).score(exact) for name in names}
    rhos: dict[str, list[float]] = {name: [] for name in names}
    for seed in range(5):
        sketched = capture_statistics(model, train, val, max_store_bytes=store, projection_seed=seed)
        assert {s.projected_dim for s in sketched.values()} == {7168}
        for block, stats in sketched.items():
            assert stats.exact_mean
            torch.testing.assert_close(stats.K_gt, exact[block].K_gt, rtol=1e-5, atol=0)
        for name in names:
            a, b = exact_scores[name], get_scorer(name).score(sketched)
            rhos[name].append(spearmanr([a[i] for i in sorted(a)], [b[i] for i in sorted(a)]).statistic)
    assert all(min(values) >= 0.95 for values in rhos.values()), rhos


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
    # the larger of the two families: K_vt's sqrt(2/k) sqrt(16 x 6.5) / rms(1, -2) here
    expected = math.sqrt(2 / 2048) * math.sqrt(16.0 * 6.5) / math.sqrt(2.5)
    assert projection_error_bound(stats) == pytest.approx(expected)
    # with an exact mean only the training Gram is sketched: sqrt(2/k) x 6.5 / rms(4, 0, 0, 9)
    exact_mean = dataclasses.replace(stats, exact_mean=True)
    assert projection_error_bound(exact_mean) == pytest.approx(math.sqrt(2 / 2048) * 6.5 / math.sqrt(97 / 4))


def _task_like_rows(seed: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Training (6, 3000) and validation (4, 3000) rows around one shared direction: a badly conditioned
    training Gram, as correlated fine-tuning samples give."""
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(3000, generator=generator, dtype=torch.float64)
    train = shared + noise * torch.randn(6, 3000, generator=generator, dtype=torch.float64)
    val = shared + noise * torch.randn(4, 3000, generator=generator, dtype=torch.float64)
    return train, val


def test_exact_mean_direction_is_exact_along_gbar_unbiased_and_a_gram_matrix():
    """statistics_with_exact_mean: K_gt and ||gbar||^2 exact (and reproduced by the mapped rows), the
    training Gram unbiased over sketch seeds, all products one positive semi-definite Gram matrix, and a
    subset of the training samples alone keeps the exact K_gt."""
    train, val = _task_like_rows(0, 1.0)
    val[1] += 2 * train.mean(dim=0)  # validation samples that differ from their mean a lot
    exact = statistics_from_pieces([train], [val], 3000)
    k, seeds = 1024, 300
    grams = []
    for seed in range(seeds):
        sketch = CountSketch(3000, k, seed, "p")
        stats = statistics_with_exact_mean(
            sketch(train), sketch(val), exact.K_gt, exact.val_mean_grad_sq, 3000, k
        )
        assert stats.exact_mean and stats.projected_dim == k
        assert torch.equal(stats.K_gt, exact.K_gt) and torch.equal(
            stats.val_mean_grad_sq, exact.val_mean_grad_sq
        )
        torch.testing.assert_close(stats.K_vt.mean(dim=0), exact.K_gt, rtol=1e-10, atol=0)
        torch.testing.assert_close(stats.K_vv.mean(), exact.val_mean_grad_sq, rtol=1e-10, atol=0)
        joint = torch.cat([torch.cat([stats.K_tt, stats.K_vt.T], 1), torch.cat([stats.K_vt, stats.K_vv], 1)])
        assert float(torch.linalg.eigvalsh(joint).min()) > -1e-9 * float(joint.diagonal().max())
        kept = torch.tensor([4, 1, 3])
        part = stats.subset(kept, torch.tensor([3, 1, 0, 2]))
        assert part.exact_mean and torch.equal(part.K_gt, exact.K_gt[kept])
        assert not stats.subset(kept, torch.tensor([0, 2])).exact_mean
        grams.append(stats.K_tt)
    # each entry's sketch error is <= sqrt(2/k) ||g_i|| ||g_k||; the mean of 300 is within 4 standard errors
    tolerance = 4 * sketch_relative_std(k) * float(train.norm(dim=1).max()) ** 2 / math.sqrt(seeds)
    assert float((torch.stack(grams).mean(0) - exact.K_tt).abs().max()) < tolerance
    assert float(exact.K_tt.abs().min()) > 10 * tolerance  # the check above is not vacuous


def test_exact_mean_direction_solves_a_validation_mean_in_the_training_span():
    """gbar = G^T a lies in the span of 6 nearly parallel training gradients (condition number ~1e5):
    mapped rows are one linear image of every vector, so the Fisher solve recovers the exact influences
    -n a. Only replacing a plain sketch's K_gt by the exact one (a sketched Gram mixed with exact
    products) would leave the inverse to amplify the sketch's error in the Gram."""
    train, _ = _task_like_rows(1, 0.02)
    coefficients = torch.linspace(-1.0, 2.0, 6, dtype=torch.float64)
    generator = torch.Generator().manual_seed(2)
    spread = torch.randn(4, 3000, generator=generator, dtype=torch.float64)
    val = coefficients @ train + spread - spread.mean(dim=0)  # mean exactly G^T a
    exact = statistics_from_pieces([train], [val], 3000)
    assert float(torch.linalg.cond(exact.K_tt)) > 1e4
    lam = 1e-12 * float(exact.train_sq_norms.mean())
    reference = fisher_influences(exact, lam)
    torch.testing.assert_close(reference, -6 * coefficients, rtol=1e-4, atol=0)
    sketch = CountSketch(3000, 512, 0, "p")
    mapped = statistics_with_exact_mean(
        sketch(train), sketch(val), exact.K_gt, exact.val_mean_grad_sq, 3000, 512
    )
    torch.testing.assert_close(fisher_influences(mapped, lam), reference, rtol=1e-6, atol=1e-6)
    plain = statistics_from_pieces([sketch(train)], [sketch(val)], 3000, 512)
    mixed = dataclasses.replace(plain, K_gt=exact.K_gt)
    assert float((fisher_influences(mixed, lam) - reference).abs().max()) > 0.1 * float(reference.abs().max())
