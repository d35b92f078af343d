"""Gentle rank shrink (issue 22, part 4): the directions to drop are faded to zero over F steps, so the
removal step changes nothing (up to float rounding); reported apart from the expert moves; exact across
a resume in the middle of the fade. Also carries score errors and a control scorer through the fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import seed_everything
from torch import nn

from layermoe.adapters import (
    MoELoRALinear,
    layout,
    rotate_to_singular_basis,
    scale_trailing_slots,
    shrink_rank,
)
from layermoe.callbacks.report import console_table
from tests.fixtures import quiet_influence
from tests.scripts.callback_fixtures import TinyLlamaModule, fit_counting_task

FADE = 3
SCORES = {0: 4.0, 1: 0.5, 2: 4.0}  # reflected by `inverse` to 0.5, 4, 0.5


def _layer(seed: int = 0) -> MoELoRALinear:
    torch.manual_seed(seed)
    layer = MoELoRALinear(nn.Linear(16, 12), experts=2, rank=4, lora_alpha=8.0)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_router_weight.normal_()
    return layer


def test_rotation_is_exact_and_orders_directions_by_strength() -> None:
    layer = _layer()
    x = torch.randn(20, 16)
    with torch.no_grad():
        before = layer(x)
        rotate_to_singular_basis(layer)
        torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    B = layer.lora_B.detach().view(12, 2, 4)
    A = layer.lora_A.detach().view(2, 4, 16)
    for e in range(2):  # slot j's rank-1 term is the j-th singular component: norms descend
        strengths = [float(B[:, e, j].norm() * A[e, j].norm()) for j in range(4)]
        assert strengths == sorted(strengths, reverse=True)
        singular = torch.linalg.svdvals(B[:, e, :] @ A[e])[:4]
        torch.testing.assert_close(torch.tensor(strengths), singular, atol=1e-4, rtol=1e-4)


def test_faded_slots_are_removed_without_changing_the_output() -> None:
    layer = _layer(1)
    x = torch.randn(20, 16)
    rotate_to_singular_basis(layer)
    scale_trailing_slots(layer, 2, 0.0)
    with torch.no_grad():
        before = layer(x)
        report = shrink_rank(layer, 2)
        assert report.discarded_energy < 1e-10
        torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    cut = _layer(1)  # the same shrink without the fade discards energy
    assert shrink_rank(cut, 2).discarded_energy > 1e-3


def _fit(tmp_path: Path, run: str, fade: int, ckpt: Path | None = None):
    seed_everything(0)
    module = TinyLlamaModule(experts=2, rank=4, lr=1e-2)
    cb = quiet_influence(
        "inverse",  # a control around fixed scores: block 1 is reflected to the lowest score
        scorer_options={"scorer": "test_fixed_scores", "scorer_options": {"scores": SCORES}},
        allocator_options={"rank_policy": "scores"},
        schedule={"warmup": 2},
        rank_fade_steps=fade,
    )
    fit_counting_task(module, cb, tmp_path, run, ckpt)
    return module, cb


@pytest.mark.parametrize("fade", [0, FADE])
def test_rank_moves_in_a_fit_cut_or_faded(tmp_path: Path, fade: int) -> None:
    module, cb = _fit(tmp_path, "a", fade)
    (entry,) = cb.history
    moves = entry["rank_moves"]
    assert moves is not None and moves["blocks"] == [0, 2]  # the reflected scores lower blocks 0 and 2
    assert entry["score_errors"] == dict.fromkeys(SCORES, 0.0)  # fixed scores: no sampling noise
    assert layout(module) == entry["layout_after"]
    assert all(entry["layout_after"][b]["rank"] < 4 for b in (0, 2))
    assert moves["cut_disturbance"] is not None and abs(moves["cut_disturbance"]) > 1e-4
    if fade == 0:
        assert moves["removal_step"] == 2 and moves["disturbance"] == moves["cut_disturbance"]
        return
    assert moves["fade_steps"] == FADE and moves["removal_step"] == 2 + FADE
    # the removal step itself: nothing left to discard, the probe loss moves only by float rounding
    assert abs(moves["disturbance"]) < 1e-6, moves
    assert all(r.discarded_energy < 1e-9 for r in cb.last_reports if r.new_rank < r.old_rank)
    assert "change at removal" in console_table(entry)
    assert cb.state.fade is None

    resumed, resumed_cb = _fit(tmp_path, "b", fade, ckpt=tmp_path / "a" / "step=3.ckpt")  # mid-fade
    assert resumed_cb.history[0]["rank_moves"]["removal_step"] == 2 + FADE
    assert layout(resumed) == layout(module)
    expected = dict(module.named_parameters())
    for name, value in resumed.named_parameters():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6)
