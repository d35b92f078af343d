"""Gradient capture: per-sample gradients and Gram statistics against torch.func and explicit algebra."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from layermoe.adapters import MoELoRAConfig, inject
from layermoe.scoring import (
    CountSketch,
    ScoringError,
    capture_per_sample_gradients,
    capture_statistics,
    causal_lm_per_sample_loss,
    get_scorer,
    statistics_from_pieces,
)
from tests.tiny_models import random_tokens, tiny_gpt2, tiny_llama


def adapted(builder=tiny_llama, num_blocks: int = 2, experts=2, rank: int = 2, top_k=None, seed: int = 0):
    """A float64 tiny model with MoE-LoRA adapters whose B and router are non-zero (so every
    parameter has a gradient)."""
    model = builder(num_blocks=num_blocks, seed=seed).double()
    inject(model, MoELoRAConfig(experts=experts, rank=rank, top_k=top_k))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return model


def padded_batch(batch: int = 6, length: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded causal-LM batch: the last tokens of some samples are padding (mask 0, label -100)."""
    ids = random_tokens(batch, length, seed)
    mask = torch.ones_like(ids)
    for i in range(0, batch, 2):
        mask[i, length - 1 - (i % 3) :] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sketched_reference(train_grads, val_grads, block: int, k: int, seed: int):
    """Independent reference for a sketched block with an exact mean validation gradient, from explicit
    per-sample gradients {"module.piece": (rows, *shape)}: S (one CountSketch per piece, summed) is
    applied to explicitly formed vectors, where the capture uses linearity. Every vector x is mapped to
    (x . u, S(x - (x . u) u)) with u = gbar / ||gbar||; v_j . u is estimated as
    ||gbar|| + S(v_j - gbar) . S(u). Returns the statistics of the mapped vectors (before the exact K_gt
    and ||gbar||^2 replace their reconstructions), the exact K_gt and the exact ||gbar||^2."""
    keys = sorted(train_grads)
    widths = [train_grads[key][0].numel() for key in keys]
    sketches = [
        CountSketch(width, k, seed, f"{block}/{key.rsplit('.', 1)[0]}/{key.rsplit('.', 1)[1]}")
        for key, width in zip(keys, widths, strict=True)
    ]

    def flat(grads):
        return torch.cat([grads[key].reshape(grads[key].shape[0], -1) for key in keys], 1)

    def sketch(rows):
        return sum(s(part) for s, part in zip(sketches, rows.split(widths, dim=1), strict=True))

    train, val = flat(train_grads), flat(val_grads)
    gbar = val.mean(dim=0)
    u = gbar / gbar.norm()
    along_train = train @ u
    along_val = gbar.norm() + (sketch(val - gbar) @ sketch(u[None]).T).squeeze(1)
    expected = statistics_from_pieces(
        [along_train[:, None], sketch(train - along_train[:, None] * u)],
        [along_val[:, None], sketch(val - along_val[:, None] * u)],
        train.shape[1],
        k,
    )
    return expected, train @ gbar, gbar @ gbar


def assert_matches_sketched_reference(stats, reference) -> None:
    expected, k_gt, mean_sq = reference
    assert stats.exact_mean
    for field in ("K_tt", "K_vt", "K_vv", "train_sq_norms", "val_sq_norms"):
        torch.testing.assert_close(getattr(stats, field), getattr(expected, field), rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(stats.K_gt, k_gt, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(stats.val_mean_grad_sq, mean_sq, rtol=1e-9, atol=0)
    # the mapped rows reproduce the exact values they replace (their validation mean is T gbar)
    torch.testing.assert_close(expected.K_gt, k_gt, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(expected.val_mean_grad_sq, mean_sq, rtol=1e-7, atol=0)


def vmap_reference(model, batch) -> dict[str, torch.Tensor]:
    """Per-sample gradients of every parameter that requires grad (adapter scope) by vmap(grad).

    No attention mask: the padding is on the right and attention is causal, so padded positions
    cannot change the supervised tokens' logits; the mask only enters through the labels.
    """
    model.eval()
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    frozen.update({n: b for n, b in model.named_buffers()})

    def loss(params, ids, labels):
        logits = functional_call(model, ({**params, **frozen},), kwargs={"input_ids": ids[None]}).logits[0]
        target = labels[1:]
        total = F.cross_entropy(logits[:-1], target, ignore_index=-100, reduction="sum")
        return total / (target != -100).sum()

    return vmap(grad(loss), in_dims=(None, 0, 0))(trainable, batch["input_ids"], batch["labels"])


def base_vmap_reference(model, batch, suffix: str) -> dict[str, torch.Tensor]:
    """Per-sample gradients of the frozen base weights whose names end with `suffix`."""
    model.eval()
    names = [n for n, _ in model.named_parameters() if n.endswith(suffix)]
    everything = {n: p.detach() for n, p in model.named_parameters()}
    everything.update({n: b for n, b in model.named_buffers()})
    others = {n: v for n, v in everything.items() if n not in names}

    def loss(params, ids, labels):
        logits = functional_call(model, ({**params, **others},), kwargs={"input_ids": ids[None]}).logits[0]
        target = labels[1:]
        total = F.cross_entropy(logits[:-1], target, ignore_index=-100, reduction="sum")
        return total / (target != -100).sum()

    return vmap(grad(loss), in_dims=(None, 0, 0))(
        {n: everything[n] for n in names}, batch["input_ids"], batch["labels"]
    )


def _match(reference: dict[str, torch.Tensor], block: int, key: str) -> torch.Tensor:
    hits = [name for name in reference if f".{block}.{key}" in name and name.endswith(key)]
    assert len(hits) == 1, (key, hits)
    return reference[hits[0]]


@pytest.mark.parametrize(
    ("experts", "top_k"),
    [({0: 2, 1: 1}, None), (3, 2)],
    ids=["dense-and-single-expert", "top2-of-3"],
)
def test_adapter_per_sample_gradients_equal_vmap(experts, top_k):
    model = adapted(experts=experts, top_k=top_k)
    batch = padded_batch()
    ours = capture_per_sample_gradients(model, [batch], chunk_size=4)
    reference = vmap_reference(model, batch)
    assert sum(len(v) for v in ours.values()) == len(reference)
    for block, grads in ours.items():
        for key, value in grads.items():
            expected = _match(reference, block, key)
            assert value.shape == expected.shape
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2], ids=["linear", "conv1d"])
def test_base_scope_per_sample_gradients_equal_vmap(builder):
    model = adapted(builder=builder)
    batch = padded_batch()
    attention = "self_attn" if builder is tiny_llama else "attn"
    ours = capture_per_sample_gradients(model, [batch], scope="base", modules=[attention], chunk_size=3)
    reference = base_vmap_reference(model, batch, "base_layer.weight")
    assert len(ours) == 2
    for block, grads in ours.items():
        assert grads and all(attention in key for key in grads)
        for key, value in grads.items():
            expected = _match(reference, block, key)
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))


def _rows(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grads[k].reshape(grads[k].shape[0], -1) for k in sorted(grads)], dim=1)


def test_statistics_equal_explicit_grams_and_are_identical_across_chunk_sizes():
    model = adapted(num_blocks=3)
    train = [padded_batch(5, seed=1), padded_batch(4, seed=2)]
    val = [padded_batch(3, seed=3)]
    train_grads = capture_per_sample_gradients(model, train, chunk_size=9)
    val_grads = capture_per_sample_gradients(model, val, chunk_size=9)
    results = [capture_statistics(model, train, val, chunk_size=c) for c in (1, 2, 9)]
    for block in range(3):
        g, v = _rows(train_grads[block]), _rows(val_grads[block])
        explicit = {
            "K_tt": g @ g.T,
            "K_vt": v @ g.T,
            "train_sq_norms": (g * g).sum(1),
            "val_sq_norms": (v * v).sum(1),
            "val_mean_grad_sq": v.mean(0) @ v.mean(0),
            "K_gt": g @ v.mean(0),
        }
        for stats in results:
            assert stats[block].dim == g.shape[1] and stats[block].n == 9 and stats[block].m == 3
            for name, value in explicit.items():
                torch.testing.assert_close(getattr(stats[block], name), value, rtol=1e-6, atol=1e-12)
        for other in results[1:]:
            torch.testing.assert_close(other[block].K_tt, results[0][block].K_tt, rtol=1e-6, atol=0)
    for name in ("layerif", "fisher_influence", "curvature_gain", "grad_norm"):
        scores = [get_scorer(name).score(stats) for stats in results]
        for other in scores[1:]:
            assert other == pytest.approx(scores[0], rel=1e-6)


def test_memory_groups_give_the_same_statistics_as_one_pass():
    model = adapted(num_blocks=3)
    train, val = [padded_batch(4, seed=1)], [padded_batch(2, seed=2)]
    one = capture_statistics(model, train, val)
    row_bytes = 8 * one[0].dim
    several = capture_statistics(model, train, val, projection_dim=None, max_store_bytes=6 * row_bytes + 1)
    for block in one:
        torch.testing.assert_close(several[block].K_tt, one[block].K_tt, rtol=1e-12, atol=0)
        torch.testing.assert_close(several[block].K_vt, one[block].K_vt, rtol=1e-12, atol=0)
    with pytest.raises(ScoringError, match="projection_dim"):
        capture_statistics(model, train, val, projection_dim=None, max_store_bytes=row_bytes)


def test_projection_equals_the_count_sketch_of_the_explicit_gradients():
    """The store fits the exact mean validation gradients, so each block is the CountSketch of the
    explicit per-sample gradients orthogonal to gbar plus the exact gbar direction (sketched_reference);
    without the means (a store too small for them) it is the plain CountSketch."""
    model = adapted()
    train, val = [padded_batch(5, seed=1)], [padded_batch(3, seed=2)]
    k = 64
    stats = capture_statistics(model, train, val, projection_dim=k, projection_seed=7, chunk_size=2)
    # rows of 8 samples at k, 8 bytes each, for both blocks: no room for the means in one pass
    plain = capture_statistics(
        model, train, val, projection_dim=k, projection_seed=7, chunk_size=2, max_store_bytes=2 * 8 * 8 * k
    )
    train_grads = capture_per_sample_gradients(model, train)
    val_grads = capture_per_sample_gradients(model, val)
    for block in stats:

        def sketch(grads, block=block):
            total = 0
            for key in sorted(grads):
                module, piece = key.rsplit(".", 1)
                rows = grads[key].reshape(grads[key].shape[0], -1)
                total = total + CountSketch(rows.shape[1], k, 7, f"{block}/{module}/{piece}")(rows)
            return total

        assert stats[block].projected_dim == k
        assert_matches_sketched_reference(
            stats[block], sketched_reference(train_grads[block], val_grads[block], block, k, 7)
        )
        expected = statistics_from_pieces(
            [sketch(train_grads[block])], [sketch(val_grads[block])], stats[block].dim
        )
        assert not plain[block].exact_mean and plain[block].projected_dim == k
        torch.testing.assert_close(plain[block].K_tt, expected.K_tt, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(plain[block].K_gt, expected.K_gt, rtol=1e-9, atol=1e-12)


def test_count_sketch_preserves_inner_products_on_average():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3000, generator=generator, dtype=torch.float64)
    exact = x @ x.T
    estimates = []
    for seed in range(40):
        s = CountSketch(3000, 256, seed, "piece")(x)
        estimates.append(s @ s.T)
    mean = torch.stack(estimates).mean(0)
    # 40 sketches of width 256: the mean's standard error is about sqrt(2/(40*256)) ~ 1.4% of the scale.
    assert float((mean - exact).abs().max()) < 0.08 * float(exact.diagonal().mean())


@pytest.mark.parametrize("projection_dim", ["auto", 64], ids=["exact", "sketched-exact-mean"])
def test_fake_two_rank_reduce_equals_single_process(projection_dim):
    """Exact rows, and sketched rows with the exact mean validation gradient (gathered between the
    validation and the training chunks): both ranks get the single process's statistics."""
    model = adapted()
    train = padded_batch(6, seed=1)
    val = padded_batch(4, seed=2)
    options = {"chunk_size": 2, "projection_dim": projection_dim, "projection_seed": 5}
    single = capture_statistics(model, [train], [val], **options)
    assert all(s.exact_mean == (projection_dim == 64) for s in single.values())

    def shard(batch, rank):
        return {k: v[rank::2] for k, v in batch.items()}

    barrier = threading.Barrier(2)
    slots: list[torch.Tensor | None] = [None, None]
    results: list[dict | None] = [None, None]
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        def reduce_fn(tensor):
            slots[rank] = tensor
            barrier.wait()
            gathered = [slots[0], slots[1]]
            barrier.wait()
            return gathered

        try:
            replica = copy.deepcopy(model)
            results[rank] = capture_statistics(
                replica, [shard(train, rank)], [shard(val, rank)], reduce_fn=reduce_fn, **options
            )
        except BaseException as exc:  # pragma: no cover - surfaced below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    # Rank order permutes the samples: [0, 2, 4 | 1, 3, 5]; Grams are compared after undoing it.
    order = torch.tensor([0, 2, 4, 1, 3, 5])
    val_order = torch.tensor([0, 2, 1, 3])
    for rank_result in results:
        for block, stats in single.items():
            mine = rank_result[block]
            torch.testing.assert_close(mine.K_tt, stats.K_tt[order][:, order], rtol=1e-6, atol=1e-12)
            torch.testing.assert_close(mine.K_vt, stats.K_vt[val_order][:, order], rtol=1e-6, atol=1e-12)
            torch.testing.assert_close(mine.val_mean_grad_sq, stats.val_mean_grad_sq, rtol=1e-6, atol=1e-12)
            torch.testing.assert_close(mine.K_gt, stats.K_gt[order], rtol=1e-6, atol=1e-12)
            torch.testing.assert_close(mine.K_vv, stats.K_vv[val_order][:, val_order], rtol=1e-6, atol=1e-12)
            assert mine.exact_mean == stats.exact_mean
    for block in single:
        assert torch.equal(results[0][block].K_tt, results[1][block].K_tt)


def test_scoring_restores_the_model_and_works_under_inference_mode():
    model = adapted()
    model.train()
    model.model.layers[0].eval()
    frozen_lora = model.model.layers[1].self_attn.q_proj.lora_A
    frozen_lora.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    with torch.inference_mode():
        train = padded_batch(4, seed=1)
        val = padded_batch(2, seed=2)
        stats = capture_statistics(model, [train], [val])
    reference = capture_statistics(model, [padded_batch(4, seed=1)], [padded_batch(2, seed=2)])
    torch.testing.assert_close(stats[1].K_tt, reference[1].K_tt, rtol=1e-12, atol=0)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())
    assert all(getattr(m, "capture_hook", None) is None for m in model.modules())
    # The frozen lora_A still gets scored: its coordinates are part of the block's statistics.
    assert stats[1].dim == stats[0].dim


def test_causal_lm_loss_ignores_padding_and_matches_the_model_loss():
    model = tiny_llama(num_blocks=2).double()
    batch = padded_batch(4, 8, seed=5)
    losses = causal_lm_per_sample_loss(model, batch)
    for i in range(4):
        keep = batch["attention_mask"][i].bool()
        ids = batch["input_ids"][i][keep][None]
        expected = model(input_ids=ids, labels=ids).loss
        # HF computes its loss in float32 even for a float64 model.
        torch.testing.assert_close(losses[i].float(), expected, rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    model = adapted()
    batch = padded_batch(2)
    with pytest.raises(ValueError, match="scope"):
        capture_statistics(model, [batch], [batch], scope="weights")
    with pytest.raises(ValueError, match="chunk_size"):
        capture_statistics(model, [batch], [batch], chunk_size=0)
    with pytest.raises(ValueError, match="projection_dim"):
        capture_statistics(model, [batch], [batch], projection_dim=0)
    with pytest.raises(ValueError, match="modules"):
        capture_statistics(model, [batch], [batch], modules=["nothing_like_this"])
    with pytest.raises(ValueError, match="per-sample losses"):
        capture_statistics(
            model, [batch], [batch], loss_fn=lambda m, b: causal_lm_per_sample_loss(m, b).mean()
        )
    with pytest.raises(ScoringError, match="NaN"):
        capture_statistics(
            model, [batch], [batch], loss_fn=lambda m, b: causal_lm_per_sample_loss(m, b) * float("nan")
        )
    with pytest.raises(ValueError, match="empty"):
        capture_statistics(model, [], [batch])
