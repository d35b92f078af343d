"""MoELoRAConfig: validation errors name the field, plain-data round trips, per-block helpers."""

from __future__ import annotations

import json

import pytest
import torch

from layermoe.adapters import DEFAULT_TARGET_MODULES, MoELoRAConfig, MoELoRALinear


def test_defaults_cover_all_families():
    config = MoELoRAConfig()
    assert config.target_modules == list(DEFAULT_TARGET_MODULES)
    for name in (
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.down_proj",
        "transformer.h.1.attn.c_attn",
        "transformer.h.1.mlp.c_fc",
        "encoder.layer.0.attention.self.value",
        "encoder.layer.0.intermediate.dense",
    ):
        assert config.matches(name), name
    assert not config.matches("lm_head") and not config.matches("model.layers.0.self_attn.q_proj_extra")


def test_regex_targets_use_fullmatch():
    config = MoELoRAConfig(target_modules=r".*layers\.[01]\..*q_proj")
    assert config.matches("model.layers.1.self_attn.q_proj")
    assert not config.matches("model.layers.2.self_attn.q_proj")


def test_per_block_helpers():
    config = MoELoRAConfig(experts={0: 1, "1": 4}, rank=8, top_k=2)
    assert config.experts_for(1) == 4 and config.rank_for(1) == 8
    assert config.top_k_for(0) is None and config.top_k_for(1) == 2
    with pytest.raises(KeyError, match="experts has no entry for block 3"):
        config.experts_for(3)


def test_round_trip_through_json_and_weights_only_torch(tmp_path):
    config = MoELoRAConfig(
        target_modules=["q_proj", "v_proj"],
        experts={0: 2, 1: 3},
        rank={0: 4, 1: 8},
        top_k=1,
        lora_dropout=0.1,
    )
    data = config.to_dict()
    assert MoELoRAConfig.from_dict(data) == config
    assert MoELoRAConfig.from_dict(json.loads(json.dumps(data))) == config  # string block keys
    path = tmp_path / "c.pt"
    torch.save({"config": data}, path)
    assert MoELoRAConfig.from_dict(torch.load(path, weights_only=True)["config"]) == config


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"experts": -1}, "experts"),
        ({"experts": True}, "experts"),
        ({"rank": {0: 0}}, r"rank\[0\]"),
        ({"rank": {"a": 2}}, "rank has key"),
        ({"rank": {}}, "rank is an empty mapping"),
        ({"experts": 2.5}, "experts"),
        ({"top_k": 0}, "top_k"),
        ({"lora_alpha": -1}, "lora_alpha"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"router_aux_loss_coef": -0.1}, "router_aux_loss_coef"),
        ({"router_z_loss_coef": "x"}, "router_z_loss_coef"),
        ({"routing_mass_decay": 1.0}, "routing_mass_decay"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": "(unclosed"}, "target_modules is not a valid regex"),
        ({"target_modules": [".q_proj"]}, "target_modules"),
        ({"target_modules": 3}, "target_modules"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"MoELoRAConfig.{field}"):
        MoELoRAConfig(**kwargs)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown fields \\['expert'\\]"):
        MoELoRAConfig.from_dict({"expert": 3})


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"experts": -1}, "experts"),
        ({"rank": 2.5}, "rank"),
        ({"top_k": 0}, "top_k"),
        ({"lora_alpha": -1}, "lora_alpha"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"router_aux_loss_coef": -0.1}, "router_aux_loss_coef"),
        ({"router_z_loss_coef": "x"}, "router_z_loss_coef"),
        ({"router_init_std": -1.0}, "router_init_std"),
        ({"routing_mass_decay": 1.0}, "routing_mass_decay"),
    ],
)
def test_layer_built_directly_rejects_what_the_config_rejects(kwargs, field):
    """One check serves both: a bad value reaching MoELoRALinear without a config names the layer's field."""
    with pytest.raises(ValueError, match=f"MoELoRAConfig.{field}"):
        MoELoRAConfig(**kwargs)
    with pytest.raises(ValueError, match=f"MoELoRALinear.{field}"):
        MoELoRALinear(torch.nn.Linear(4, 4), **kwargs)
