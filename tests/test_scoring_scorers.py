"""Scorers against naive references that materialize every gradient and invert explicit matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from layermoe.adapters import MoELoRAConfig, inject
from layermoe.scoring import (
    SCORERS,
    BlockStatistics,
    Scorer,
    ScoringError,
    base_weight,
    capture_per_sample_gradients,
    capture_statistics,
    get_scorer,
    layerif_loop_influences,
    register_scorer,
    score_blocks,
    statistics_from_rows,
)
from layermoe.scoring.scorers.influence import datainf_influences, fisher_influences
from tests.tiny_models import random_tokens, tiny_llama


# ---------------------------------------------------------------------------- naive references
def naive_damping(train: torch.Tensor, scale: float = 0.1) -> float:
    return scale * float((train**2).sum(1).mean()) / train.shape[1]


def naive_datainf(train: torch.Tensor, val: torch.Tensor, lam: float) -> torch.Tensor:
    """-gbar^T [(1/n) sum_i (g_i g_i^T + lam I)^-1] g_k with every d x d inverse formed explicitly."""
    n, d = train.shape
    eye = torch.eye(d, dtype=torch.float64)
    inverse = sum(torch.linalg.inv(torch.outer(g, g) + lam * eye) for g in train) / n
    return -(train @ inverse @ val.mean(0))


def naive_fisher(train: torch.Tensor, val: torch.Tensor, lam: float) -> torch.Tensor:
    n, d = train.shape
    hessian = lam * torch.eye(d, dtype=torch.float64) + train.T @ train / n
    return -(train @ torch.linalg.inv(hessian) @ val.mean(0))


def naive_curvature_gain(train: torch.Tensor, val: torch.Tensor, lam: float) -> float:
    n, d = train.shape
    hessian = lam * torch.eye(d, dtype=torch.float64) + train.T @ train / n
    gbar = val.mean(0)
    return float(gbar @ torch.linalg.inv(hessian) @ gbar)


def naive_aggregate(influence: torch.Tensor, mode: str) -> float:
    benefits = [-float(x) for x in influence]
    if mode == "all":
        return sum(benefits)
    positive = sorted((b for b in benefits if b > 0), reverse=True)
    if mode == "beneficial":
        return sum(positive)
    return sum(positive[: math.ceil(len(positive) / 4)])


def naive_hill(eigenvalues: np.ndarray, bins: int = 100) -> float:
    """Hill estimator with WeightWatcher's xmin_peak rule, written with numpy and plain loops."""
    ev = np.sort(eigenvalues[eigenvalues > eigenvalues.max() * 1e-12])
    logs = np.log10(ev)
    counts, edges = np.histogram(logs, bins=bins, range=(logs.min(), logs.max()))
    peak = 10 ** edges[int(np.argmax(counts))]
    candidates = [i for i in range(len(ev) - 1) if 0.95 * peak <= ev[i] <= 1.5 * peak]
    if not candidates:
        candidates = [min(int(np.searchsorted(ev, peak)), len(ev) - 2)]
    best = (np.inf, np.nan)
    for i in candidates:
        tail = ev[i:]
        n = len(tail)
        alpha = 1 + n / np.sum(np.log(tail / tail[0]))
        distance = max(abs((1 - (tail[j] / tail[0]) ** (1 - alpha)) - j / n) for j in range(n))
        if distance < best[0]:
            best = (distance, alpha)
    return float(best[1])


# ---------------------------------------------------------------------------- synthetic data
def synthetic(n: int = 12, m: int = 5, d: int = 30, seed: int = 0, align: float = 0.0):
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(d, generator=generator, dtype=torch.float64)
    train = torch.randn(n, d, generator=generator, dtype=torch.float64)
    val = torch.randn(m, d, generator=generator, dtype=torch.float64) * 0.5 + direction
    if align:
        train = train * 0.3 + align * direction
    return train, val


def stats_of(train: torch.Tensor, val: torch.Tensor) -> BlockStatistics:
    return statistics_from_rows(train, val, dim=train.shape[1])


@pytest.mark.parametrize("mode", ["beneficial", "top25", "all"])
def test_influence_scorers_equal_naive_explicit_inverses(mode):
    blocks = {b: synthetic(seed=b) for b in range(3)}
    stats = {b: stats_of(*blocks[b]) for b in blocks}
    layerif = get_scorer("layerif", aggregation=mode).score(stats)
    fisher = get_scorer("fisher_influence", aggregation=mode).score(stats)
    for b, (train, val) in blocks.items():
        lam = naive_damping(train)
        assert layerif[b] == pytest.approx(naive_aggregate(naive_datainf(train, val, lam), mode), rel=1e-5)
        assert fisher[b] == pytest.approx(naive_aggregate(naive_fisher(train, val, lam), mode), rel=1e-5)


def test_influence_vectors_and_curvature_gain_equal_naive():
    train, val = synthetic(n=9, d=25, seed=3)
    stats = stats_of(train, val)
    for lam in (naive_damping(train), 0.37):
        torch.testing.assert_close(
            datainf_influences(stats, lam), naive_datainf(train, val, lam), rtol=1e-5, atol=0
        )
        torch.testing.assert_close(
            fisher_influences(stats, lam), naive_fisher(train, val, lam), rtol=1e-5, atol=0
        )
    gain = get_scorer("curvature_gain").score({0: stats})[0]
    assert gain == pytest.approx(naive_curvature_gain(train, val, naive_damping(train)), rel=1e-5)
    fixed = get_scorer("curvature_gain", damping=0.37).score({0: stats})[0]
    assert fixed == pytest.approx(naive_curvature_gain(train, val, 0.37), rel=1e-5)
    assert get_scorer("grad_norm").score({0: stats})[0] == pytest.approx(
        float(val.mean(0) @ val.mean(0)), rel=1e-12
    )


def _adapted_model(num_blocks: int = 3):
    model = tiny_llama(num_blocks=num_blocks).double()
    inject(model, MoELoRAConfig(experts=2, rank=2))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return model


def _batch(size: int, seed: int) -> dict[str, torch.Tensor]:
    ids = random_tokens(size, 8, seed)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_layerif_equals_the_literal_datainf_loop_on_captured_gradients():
    model = _adapted_model()
    train, val = [_batch(6, 1)], [_batch(3, 2)]
    stats = capture_statistics(model, train, val, chunk_size=4)
    train_grads = capture_per_sample_gradients(model, train)
    val_grads = capture_per_sample_gradients(model, val)
    scores = get_scorer("layerif").score(stats)
    for block in stats:
        per_train = [{k: v[i] for k, v in train_grads[block].items()} for i in range(6)]
        per_val = [{k: v[j] for k, v in val_grads[block].items()} for j in range(3)]
        loop = layerif_loop_influences(per_train, per_val)
        lam = (
            get_scorer("layerif").damping_scale * float(stats[block].train_sq_norms.mean()) / stats[block].dim
        )
        torch.testing.assert_close(datainf_influences(stats[block], lam), loop, rtol=1e-5, atol=0)
        assert scores[block] == pytest.approx(float((-loop).clamp_min(0).sum()), rel=1e-5)


def planted(n: int = 16, m: int = 6, d: int = 200, blocks: int = 4, chosen: int = 2, seed: int = 0):
    """Every block: the same validation gradients (a shared direction u plus noise) and training
    gradients of the same norms; only in block `chosen` do the training gradients have a component
    along u (cosine 0.5), elsewhere they are isotropic noise."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=generator, dtype=torch.float64)
    u = u / u.norm()
    val = torch.sqrt(torch.tensor(float(d))) * u + 0.5 * torch.randn(
        m, d, generator=generator, dtype=torch.float64
    )
    out = {}
    for b in range(blocks):
        noise = torch.randn(n, d, generator=generator, dtype=torch.float64)
        if b == chosen:
            norms = noise.norm(dim=1, keepdim=True)
            noise = (noise + 0.58 * norms * u) / math.sqrt(1 + 0.58**2)
        out[b] = (noise, val)
    return out


def test_planted_block_ranks_first_under_every_influence_scorer():
    blocks = planted()
    stats = {b: stats_of(*blocks[b]) for b in blocks}
    for name in ("layerif", "fisher_influence"):
        for mode in ("beneficial", "top25", "all"):
            scores = get_scorer(name, aggregation=mode).score(stats)
            assert max(scores, key=scores.get) == 2, (name, mode, scores)


def test_spearman_between_layerif_and_fisher_influence_is_reported():
    from scipy.stats import spearmanr

    model = _adapted_model(num_blocks=4)
    stats = capture_statistics(model, [_batch(8, 3)], [_batch(4, 4)], chunk_size=4)
    layerif = get_scorer("layerif").score(stats)
    fisher = get_scorer("fisher_influence").score(stats)
    rho = spearmanr([layerif[b] for b in stats], [fisher[b] for b in stats]).statistic
    print(f"Spearman(layerif, fisher_influence) over {len(stats)} blocks: {rho:.3f}")
    assert len(layerif) == len(fisher) == 4 and all(v >= 0 for v in layerif.values())


def test_alpha_hill_equals_naive_numpy_hill_estimator():
    generator = np.random.default_rng(0)
    # Pareto tail with alpha = 3 plus a bulk: the estimator should land near 3 and equal the naive one.
    sample = np.concatenate([generator.pareto(2.0, 400) + 1.0, generator.uniform(0.05, 1.0, 600)])
    ours = get_scorer("alpha_hill")
    from layermoe.scoring import hill_alpha_xmin_peak

    assert hill_alpha_xmin_peak(torch.from_numpy(sample)) == pytest.approx(naive_hill(sample), rel=1e-10)
    model = _adapted_model(num_blocks=2)
    scores = ours.score(model)
    for block, layers in {0: model.model.layers[0], 1: model.model.layers[1]}.items():
        alphas = []
        for module in layers.modules():
            if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
                weight = base_weight(module).numpy()
                alphas.append(
                    naive_hill(
                        np.linalg.eigvalsh(weight.T @ weight)
                        if weight.shape[0] >= weight.shape[1]
                        else np.linalg.eigvalsh(weight @ weight.T)
                    )
                )
        assert scores[block] == pytest.approx(float(np.mean(alphas)), rel=1e-6)


def test_uniform_and_score_blocks():
    model = _adapted_model(num_blocks=2)
    assert get_scorer("uniform").score(model) == {0: 1.0, 1: 1.0}
    direct = get_scorer("grad_norm").score(capture_statistics(model, [_batch(4, 1)], [_batch(2, 2)]))
    assert score_blocks(model, "grad_norm", [_batch(4, 1)], [_batch(2, 2)]) == pytest.approx(
        direct, rel=1e-12
    )
    assert score_blocks(model, "uniform") == {0: 1.0, 1: 1.0}
    with pytest.raises(ValueError, match="needs train_batches"):
        score_blocks(model, "layerif")


def test_registry_accepts_user_scorers_and_rejects_duplicates():
    @register_scorer("test_trace_ratio")
    class TraceRatio(Scorer):
        def score(self, stats):
            return {b: float(s.K_tt.trace() / s.n) for b, s in stats.items()}

    try:
        stats = {0: stats_of(*synthetic())}
        assert get_scorer("test_trace_ratio").score(stats)[0] == pytest.approx(
            float(stats[0].train_sq_norms.mean())
        )
        with pytest.raises(ValueError, match="already registered"):
            register_scorer("layerif")(TraceRatio)
        with pytest.raises(KeyError, match="unknown scorer"):
            get_scorer("no_such_scorer")
        with pytest.raises(TypeError):
            register_scorer("test_not_a_scorer")(int)
    finally:
        SCORERS.pop("test_trace_ratio", None)


def test_damping_is_validated_and_degenerate_statistics_raise():
    stats = {0: stats_of(*synthetic())}
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="damping"):
            get_scorer("fisher_influence", damping=bad)
        with pytest.raises(ValueError, match="damping_scale"):
            get_scorer("layerif", damping_scale=bad)
    with pytest.raises(ValueError, match="aggregation"):
        get_scorer("layerif", aggregation="median")
    zero = {3: stats_of(torch.zeros(4, 6, dtype=torch.float64), torch.ones(2, 6, dtype=torch.float64))}
    with pytest.raises(ScoringError, match="block 3"):
        get_scorer("layerif").score(zero)
    train, val = synthetic()
    train[1, 2] = float("nan")
    for name in ("layerif", "fisher_influence", "curvature_gain", "grad_norm"):
        with pytest.raises(ScoringError, match="block 5"):
            get_scorer(name).score({0: stats[0], 5: stats_of(train, val)})


def test_sign_convention_more_beneficial_data_scores_higher():
    train, val = synthetic(n=10, d=20, seed=4)
    helpful = stats_of(train * 0.3 + val.mean(0), val)
    harmful = stats_of(train * 0.3 - val.mean(0), val)
    for name in ("layerif", "fisher_influence"):
        scores = get_scorer(name, aggregation="all").score({0: helpful, 1: harmful})
        assert scores[0] > 0 > scores[1], (name, scores)
    assert get_scorer("curvature_gain").score({0: helpful})[0] >= 0
