"""`MoELoRAConfig`: what to wrap and with how much capacity, validated once and kept as plain data.

The config is the only description of an adapter that crosses into checkpoints and hyperparameters, so
it converts to and from a plain dict (`to_dict` / `from_dict`) and every bad value fails in
`__post_init__` with a message naming the field and the fix, before any model is touched.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from layermoe.layout import CAPACITY_MINIMUM, effective_top_k, is_int_at_least

# Attention and MLP projections of the supported families. Matched against the last component(s) of a
# module's name, so "dense" matches BERT's attention.output.dense, intermediate.dense and output.dense.
DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    # Llama / Qwen2 / Mistral
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    # GPT-2 (Conv1D layers)
    "c_attn",
    "c_proj",
    "c_fc",
    # BERT
    "query",
    "key",
    "value",
    "dense",
)


#: The per-layer settings `MoELoRAConfig` and `MoELoRALinear` share (everything but experts and rank).
LAYER_SETTINGS = (
    "top_k",
    "lora_alpha",
    "lora_dropout",
    "router_aux_loss_coef",
    "router_z_loss_coef",
    "router_init_std",
    "routing_mass_decay",
)


def check_layer_settings(
    owner: str,
    *,
    top_k: Any,
    lora_alpha: Any,
    lora_dropout: Any,
    router_aux_loss_coef: Any,
    router_z_loss_coef: Any,
    router_init_std: Any,
    routing_mass_decay: Any,
) -> dict[str, Any]:
    """The per-layer settings shared by `MoELoRAConfig` and `MoELoRALinear`, checked in this one place
    (errors name ``owner.field``); returns them with the numbers as floats."""
    if top_k is not None and not is_int_at_least(top_k):
        raise ValueError(f"{owner}.top_k must be None (dense routing) or an int >= 1, got {top_k!r}")
    out: dict[str, Any] = {"top_k": top_k}
    numbers = {
        "lora_alpha": lora_alpha,
        "router_aux_loss_coef": router_aux_loss_coef,
        "router_z_loss_coef": router_z_loss_coef,
        "router_init_std": router_init_std,
    }
    for name, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{owner}.{name} must be a number, got {value!r}")
        out[name] = float(value)
    if out["lora_alpha"] <= 0:
        raise ValueError(f"{owner}.lora_alpha must be > 0, got {out['lora_alpha']}")
    for name in ("router_aux_loss_coef", "router_z_loss_coef", "router_init_std"):
        if out[name] < 0:
            raise ValueError(f"{owner}.{name} must be >= 0 (0 disables it), got {out[name]}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)):
        raise ValueError(f"{owner}.lora_dropout must be a number in [0, 1), got {lora_dropout!r}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"{owner}.lora_dropout must be in [0, 1), got {float(lora_dropout)}")
    out["lora_dropout"] = float(lora_dropout)
    if not isinstance(routing_mass_decay, (int, float)) or not 0.0 <= routing_mass_decay < 1.0:
        raise ValueError(f"{owner}.routing_mass_decay must be in [0, 1), got {routing_mass_decay!r}")
    out["routing_mass_decay"] = float(routing_mass_decay)
    return out


def _check_capacity(name: str, value: Any) -> int | dict[int, int]:
    """Validate `experts` / `rank`: an int or a mapping block index -> int, >= 1 (experts: >= 0).

    0 experts is a block without adapter (its modules stay wrapped, forward = the frozen base); rank
    stays >= 1 so such a block knows its rank when experts come back.
    """
    low = CAPACITY_MINIMUM[name]
    if isinstance(value, bool):
        raise ValueError(f"MoELoRAConfig.{name} must be an int or a mapping block -> int, got a bool")
    if isinstance(value, int):
        if value < low:
            raise ValueError(
                f"MoELoRAConfig.{name} must be >= {low}, got {value}; use 1 for a plain LoRA block"
            )
        return value
    if isinstance(value, Mapping):
        if not value:
            raise ValueError(f"MoELoRAConfig.{name} is an empty mapping; give an int or one entry per block")
        out: dict[int, int] = {}
        for key, item in value.items():
            try:
                block = int(key)
            except (TypeError, ValueError):
                raise ValueError(
                    f"MoELoRAConfig.{name} has key {key!r}; keys must be block indices (ints or digit strings)"
                ) from None
            if block < 0:
                raise ValueError(f"MoELoRAConfig.{name} has negative block index {block}")
            if not is_int_at_least(item, low):
                raise ValueError(f"MoELoRAConfig.{name}[{block}] must be an int >= {low}, got {item!r}")
            out[block] = item
        return out
    raise ValueError(
        f"MoELoRAConfig.{name} must be an int or a mapping block -> int, got {type(value).__name__}"
    )


@dataclass
class MoELoRAConfig:
    """Configuration of the MoE-LoRA adapters injected by `layermoe.adapters.inject`.

    target_modules: module names (matched against the end of a module's dotted name, e.g. "q_proj" or
        "attention.output.dense") or one regex string matched with `re.fullmatch` against the full name.
        None means `DEFAULT_TARGET_MODULES` (all attention and MLP projections).
    experts / rank: an int for every block, or a mapping block index -> int covering every block;
        experts may be 0 for a block (no adapter there: its forward is the frozen base's).
    top_k: experts used per token; None (or >= experts of a block) means dense softmax routing.
    lora_alpha: scaling numerator; each expert's delta is (lora_alpha / rank) * B_e A_e.
    router_aux_loss_coef / router_z_loss_coef: weights of the Switch load-balancing loss and ST-MoE
        router z-loss that `collect_router_losses` returns.
    router_init_std: std of the router weight at init (0 = uniform gates at the start).
    routing_mass_decay: decay of the running average of gate probabilities kept per layer (the routing
        mass used to pick which expert to split or drop).
    modules_to_save: names of other modules (task heads such as BERT's "classifier") that stay fully
        trainable next to the adapters, matched like `target_modules` names (end of the dotted name);
        peft's option of the same name. They travel with checkpoints, adapter artifacts and peft exports.
    """

    target_modules: list[str] | str | None = None
    experts: int | dict[int, int] = 4
    rank: int | dict[int, int] = 8
    top_k: int | None = None
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001
    router_init_std: float = 0.0
    routing_mass_decay: float = 0.99
    modules_to_save: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.target_modules = self._check_targets(self.target_modules)
        self.experts = _check_capacity("experts", self.experts)
        self.rank = _check_capacity("rank", self.rank)
        for name, value in check_layer_settings("MoELoRAConfig", **self.layer_settings()).items():
            setattr(self, name, value)
        self.modules_to_save = self._check_modules_to_save(self.modules_to_save)
        if not isinstance(self.extra, dict):
            raise ValueError(
                f"MoELoRAConfig.extra must be a dict of plain data, got {type(self.extra).__name__}"
            )

    def layer_settings(self) -> dict[str, Any]:
        """The `MoELoRALinear` keyword arguments every layer of this config shares (all but experts/rank)."""
        return {name: getattr(self, name) for name in LAYER_SETTINGS}

    @staticmethod
    def _check_targets(value: Any) -> list[str] | str:
        if value is None:
            return list(DEFAULT_TARGET_MODULES)
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(
                    f"MoELoRAConfig.target_modules is not a valid regex ({err}): {value!r}"
                ) from None
            return value
        if isinstance(value, (list, tuple)):
            names = list(value)
            if not names:
                raise ValueError(
                    "MoELoRAConfig.target_modules is empty; give names, a regex, or None for the default"
                )
            for name in names:
                if not isinstance(name, str) or not name or name.startswith(".") or name.endswith("."):
                    raise ValueError(
                        f"MoELoRAConfig.target_modules entries must be non-empty module names like 'q_proj', got {name!r}"
                    )
            return names
        raise ValueError(
            f"MoELoRAConfig.target_modules must be a list of names, a regex string or None, got {type(value).__name__}"
        )

    @staticmethod
    def _check_modules_to_save(value: Any) -> list[str] | None:
        if value is None:
            return None
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ValueError(
                f"MoELoRAConfig.modules_to_save must be a list of module names like ['classifier'], got {value!r}"
            )
        names = list(value)
        for name in names:
            if not isinstance(name, str) or not name or name.startswith(".") or name.endswith("."):
                raise ValueError(
                    f"MoELoRAConfig.modules_to_save entries must be non-empty module names like 'classifier', got {name!r}"
                )
        return names or None

    def saves(self, module_name: str) -> bool:
        """Whether the module with this full dotted name is one of `modules_to_save`."""
        return any(module_name == t or module_name.endswith("." + t) for t in self.modules_to_save or ())

    def matches(self, module_name: str) -> bool:
        """Whether the module with this full dotted name is a target."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, module_name) is not None
        return any(module_name == t or module_name.endswith("." + t) for t in self.target_modules)

    def experts_for(self, block: int) -> int:
        """Number of experts of every module in `block`."""
        return self._capacity_for("experts", block)

    def rank_for(self, block: int) -> int:
        """LoRA rank of every expert in `block`."""
        return self._capacity_for("rank", block)

    def top_k_for(self, block: int) -> int | None:
        """Effective top-k of `block`: None when routing is dense (top_k unset or >= its experts)."""
        return effective_top_k(self.top_k, self.experts_for(block))

    def _capacity_for(self, name: str, block: int) -> int:
        value = getattr(self, name)
        if isinstance(value, int):
            return value
        if block not in value:
            raise KeyError(
                f"MoELoRAConfig.{name} has no entry for block {block} (has {sorted(value)}); "
                f"add it or give an int for all blocks"
            )
        return value[block]

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (lists, dicts with int keys, numbers, strings): safe for weights_only checkpoints."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if isinstance(out["target_modules"], list):
            out["target_modules"] = list(out["target_modules"])
        for name in ("experts", "rank"):
            if isinstance(out[name], dict):
                out[name] = {int(k): int(v) for k, v in out[name].items()}
        if out["modules_to_save"] is not None:
            out["modules_to_save"] = list(out["modules_to_save"])
        out["extra"] = dict(out["extra"])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MoELoRAConfig:
        """Inverse of `to_dict`; accepts string block keys (as JSON produces)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"MoELoRAConfig.from_dict needs a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"MoELoRAConfig.from_dict got unknown fields {unknown}; known fields: {sorted(known)}"
            )
        return cls(**dict(data))
