"""``keep_scaling`` in rewire mode: rank moves keep each block's configured ``lora_alpha / rank`` (its step
size under Adam) or, by default, keep the alpha and rescale B. The reference is the adapter config the
module was built with, read independently of the callback."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from layermoe.adapters import layout, named_moe_layers
from layermoe.callbacks import CallbackConfigError
from tests.fixtures import atomic_checkpoint_trainer, cpu_trainer, quiet_influence
from tests.scripts.callback_fixtures import TinyLlamaModule, loaders

ALPHA, RANK = 8.0, 4


@pytest.mark.parametrize("keep_scaling", [False, True])
def test_rank_moves_keep_the_configured_scaling_only_when_asked(keep_scaling: bool) -> None:
    seed_everything(0)
    module = TinyLlamaModule(experts=2, rank=RANK)
    assert {layer.lora_alpha for layer in named_moe_layers(module).values()} == {ALPHA}
    cb = quiet_influence(
        "test_fixed_scores",
        scorer_options={"scores": {0: 1.0, 1: 5.0, 2: 1.0}},
        # experts fixed, ranks free: the rewire moves rank only
        allocator_options={"rank_policy": "scores", "experts_bounds": [2, 2], "error_shrinkage": 0},
        schedule={"warmup": 1},
        keep_scaling=keep_scaling,
    )
    train, val = loaders()
    cpu_trainer([cb], max_steps=3, limit_val_batches=2).fit(module, train, val)
    ranks = {block: shape["rank"] for block, shape in layout(module).items()}
    assert ranks[1] > RANK and min(ranks.values()) < RANK, ranks  # the planted block gained rank
    for name, layer in named_moe_layers(module).items():
        expected_alpha = ALPHA * layer.rank / RANK if keep_scaling else ALPHA
        assert layer.lora_alpha == pytest.approx(expected_alpha), name
        scaling = ALPHA / RANK if keep_scaling else ALPHA / layer.rank
        assert layer.scaling == pytest.approx(scaling), name
        assert torch.isfinite(layer.lora_B).all()


def _rank_mover(keep_scaling: bool):
    return quiet_influence(
        "test_fixed_scores",
        scorer_options={"scores": {0: 1.0, 1: 5.0, 2: 1.0}},
        allocator_options={"rank_policy": "scores", "experts_bounds": [2, 2], "error_shrinkage": 0},
        schedule={"warmup": 1, "every": 2, "max_rewires": 2},
        keep_scaling=keep_scaling,
    )


def test_a_changed_keep_scaling_on_resume_is_refused_naming_it(tmp_path) -> None:
    """Rank changes before the checkpoint set each layer's alpha by one rule; a resumed run that switched
    rule would scale its later rank changes by the other."""
    seed_everything(0)
    train, val = loaders()
    first = atomic_checkpoint_trainer(2, [_rank_mover(True), ModelCheckpoint(tmp_path, save_last=True)])
    first.fit(TinyLlamaModule(experts=2, rank=RANK), train, val)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]
    switched = atomic_checkpoint_trainer(
        4, [_rank_mover(False), ModelCheckpoint(tmp_path / "b", save_last=True)]
    )
    with pytest.raises(CallbackConfigError, match=r"keep_scaling=False: .*keep_scaling=True.*--ckpt_path"):
        switched.fit(TinyLlamaModule(experts=2, rank=RANK), train, val, ckpt_path=tmp_path / "last.ckpt")
    assert not (tmp_path / "b").exists()  # refused before any step
    same = _rank_mover(True)
    kept = atomic_checkpoint_trainer(4, [same, ModelCheckpoint(tmp_path / "c", save_last=True)])
    kept.fit(TinyLlamaModule(experts=2, rank=RANK), train, val, ckpt_path=tmp_path / "last.ckpt")
    assert same.state.rewires_done == 2 and same.state.keep_scaling is True
