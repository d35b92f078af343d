"""The plain-data formats every part of layermoe shares, defined once (no torch, no other layermoe import).

- :data:`Layout` ``{block: {"experts": int, "rank": int}}`` and its one normalizer :func:`normalize_layout`
  (keys may arrive as strings from JSON/hparams/checkpoints);
- :data:`BlockDims` ``{block: [(d_in, d_out), ...]}`` and the parameter count of a layout
  (:func:`block_cost`, :func:`block_sizes`, :func:`layout_params`);
- the effective top-k rule (:func:`effective_top_k`) and the one positive-int check (:func:`is_int_at_least`);
- where a checkpoint keeps the layout (:data:`LAYOUT_KEY`) and which state-dict keys are adapter tensors
  (:func:`is_adapter_key`).

A leaf on purpose: ``allocation`` (pure math), ``adapters``, ``callbacks`` and ``checkpointing`` all import
it, so it imports nothing of theirs. Errors are ``ValueError`` unless the caller passes its own subclass
(``allocation`` passes ``AllocationError``), and always name the field.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

#: ``{block_index: {"experts": int, "rank": int}}``: every module of a block shares experts and rank.
Layout = dict[int, dict[str, int]]
#: ``{block_index: [(d_in, d_out), ...]}``: the shapes of the wrapped linear modules of each block.
BlockDims = Mapping[int, Sequence[tuple[int, int]]]

#: Where ``MoELoRAFineTuner.on_save_checkpoint`` stores the plain layout in a checkpoint.
LAYOUT_KEY = "layermoe_layout"

_LAYOUT_FIELDS = ("experts", "rank")
#: The lowest value of each layout field: 0 experts is a block without adapter (its modules stay wrapped,
#: forward = the frozen base); rank stays >= 1, the rank such a block gets back with experts.
CAPACITY_MINIMUM = {"experts": 0, "rank": 1}


def is_int_at_least(value: object, minimum: int = 1) -> bool:
    """True for an int (numpy ints included, bools not) that is ``>= minimum``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum


def effective_top_k(top_k: int | None, experts: int) -> int | None:
    """The top-k routing actually uses: None (dense softmax) when unset or when it keeps every expert."""
    return None if top_k is None or top_k >= experts else top_k


def is_adapter_key(name: str) -> bool:
    """Whether a (dotted) parameter or state-dict name is an MoE-LoRA adapter tensor (``...lora_*``)."""
    return name.rsplit(".", 1)[-1].startswith("lora_")


def block_key(key: object, field: str, error: type[ValueError] = ValueError) -> int:
    """A block index from an int or a digit string (JSON/hparams turn int keys into strings)."""
    if isinstance(key, numbers.Integral) and not isinstance(key, bool):
        return int(key)
    if isinstance(key, str) and key.strip().lstrip("-").isdigit():
        return int(key)
    raise error(f"{field}: block key {key!r} is not a block index; use ints like 0, 1, 2")


def _capacity(value: object, where: str, error: type[ValueError], minimum: int = 1) -> int:
    """experts/rank as an int >= minimum; integral floats and digit strings (hparams, YAML) are accepted."""
    if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
        raise error(f"{where} must be an int >= {minimum}, got {value!r}")
    try:
        number = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise error(f"{where} must be an int >= {minimum}, got {value!r}") from None
    if number < minimum:
        raise error(f"{where} must be >= {minimum}, got {number}")
    return number


def normalize_layout(
    data: Mapping[Any, Any], field: str = "layout", error: type[ValueError] = ValueError
) -> Layout:
    """Validated copy sorted by block, with int block keys (JSON makes them strings) and int experts/rank."""
    if not isinstance(data, Mapping):
        raise error(f"{field} must be a mapping block -> {{'experts', 'rank'}}, got {type(data).__name__}")
    out: Layout = {}
    for key, entry in data.items():
        block = block_key(key, field, error)
        if block < 0:
            raise error(f"{field} key {block} is negative; block indices start at 0")
        if not isinstance(entry, Mapping) or set(entry) != set(_LAYOUT_FIELDS):
            raise error(f"{field}[{block}] must be {{'experts': int, 'rank': int}}, got {entry!r}")
        if block in out:
            raise error(f"{field} has block {block} twice (as int and string keys)")
        out[block] = {
            name: _capacity(entry[name], f"{field}[{block}][{name!r}]", error, CAPACITY_MINIMUM[name])
            for name in _LAYOUT_FIELDS
        }
    return dict(sorted(out.items()))


def block_cost(experts: int, rank: int, s: int, r: int) -> int:
    """Params of one block: ``s = sum(d_in + d_out)``, ``r = sum(d_in + 1)`` over its modules.

    One expert of rank r costs ``r * (d_in + d_out)`` per module (its A and B); the router costs
    ``(d_in + 1) * experts`` per module (weight and bias), present only when experts > 1.
    """
    return int(experts) * int(rank) * int(s) + (int(experts) * int(r) if experts > 1 else 0)


def block_sizes(
    block_dims: BlockDims, blocks: Sequence[int], error: type[ValueError] = ValueError
) -> list[tuple[int, int]]:
    """Per block of ``blocks``: ``(S, R)`` with ``S = sum(d_in + d_out)`` (params per unit of rank per
    expert) and ``R = sum(d_in + 1)`` (router params per expert when a block has more than one expert)."""
    if not isinstance(block_dims, Mapping):
        raise error("block_dims must be a mapping {block: [(d_in, d_out), ...]}")
    given = {block_key(k, "block_dims", error): v for k, v in block_dims.items()}
    missing = [b for b in blocks if b not in given]
    if missing:
        raise error(f"block_dims: no module shapes for block(s) {missing}; pass every block")
    sizes = []
    for b in blocks:
        mods = given[b]
        if not isinstance(mods, Sequence) or len(mods) == 0:
            raise error(f"block_dims[{b}]: give a non-empty list of (d_in, d_out) pairs")
        s = r = 0
        for pair in mods:
            if not isinstance(pair, Sequence) or len(pair) != 2:
                raise error(f"block_dims[{b}]: {pair!r} is not a (d_in, d_out) pair")
            d_in, d_out = pair
            for name, d in (("d_in", d_in), ("d_out", d_out)):
                if not is_int_at_least(d):
                    raise error(f"block_dims[{b}]: {name} = {d!r} must be a positive int")
            s += int(d_in) + int(d_out)
            r += int(d_in) + 1
        sizes.append((s, r))
    return sizes


def layout_params(
    layout: Mapping[Any, Any], block_dims: BlockDims, error: type[ValueError] = ValueError
) -> int:
    """Trainable adapter parameters of ``layout`` (what a ``"current"`` budget resolves to)."""
    lay = normalize_layout(layout, "layout", error)
    sizes = block_sizes(block_dims, list(lay), error)
    return sum(
        block_cost(spec["experts"], spec["rank"], s, r)
        for spec, (s, r) in zip(lay.values(), sizes, strict=True)
    )
