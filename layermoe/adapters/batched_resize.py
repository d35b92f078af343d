"""Resize planning for many layers at once: layers with the same shapes and the same resize are stacked,
and every step of `surgery.py` (grow rank, remove experts, shrink rank, add experts) runs as tensor ops
on the stack: one QR/SVD call per group and step instead of one per layer.

Why: a SmolLM2-wide rewire resizes ~200 small layers; per layer, the plan is tens of tiny torch calls,
so the whole rewire cost ~90k calls of a few microseconds each. Stacked, it costs a few hundred.

The result is the per-layer plan (`resize.plan_resize`) exactly, tensor for tensor: every step mirrors
its per-layer twin operation for operation with a leading layer axis (the per-layer expert merge runs
as a batch of one for that reason), data-dependent choices (which expert to split, drop, merge into)
are made per layer with the same arithmetic, and random draws come from each layer's own generator,
drawn in the same order. tests/test_adapter_batched_resize.py checks the equality.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from layermoe.layout import effective_top_k

from .layer import MoELoRALinear, lora_init_A
from .surgery import SPLIT_SKEW, LayerState, ParamMap, _factor_energy, split_noise_scale, truncate_factors


@dataclass
class _Maps:
    """ParamMaps of a stack: new slice i of layer l = old slice index[l, i] * scale[l, i] along dim."""

    dim: int
    index: torch.Tensor
    scale: torch.Tensor

    def then(self, other: _Maps | None) -> _Maps | None:
        if other is None:
            return None
        valid = other.index >= 0
        safe = other.index.clamp(min=0)
        index = torch.where(valid, self.index.gather(1, safe), torch.full_like(other.index, -1))
        scale = torch.where(valid, self.scale.gather(1, safe) * other.scale, torch.ones_like(other.scale))
        return _Maps(other.dim, index, scale)


@dataclass
class _Stack:
    """L layers' float32 adapter tensors with a leading layer axis, as `LayerState` holds one layer's."""

    experts: int
    rank: int
    A: torch.Tensor  # (L, E*r, d_in)
    B: torch.Tensor  # (L, d_out, E*r)
    router_weight: torch.Tensor | None  # (L, E, d_in)
    router_bias: torch.Tensor | None  # (L, E)
    mass: torch.Tensor  # (L, E)
    maps: dict[str, _Maps | None]
    changed: set[str]
    generators: list[torch.Generator]

    @property
    def size(self) -> int:
        return int(self.A.shape[0])

    def blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, E, r, d_in) and (L, E, d_out, r) views, as surgery._expert_blocks per layer."""
        L, E, r = self.size, self.experts, self.rank
        A = self.A.reshape(L, E, r, -1)
        B = self.B.reshape(L, self.B.shape[1], E, r).permute(0, 2, 1, 3)
        return A, B

    def update(self, changed: dict[str, _Maps | None], **values: object) -> None:
        for name, step in changed.items():
            prev = self.maps.get(name)
            self.maps[name] = None if prev is None else prev.then(step)
        self.changed |= set(changed)
        if values.get("experts", self.experts) == 1:
            self.maps.pop("lora_router_weight", None)
            self.maps.pop("lora_router_bias", None)
            if self.router_weight is not None:
                self.changed |= {"lora_router_weight", "lora_router_bias"}
        for name, value in values.items():
            setattr(self, name, value)


def _join(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, E, r, d_in), (L, E, d_out, r) -> (L, E*r, d_in), (L, d_out, E*r)."""
    L, E, r, d_in = A.shape
    return A.reshape(L, E * r, d_in), B.permute(0, 2, 1, 3).reshape(L, B.shape[2], E * r)


def _identity(L: int, size: int, dim: int) -> _Maps:
    return _Maps(dim, torch.arange(size).expand(L, size).clone(), torch.ones(L, size))


def _slot_index(sources: torch.Tensor, rank: int, old_rank: int, kept: int) -> torch.Tensor:
    """(L, E'*rank) index: new expert j takes old expert sources[l, j]'s first `kept` slots (-1 fresh)."""
    L, E = sources.shape
    slots = torch.arange(rank)
    index = sources[:, :, None] * old_rank + slots
    index = torch.where((sources[:, :, None] >= 0) & (slots < kept), index, torch.full_like(index, -1))
    return index.reshape(L, E * rank)


def _revive(stack: _Stack, A: torch.Tensor, B: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """surgery._revive_dead_rows for every layer (in place on A); `rows` (L, E*r) limits it to slots."""
    dead = (A.abs().sum(-1) == 0) & (B.abs().sum(-2) == 0)
    if rows is not None:
        dead &= rows
    for layer in dead.any(dim=1).nonzero().flatten().tolist():
        d_in = A.shape[-1]
        if rows is None:
            mask = dead[layer]
            A[layer, mask] = _init(stack, layer, int(mask.sum()), d_in, A)
            continue
        # per changed expert slot, in slot order, as the per-layer merge revives them
        r = stack.rank
        for k in range(A.shape[1] // r):
            mask = dead[layer, k * r : (k + 1) * r]
            if mask.any():
                A[layer, k * r : (k + 1) * r][mask] = _init(stack, layer, int(mask.sum()), d_in, A)


def _init(stack: _Stack, layer: int, rows: int, d_in: int, like: torch.Tensor) -> torch.Tensor:
    return lora_init_A(rows, d_in, device=like.device, dtype=like.dtype, generator=stack.generators[layer])


def _grow(stack: _Stack, new_rank: int) -> None:
    L, E, r = stack.size, stack.experts, stack.rank
    A, B = stack.blocks()
    extra = new_rank - r
    new_rows = torch.stack(
        [_init(stack, layer, E * extra, A.shape[-1], A).reshape(E, extra, -1) for layer in range(L)]
    )
    A = torch.cat([A, new_rows], dim=2)
    ratio = new_rank / r
    B = torch.cat([B * ratio, B.new_zeros(L, E, B.shape[2], extra)], dim=3)
    A, B = _join(A, B)
    index = _slot_index(torch.arange(E).expand(L, E), new_rank, r, r)
    scale_B = torch.where(index >= 0, torch.full(index.shape, ratio), torch.ones(index.shape))
    maps = {"lora_A": _Maps(0, index, torch.ones(index.shape)), "lora_B": _Maps(1, index, scale_B)}
    stack.update(maps, rank=new_rank, A=A, B=B)


def _shrink(stack: _Stack, new_rank: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    L, E, r = stack.size, stack.experts, stack.rank
    A, B = stack.blocks()
    old_scaling, new_scaling = alpha / r, alpha / new_rank
    flat_B = (B * (old_scaling / new_scaling)).reshape(L * E, B.shape[2], r)
    new_B, new_A, discarded = truncate_factors(flat_B, A.reshape(L * E, r, -1), new_rank)
    total = _factor_energy(B.reshape(L * E, B.shape[2], r), A.reshape(L * E, r, -1)).view(L, E).sum(-1)
    A2, B2 = _join(new_A.view(L, E, new_rank, -1), new_B.view(L, E, -1, new_rank))
    _revive(stack, A2, B2)
    discarded = discarded.view(L, E)
    share = (discarded * new_scaling**2).sum(-1) / (total * old_scaling**2)
    share = torch.where(total > 0, share, torch.zeros_like(share))
    norm = (discarded.sqrt() * new_scaling).max(-1).values
    stack.update({"lora_A": None, "lora_B": None}, rank=new_rank, A=A2, B=B2)
    return share.double(), norm.double()


def _remove(stack: _Stack, new_experts: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """surgery._remove on every layer at once: one merge per layer per step, chosen per layer."""
    L, E, r = stack.size, stack.experts, stack.rank
    lanes = torch.arange(L)
    A, B = stack.blocks()
    A, B = A.clone(), B.clone()
    energy = _factor_energy(B, A).double()  # (L, E)
    mass = stack.mass.double()
    bias = stack.router_bias.clone()
    weight = stack.router_weight
    unit = weight / weight.norm(dim=2, keepdim=True).clamp(min=1e-12)
    alive = torch.ones(L, E, dtype=torch.bool)
    changed = torch.zeros(L, E, dtype=torch.bool)
    discarded_total = torch.zeros(L, dtype=torch.float64)
    energy_total = torch.zeros(L, dtype=torch.float64)
    norm = torch.zeros(L, dtype=torch.float64)
    exact = torch.ones(L, dtype=torch.bool)
    positions = torch.arange(E)
    for _ in range(E - new_experts):
        importance = torch.where(alive, mass * energy.sqrt(), torch.full_like(mass, math.inf))
        lowest = importance.min(dim=1, keepdim=True).values
        # lowest importance; among ties the later expert goes (keeps the original of a split pair)
        e = torch.where(alive & (importance == lowest), positions, -1).max(dim=1).values
        others = alive & (positions != e[:, None])
        same = others & (weight == weight[lanes, e][:, None, :]).all(dim=-1)
        has_same = same.any(dim=1)
        first_same = torch.where(same, positions, E).min(dim=1).values
        similarity = (unit * unit[lanes, e][:, None, :]).sum(-1)
        nearest = torch.where(others, similarity, torch.full_like(similarity, -math.inf)).argmax(dim=1)
        s = torch.where(has_same, first_same, nearest)
        pair = torch.stack([bias[lanes, s], bias[lanes, e]], dim=1)
        m_s, m_e = mass[lanes, s].clamp(min=1e-12), mass[lanes, e].clamp(min=1e-12)
        w_mass = torch.stack([m_s / (m_s + m_e), m_e / (m_s + m_e)], dim=1)
        w = torch.where(has_same[:, None], torch.softmax(pair, dim=1).double(), w_mass).to(A.dtype)
        # math.log, as the per-layer merge computes it, so both round the same way
        shift = [math.log((a + b) / a) for a, b in zip(m_s.tolist(), m_e.tolist(), strict=True)]
        raised = bias[lanes, s] + torch.tensor(shift, dtype=torch.float64).to(bias.dtype)
        bias[lanes, s] = torch.where(has_same, torch.logsumexp(pair, dim=1), raised)
        exact &= has_same
        B_cat = torch.cat([B[lanes, s] * w[:, :1, None], B[lanes, e] * w[:, 1:, None]], dim=-1)
        A_cat = torch.cat([A[lanes, s], A[lanes, e]], dim=1)
        new_B, new_A, discarded = truncate_factors(B_cat, A_cat, r)
        B[lanes, s], A[lanes, s] = new_B, new_A
        merged = _factor_energy(B_cat, A_cat).double()
        discarded = discarded.double()
        energy[lanes, s] = (merged - discarded).clamp(min=0.0)
        mass[lanes, s] += mass[lanes, e]
        discarded_total += discarded
        energy_total += merged
        norm += discarded.sqrt() * alpha / r
        exact &= ~((merged > 0) & (discarded > 1e-10 * merged))
        changed[lanes, s] = True
        alive[lanes, e] = False
    keep = alive.nonzero()[:, 1].view(L, new_experts)
    A2, B2 = _join(A[lanes[:, None], keep], B[lanes[:, None], keep])
    kept_changed = changed.gather(1, keep)
    _revive(stack, A2, B2, kept_changed.repeat_interleave(r, dim=1))
    index = _slot_index(torch.where(kept_changed, -1, keep), r, r, r)
    ones = torch.ones(index.shape)
    maps: dict[str, _Maps | None] = {"lora_A": _Maps(0, index, ones), "lora_B": _Maps(1, index, ones)}
    router_w = router_b = None
    if new_experts > 1:
        router_w, router_b = (
            weight.gather(1, keep[:, :, None].expand(-1, -1, weight.shape[2])),
            bias.gather(1, keep),
        )
        maps["lora_router_weight"] = _Maps(0, keep, torch.ones(keep.shape))
        maps["lora_router_bias"] = _Maps(0, keep, torch.ones(keep.shape))
    new_mass = mass.gather(1, keep).to(torch.float32)
    stack.update(
        maps, experts=new_experts, A=A2, B=B2, router_weight=router_w, router_bias=router_b, mass=new_mass
    )
    share = torch.where(energy_total > 0, discarded_total / energy_total, torch.zeros_like(energy_total))
    return share, norm, exact


def _add(stack: _Stack, new_experts: int) -> None:
    L, E, r = stack.size, stack.experts, stack.rank
    lanes = torch.arange(L)
    copies = torch.ones(L, E)
    for _ in range(new_experts - E):
        copies[lanes, torch.argmax(stack.mass.cpu() / copies, dim=1)] += 1
    counts = copies.long().tolist()
    sources = [list(range(E)) + [e for e in range(E) for _ in range(c[e] - 1)] for c in counts]
    src = torch.tensor(sources, dtype=torch.long)
    A, B = stack.blocks()
    new_A, new_B = A[lanes[:, None], src], B[lanes[:, None], src]
    share = torch.ones(L, new_experts, dtype=torch.float64)  # each slot's part of its source's gate
    scale = split_noise_scale(A)
    for layer, layer_sources in enumerate(sources):
        for e in range(E):
            members = [j for j, s in enumerate(layer_sources) if s == e]
            if len(members) < 2:
                continue
            parts = (1 + SPLIT_SKEW * torch.linspace(1, -1, len(members), dtype=torch.float64)) / len(members)
            share[layer, members] = parts
            noise = torch.randn(
                len(members),
                r,
                A.shape[-1],
                device=A.device,
                dtype=A.dtype,
                generator=stack.generators[layer],
            )
            weights = parts.to(device=A.device, dtype=A.dtype).view(-1, 1, 1)
            new_A[layer, members] += scale[layer, e] * (noise - (weights * noise).sum(dim=0, keepdim=True))
    log_share = share.log().to(device=A.device, dtype=A.dtype)
    ones = torch.ones(L, new_experts)
    if stack.router_weight is None:
        router_w = torch.zeros(L, new_experts, A.shape[-1], device=A.device, dtype=A.dtype)
        router_b = log_share
        router_maps: dict[str, _Maps | None] = {"lora_router_weight": None, "lora_router_bias": None}
    else:
        router_w = stack.router_weight[lanes[:, None], src]
        router_b = stack.router_bias.gather(1, src) + log_share.to(stack.router_bias.dtype)
        router_maps = {"lora_router_weight": _Maps(0, src, ones), "lora_router_bias": _Maps(0, src, ones)}
    mass = stack.mass.gather(1, src) / copies.to(stack.mass.device).gather(1, src)
    A2, B2 = _join(new_A, new_B)
    index = _slot_index(src, r, r, r)
    maps = {
        "lora_A": _Maps(0, index, torch.ones(index.shape)),
        "lora_B": _Maps(1, index, torch.ones(index.shape)),
    }
    maps.update(router_maps)
    stack.update(
        maps, experts=new_experts, A=A2, B=B2, router_weight=router_w, router_bias=router_b, mass=mass
    )


def _stack_of(
    layers: Sequence[MoELoRALinear],
    masses: Sequence[torch.Tensor | None],
    generators: list[torch.Generator],
) -> _Stack:
    """The float32 stack of the layers' adapters, as LayerState.of builds each layer's (same checks)."""
    first = layers[0]
    L, E, r = len(layers), first.experts, first.rank
    device = first.lora_A.device
    f32 = lambda name: torch.stack([getattr(layer, name).detach() for layer in layers]).to(torch.float32)  # noqa: E731
    mass = []
    for layer, given in zip(layers, masses, strict=True):
        value = layer.lora_routing_mass if given is None else torch.as_tensor(given)
        value = value.detach().to(device=device, dtype=torch.float32).reshape(-1)
        if value.numel() != E:
            raise ValueError(f"routing_mass has {value.numel()} entries but the layer has {E} experts")
        mass.append(value)
    stacked = torch.stack(mass)
    if not torch.isfinite(stacked).all() or (stacked < 0).any():
        raise ValueError("routing_mass must be finite and >= 0")
    total = stacked.sum(dim=1, keepdim=True)
    stacked = torch.where(total > 0, stacked / total, torch.full_like(stacked, 1.0 / E))
    maps: dict[str, _Maps | None] = {"lora_A": _identity(L, E * r, 0), "lora_B": _identity(L, E * r, 1)}
    if E > 1:
        maps["lora_router_weight"] = _identity(L, E, 0)
        maps["lora_router_bias"] = _identity(L, E, 0)
    router = E > 1
    return _Stack(
        E,
        r,
        f32("lora_A"),
        f32("lora_B"),
        f32("lora_router_weight") if router else None,
        f32("lora_router_bias") if router else None,
        stacked,
        maps,
        set(),
        generators,
    )


@dataclass
class GroupOutcome:
    """Per-layer results of a batched plan, in the order the layers were given."""

    states: list[LayerState]
    operations: list[str]
    exact: list[bool]
    discarded_energy: list[float]
    discarded_norm: list[float]


def plan_group(
    layers: Sequence[MoELoRALinear],
    masses: Sequence[torch.Tensor | None],
    generators: list[torch.Generator],
    experts: int,
    rank: int,
) -> GroupOutcome:
    """Plan the resize of layers of identical shape, (experts, rank), top_k and lora_alpha to one new
    (experts, rank), with optional routing masses and one generator per layer; the same results as
    resize.plan_resize on each layer."""
    layer = layers[0]
    alpha = layer.lora_alpha
    stack = _stack_of(layers, masses, generators)
    L = stack.size
    exact = torch.ones(L, dtype=torch.bool)
    kept = torch.ones(L, dtype=torch.float64)
    norm = torch.zeros(L, dtype=torch.float64)
    operations: list[str] = []
    if rank > stack.rank:
        operations.append(f"grow_rank {stack.rank}->{rank}")
        _grow(stack, rank)
    if experts < stack.experts:
        operations.append(f"remove_experts {stack.experts}->{experts}")
        dense = effective_top_k(layer.top_k, stack.experts) is None
        share, extra, merged_exact = _remove(stack, experts, alpha)
        exact &= merged_exact & dense
        kept *= 1.0 - share
        norm += extra
    if rank < stack.rank:
        operations.append(f"shrink_rank {stack.rank}->{rank}")
        share, extra = _shrink(stack, rank, alpha)
        exact &= share <= 1e-10
        kept *= 1.0 - share
        norm += extra
    if experts > stack.experts:
        operations.append(f"add_experts {stack.experts}->{experts}")
        _add(stack, experts)
        exact &= effective_top_k(layer.top_k, experts) is None
    _check(stack, layer.in_features, layer.out_features)
    return GroupOutcome(
        _unstack(stack),
        operations,
        exact.tolist(),
        (1.0 - kept).clamp(min=0.0).tolist(),
        norm.tolist(),
    )


def _check(stack: _Stack, d_in: int, d_out: int) -> None:
    """LayerState.check for the whole stack (one finiteness reduction per tensor)."""
    E, r, L = stack.experts, stack.rank, stack.size
    if stack.A.shape != (L, E * r, d_in) or stack.B.shape != (L, d_out, E * r):
        raise RuntimeError(f"resize produced lora_A/lora_B of the wrong shape for {E}x{r}")
    if (stack.router_weight is None) != (E == 1) or stack.mass.shape != (L, E):
        raise RuntimeError(f"resize produced a router or routing mass inconsistent with {E} experts")
    for name in ("A", "B", "router_weight", "router_bias"):
        tensor = getattr(stack, name)
        if tensor is not None and not bool(
            torch.isfinite(tensor.sum(dim=tuple(range(1, tensor.ndim)))).all()
        ):
            raise RuntimeError(f"resize produced non-finite values in {name}; the layers are unchanged")


def _unstack(stack: _Stack) -> list[LayerState]:
    out = []
    for l in range(stack.size):  # noqa: E741
        maps = {
            name: None if m is None else ParamMap(m.dim, m.index[l], m.scale[l])
            for name, m in stack.maps.items()
        }
        out.append(
            LayerState(
                stack.experts,
                stack.rank,
                stack.A[l].clone(),
                stack.B[l].clone(),
                None if stack.router_weight is None else stack.router_weight[l].clone(),
                None if stack.router_bias is None else stack.router_bias[l].clone(),
                stack.mass[l].clone(),
                maps,
                set(stack.changed),
                stack.generators[l],
            )
        )
    return out
