"""Resize math on detached float32 copies of a layer's adapter tensors (`LayerState`).

Each operation returns a new state plus how each new parameter's entries come from the old ones
(`ParamMap`), so nothing touches a layer until `layermoe.adapters.resize` installs a finished plan.

- grow rank: new A rows get LoRA's A init, new B columns zero, old B columns scaled by r'/r (the scaling
  lora_alpha / rank shrinks): the delta is unchanged exactly.
- shrink rank: per expert, truncated SVD of B_e A_e from the factors (QR of A_e^T and B_e, r x r SVD),
  split sqrt(S) to each side so A and B stay balanced; the discarded energy is reported.
- add experts: split the expert with the largest routing mass per copy; copies share its router row
  with the bias shifted by log(share), shares slightly unequal (SPLIT_SKEW) and summing to 1, so dense
  softmax gates of the copies sum to the original gate while top-k never sees tied copies; their A rows
  get a perturbation with zero share-weighted sum (same B makes the sum exact) that breaks the symmetry.
- remove experts: drop the lowest routing mass x ||B_e A_e||_F, fold each into the survivor with the
  most similar router row (delta merged with gate/mass weights, truncated back to rank r, bias raised
  by the merged share): removing a just-split copy is exact.
- to 0 experts: the whole adapter goes (its full energy is the discarded part; exact only if B was 0);
  from 0 experts: fresh experts with LoRA's init (A kaiming, B zero, router zero), exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from .layer import MoELoRALinear, gate_expert_hidden, lora_init_A

PARAM_NAMES = ("lora_A", "lora_B", "lora_router_weight", "lora_router_bias")
SPLIT_PERTURBATION = 0.01  # zero-sum noise on the copies' A rows, relative to the RMS of the split expert's A
# Copies of a split expert share its gate in proportions (1 + SPLIT_SKEW * t) / copies, t evenly spread in
# [-1, 1]: their router logits then differ by a margin far above rounding, so top-k routing never meets an
# exact tie that two computations (the resize report, the forward) could break differently.
SPLIT_SKEW = 0.01


@dataclass
class ParamMap:
    """How a new parameter's entries come from the old parameter of the same name.

    Along `dim`, new slice i is old slice `index[i]` times `scale[i]` (index -1: fresh, no old state).
    Adam-style state maps the same way (second moments with scale**2).
    """

    dim: int
    index: torch.Tensor
    scale: torch.Tensor

    @staticmethod
    def identity(size: int, dim: int) -> ParamMap:
        return ParamMap(dim, torch.arange(size, dtype=torch.long), torch.ones(size))

    def then(self, other: ParamMap | None) -> ParamMap | None:
        """Compose: self maps old -> mid, other maps mid -> new."""
        if other is None:
            return None
        valid = other.index >= 0
        safe = other.index.clamp(min=0)
        index = torch.where(valid, self.index[safe], torch.full_like(other.index, -1))
        scale = torch.where(valid, self.scale[safe] * other.scale, torch.ones_like(other.scale))
        return ParamMap(other.dim, index, scale)


@dataclass
class LayerState:
    """Float32 copy of a layer's adapter tensors plus the maps from the layer's current parameters."""

    experts: int
    rank: int
    A: torch.Tensor
    B: torch.Tensor
    router_weight: torch.Tensor | None
    router_bias: torch.Tensor | None
    mass: torch.Tensor
    maps: dict[str, ParamMap | None]
    changed: set[str] = field(default_factory=set)
    #: source of this layer's random draws (new A rows, split noise): one per layer, seeded from the
    #: global RNG in layer order, so a layer gets the same draws whether planned alone or in a batch
    generator: torch.Generator | None = None

    @staticmethod
    def of(layer: MoELoRALinear, routing_mass: torch.Tensor | None = None) -> LayerState:
        E, r = layer.experts, layer.rank
        device = layer.adapter_placement()[0]
        mass = layer.lora_routing_mass if routing_mass is None else torch.as_tensor(routing_mass)
        mass = mass.detach().to(device=device, dtype=torch.float32).reshape(-1)
        if mass.numel() != E:
            raise ValueError(f"routing_mass has {mass.numel()} entries but the layer has {E} experts")
        if not torch.isfinite(mass).all() or (mass < 0).any():
            raise ValueError("routing_mass must be finite and >= 0")
        mass = mass / mass.sum() if mass.sum() > 0 else torch.full_like(mass, 1.0 / max(E, 1))
        f32 = lambda t: None if t is None else t.detach().to(torch.float32).clone()  # noqa: E731
        maps: dict[str, ParamMap | None] = {}
        if E > 0:
            maps["lora_A"] = ParamMap.identity(E * r, 0)
            maps["lora_B"] = ParamMap.identity(E * r, 1)
        if E > 1:
            maps["lora_router_weight"] = ParamMap.identity(E, 0)
            maps["lora_router_bias"] = ParamMap.identity(E, 0)
        # 0 experts: empty factors, so the math below needs no special case for reading them
        A = f32(layer.lora_A) if E > 0 else torch.zeros(0, layer.in_features, device=device)
        B = f32(layer.lora_B) if E > 0 else torch.zeros(layer.out_features, 0, device=device)
        return LayerState(
            E,
            r,
            A,
            B,
            f32(layer.lora_router_weight),
            f32(layer.lora_router_bias),
            mass,
            maps,
        )

    def update(self, changed: dict[str, ParamMap | None], **values: object) -> LayerState:
        """New state with `values` replaced and the maps of the `changed` parameters composed."""
        maps = dict(self.maps)
        for name, step in changed.items():
            prev = maps.get(name)
            maps[name] = None if prev is None else prev.then(step)
        names = self.changed | set(changed)
        if values.get("experts", self.experts) <= 1:
            maps.pop("lora_router_weight", None)
            maps.pop("lora_router_bias", None)
            if self.router_weight is not None:
                names |= {"lora_router_weight", "lora_router_bias"}
        return replace(self, maps=maps, changed=names, **values)

    def check(self, d_in: int, d_out: int) -> None:
        """Raise if the tensors do not form a valid layer of (experts, rank): run before installing."""
        E, r = self.experts, self.rank
        if self.A.shape != (E * r, d_in) or self.B.shape != (d_out, E * r):
            raise RuntimeError(
                f"resize produced lora_A {tuple(self.A.shape)} / lora_B {tuple(self.B.shape)} for {E}x{r}"
            )
        if (self.router_weight is None) != (E <= 1) or (self.router_bias is None) != (E <= 1):
            raise RuntimeError(f"resize produced a router inconsistent with {E} experts")
        if E > 1 and (self.router_weight.shape != (E, d_in) or self.router_bias.shape != (E,)):
            raise RuntimeError("resize produced router tensors of the wrong shape")
        if self.mass.shape != (E,):
            raise RuntimeError("resize produced a routing mass of the wrong shape")
        for name in ("A", "B", "router_weight", "router_bias"):
            tensor = getattr(self, name)
            # a sum is non-finite iff an entry is (overflow of finite entries aside): one cheap check
            if tensor is not None and not torch.isfinite(tensor.sum()):
                raise RuntimeError(f"resize produced non-finite values in {name}; the layer is unchanged")


def _row_index(experts: int, rank: int, sources: list[int], old_rank: int, kept: int) -> torch.Tensor:
    """Index of expert-block slices: new expert j takes old expert sources[j]'s first `kept` slots."""
    index = torch.full((experts * rank,), -1, dtype=torch.long)
    for j, src in enumerate(sources):
        if src < 0:
            continue
        index[j * rank : j * rank + kept] = torch.arange(src * old_rank, src * old_rank + kept)
    return index


def truncate_factors(
    B: torch.Tensor, A: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors of the batched products B @ A (batch, d_out, k) @ (batch, k, d_in).

    Never forms the dense product: QR of A^T and B, SVD of the small R_B R_A^T. Returns balanced factors
    (B' = Q_B U sqrt(S), A' = sqrt(S) V^T Q_A^T), padded with zero components when the product has
    lower rank, and the squared singular values beyond `rank` (discarded energy per batch item).
    """
    B32, A32 = B.to(torch.float32), A.to(torch.float32)
    q_a, r_a = torch.linalg.qr(A32.transpose(-1, -2))
    q_b, r_b = torch.linalg.qr(B32)
    u, s, vh = torch.linalg.svd(r_b @ r_a.transpose(-1, -2), full_matrices=False)
    keep = min(rank, s.shape[-1])
    root = s[..., :keep].sqrt()
    new_B = (q_b @ u[..., :keep]) * root.unsqueeze(-2)
    new_A = root.unsqueeze(-1) * (vh[..., :keep, :] @ q_a.transpose(-1, -2))
    if keep < rank:
        batch = B.shape[:-2]
        new_B = torch.cat([new_B, new_B.new_zeros(*batch, B.shape[-2], rank - keep)], dim=-1)
        new_A = torch.cat([new_A, new_A.new_zeros(*batch, rank - keep, A.shape[-1])], dim=-2)
    discarded = s[..., keep:].pow(2).sum(-1)
    return new_B, new_A, discarded


def layer_generator(device: torch.device) -> torch.Generator:
    """A generator for one layer's random draws, seeded by one draw from the global RNG."""
    seed = int(torch.randint(0, 2**62, (1,)))
    return torch.Generator(device=device).manual_seed(seed)


def _revive_dead_rows(
    A: torch.Tensor, B: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Give LoRA's A init to rank slots whose A row and B column are both zero (they could never learn).

    Exact: a zero B column multiplies whatever the A row holds.
    """
    dead = (A.abs().sum(1) == 0) & (B.abs().sum(0) == 0)
    if dead.any():
        A = A.clone()
        A[dead] = lora_init_A(
            int(dead.sum()), A.shape[1], device=A.device, dtype=A.dtype, generator=generator
        )
    return A


def _expert_blocks(state: LayerState) -> tuple[torch.Tensor, torch.Tensor]:
    E, r = state.experts, state.rank
    A = state.A.reshape(E, r, -1)
    B = state.B.reshape(state.B.shape[0], E, r).permute(1, 0, 2)
    return A, B


def _join_blocks(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    E, r, d_in = A.shape
    return A.reshape(E * r, d_in), B.permute(1, 0, 2).reshape(B.shape[1], E * r)


def _grow(state: LayerState, new_rank: int, alpha: float) -> tuple[LayerState, dict[str, float]]:
    """New rank slots: A from LoRA init, B zero; old B scaled by r'/r so scaling changes cancel. Exact."""
    E, r = state.experts, state.rank
    A, B = _expert_blocks(state)
    extra = new_rank - r
    new_rows = lora_init_A(
        E * extra, A.shape[-1], device=A.device, dtype=A.dtype, generator=state.generator
    ).reshape(E, extra, -1)
    A = torch.cat([A, new_rows], dim=1)
    ratio = new_rank / r
    B = torch.cat([B * ratio, B.new_zeros(E, B.shape[1], extra)], dim=2)
    A, B = _join_blocks(A, B)
    index = _row_index(E, new_rank, list(range(E)), r, r)
    scale_B = torch.where(index >= 0, torch.full((E * new_rank,), ratio), torch.ones(E * new_rank))
    maps = {"lora_A": ParamMap(0, index, torch.ones(E * new_rank)), "lora_B": ParamMap(1, index, scale_B)}
    return state.update(maps, rank=new_rank, A=A, B=B), {"discarded": 0.0, "norm": 0.0}


def _shrink(state: LayerState, new_rank: int, alpha: float) -> tuple[LayerState, dict[str, float]]:
    """Per-expert truncated SVD to `new_rank` from the factors, in float32; reports discarded energy."""
    E, r = state.experts, state.rank
    A, B = _expert_blocks(state)
    old_scaling, new_scaling = alpha / r, alpha / new_rank
    # scaling * B A must keep its best rank-r' part: rescale the product by old/new scaling.
    new_B, new_A, discarded = truncate_factors(B * (old_scaling / new_scaling), A, new_rank)
    total = _factor_energy(B, A).sum()
    A2, B2 = _join_blocks(new_A, new_B)
    A2 = _revive_dead_rows(A2, B2, state.generator)
    stats = {
        "discarded": float((discarded * new_scaling**2).sum() / (total * old_scaling**2))
        if total > 0
        else 0.0,
        "norm": float((discarded.sqrt() * new_scaling).max()) if E else 0.0,
    }
    return state.update({"lora_A": None, "lora_B": None}, rank=new_rank, A=A2, B=B2), stats


def _factor_energy(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """||B_e A_e||_F^2 per expert from the factors: sum((B^T B) * (A A^T))."""
    return ((B.transpose(-1, -2) @ B) * (A @ A.transpose(-1, -2))).sum(dim=(-1, -2)).clamp(min=0)


def split_noise_scale(A: torch.Tensor) -> torch.Tensor:
    """(..., E) scale of the copies' zero-sum noise: SPLIT_PERTURBATION x the RMS of each expert's A
    (..., E, r, d_in), or of LoRA's init scale 1/sqrt(d_in) where A is zero."""
    rms = A.pow(2).mean(dim=(-1, -2)).sqrt()
    rms = torch.where(rms == 0, torch.full_like(rms, 1.0 / math.sqrt(A.shape[-1])), rms)
    return SPLIT_PERTURBATION * rms


def _add(state: LayerState, new_experts: int, alpha: float) -> tuple[LayerState, dict[str, float]]:
    """Split the most-loaded experts into copies; dense routing output unchanged exactly."""
    E, r = state.experts, state.rank
    copies = torch.ones(E)
    for _ in range(new_experts - E):
        copies[int(torch.argmax(state.mass.cpu() / copies))] += 1
    sources = list(range(E)) + [e for e in range(E) for _ in range(int(copies[e]) - 1)]
    src = torch.tensor(sources, dtype=torch.long)
    A, B = _expert_blocks(state)
    new_A, new_B = A[src].clone(), B[src].clone()
    share = torch.ones(new_experts, dtype=torch.float64)  # each slot's part of its source's gate
    scale = split_noise_scale(A)
    for e in range(E):
        members = [j for j, s in enumerate(sources) if s == e]
        if len(members) < 2:
            continue
        parts = (1 + SPLIT_SKEW * torch.linspace(1, -1, len(members), dtype=torch.float64)) / len(members)
        share[members] = parts
        noise = torch.randn(
            len(members), r, A.shape[-1], device=A.device, dtype=A.dtype, generator=state.generator
        )
        # zero mean under the gate shares: sum_j share_j A_j = A_e, so dense routing is unchanged
        weights = parts.to(device=A.device, dtype=A.dtype).view(-1, 1, 1)
        new_A[members] += scale[e] * (noise - (weights * noise).sum(dim=0, keepdim=True))
    log_share = share.log().to(device=A.device, dtype=A.dtype)
    if state.router_weight is None:
        router_w = torch.zeros(new_experts, A.shape[-1], device=A.device, dtype=A.dtype)
        router_b = log_share
        router_maps: dict[str, ParamMap | None] = {"lora_router_weight": None, "lora_router_bias": None}
    else:
        router_w = state.router_weight[src].clone()
        router_b = state.router_bias[src] + log_share.to(state.router_bias.dtype)
        ones = torch.ones(new_experts)
        router_maps = {
            "lora_router_weight": ParamMap(0, src, ones),
            "lora_router_bias": ParamMap(0, src, ones),
        }
    mass = state.mass[src] / copies.to(state.mass.device)[src]
    A2, B2 = _join_blocks(new_A, new_B)
    index = _row_index(new_experts, r, sources, r, r)
    maps = {
        "lora_A": ParamMap(0, index, torch.ones(index.numel())),
        "lora_B": ParamMap(1, index, torch.ones(index.numel())),
    }
    maps.update(router_maps)
    new_state = state.update(
        maps, experts=new_experts, A=A2, B=B2, router_weight=router_w, router_bias=router_b, mass=mass
    )
    return new_state, {"discarded": 0.0, "norm": 0.0}


def _remove(state: LayerState, new_experts: int, alpha: float) -> tuple[LayerState, dict[str, float]]:
    """Drop the least important experts one at a time, each folded into its most similar survivor.

    One at a time so that a survivor's mass grows before the next choice: of a just-split pair only one
    copy goes (into the other), which undoes the split exactly. Works on per-expert factor lists and
    cached energies, so each removal costs one small QR/SVD.
    """
    r = state.rank
    A, B = _expert_blocks(state)
    As, Bs = list(A.unbind(0)), list(B.unbind(0))
    energy = _factor_energy(B, A).tolist()
    mass = state.mass.tolist()
    bias = state.router_bias.clone()
    weight = state.router_weight
    unit = weight / weight.norm(dim=1, keepdim=True).clamp(min=1e-12)
    ids = list(range(state.experts))  # original expert of each remaining slot
    changed: set[int] = set()
    discarded_total = energy_total = norm = 0.0
    exact = True
    while len(ids) > new_experts:
        importance = [mass[i] * math.sqrt(energy[i]) for i in ids]
        # lowest importance; among ties the later expert goes (keeps the original of a split pair)
        p = min(range(len(ids)), key=lambda k: (importance[k], -k))
        e = ids[p]
        others = [i for i in ids if i != e]
        same = [i for i in others if torch.equal(weight[i], weight[e])]
        # row-wise products, not a matvec: equal rows (split copies) get equal similarities, so the
        # first of them wins here and in the batched planner alike (a matvec may round rows apart)
        s = same[0] if same else others[int(torch.argmax((unit[others] * unit[e]).sum(-1)))]
        if same:
            # logits differ only by the bias: the two gates are in ratio exp(b_s) : exp(b_e), exactly
            pair = torch.stack([bias[s], bias[e]])
            w = torch.softmax(pair, dim=0).tolist()
            bias[s] = torch.logsumexp(pair, dim=0)
        else:
            m_s, m_e = max(mass[s], 1e-12), max(mass[e], 1e-12)
            w = [m_s / (m_s + m_e), m_e / (m_s + m_e)]
            bias[s] = bias[s] + math.log((m_s + m_e) / m_s)
            exact = False
        B_cat = torch.cat([Bs[s] * w[0], Bs[e] * w[1]], dim=-1)
        A_cat = torch.cat([As[s], As[e]], dim=0)
        # a batch of one: the same kernels as the batched planner (layermoe.adapters.batched_resize)
        new_B, new_A, discarded = truncate_factors(B_cat[None], A_cat[None], r)
        Bs[s], As[s], discarded = new_B[0], new_A[0], discarded[0]
        merged_energy = float(_factor_energy(B_cat[None], A_cat[None])[0])
        energy[s] = max(merged_energy - float(discarded), 0.0)
        mass[s] += mass[e]
        discarded_total += float(discarded)
        energy_total += merged_energy
        norm += math.sqrt(float(discarded)) * alpha / r
        if merged_energy > 0 and float(discarded) > 1e-10 * merged_energy:
            exact = False
        changed.add(s)
        ids.pop(p)
    n = len(ids)
    A2, B2 = _join_blocks(torch.stack([As[i] for i in ids]), torch.stack([Bs[i] for i in ids]))
    for k, i in enumerate(ids):
        if i in changed:
            A2[k * r : (k + 1) * r] = _revive_dead_rows(
                A2[k * r : (k + 1) * r], B2[:, k * r : (k + 1) * r], state.generator
            )
    keep = torch.tensor(ids, dtype=torch.long)
    index = _row_index(n, r, [-1 if i in changed else i for i in ids], r, r)
    ones = torch.ones(index.numel())
    maps: dict[str, ParamMap | None] = {
        "lora_A": ParamMap(0, index, ones),
        "lora_B": ParamMap(1, index, ones),
    }
    router_w = router_b = None
    if n > 1:
        router_w, router_b = weight[keep].clone(), bias[keep].clone()
        maps["lora_router_weight"] = ParamMap(0, keep, torch.ones(n))
        maps["lora_router_bias"] = ParamMap(0, keep, torch.ones(n))
    new_mass = torch.tensor([mass[i] for i in ids], dtype=torch.float32, device=state.mass.device)
    new_state = state.update(
        maps, experts=n, A=A2, B=B2, router_weight=router_w, router_bias=router_b, mass=new_mass
    )
    stats = {
        "discarded": discarded_total / energy_total if energy_total > 0 else 0.0,
        "norm": norm,
        "exact": float(exact),
    }
    return new_state, stats


def _to_empty(state: LayerState, alpha: float) -> tuple[LayerState, dict[str, float]]:
    """Remove every expert: the adapter's whole delta is the discarded part."""
    A, B = _expert_blocks(state)
    energy = _factor_energy(B, A)
    scaling = alpha / state.rank
    stats = {
        "discarded": 1.0 if float(energy.sum()) > 0 else 0.0,
        # gates sum to at most 1, so no token moves by more than the largest expert delta times ||x||
        "norm": float(energy.sqrt().max()) * scaling if state.experts else 0.0,
    }
    empty = {
        "A": state.A.new_zeros(0, state.A.shape[1]),
        "B": state.B.new_zeros(state.B.shape[0], 0),
        "router_weight": None,
        "router_bias": None,
        "mass": state.mass.new_zeros(0),
    }
    changed = dict.fromkeys(("lora_A", "lora_B"))
    return state.update(changed, experts=0, **empty), stats


def _from_empty(state: LayerState, experts: int, rank: int) -> LayerState:
    """Fresh experts for a layer that had none: LoRA's init (B zero), so the output is unchanged."""
    d_in, d_out = state.A.shape[1], state.B.shape[0]
    device = state.A.device
    A = lora_init_A(experts * rank, d_in, device=device, dtype=torch.float32, generator=state.generator)
    B = torch.zeros(d_out, experts * rank, device=device)
    router_w = router_b = None
    if experts > 1:
        router_w, router_b = torch.zeros(experts, d_in, device=device), torch.zeros(experts, device=device)
    mass = torch.full((experts,), 1.0 / experts, device=device)
    changed = dict.fromkeys(PARAM_NAMES)  # none of these existed: fresh optimizer state
    return state.update(
        changed, experts=experts, rank=rank, A=A, B=B, router_weight=router_w, router_bias=router_b, mass=mass
    )


def adapter_output(state: LayerState, x: torch.Tensor, top_k: int | None, alpha: float) -> torch.Tensor:
    """The adapter's contribution for input x under `state` (float32, no dropout), to measure changes;
    gated by the layer's own `gate_expert_hidden`."""
    x = x.to(torch.float32)
    logits = None if state.router_weight is None else x @ state.router_weight.T + state.router_bias
    hidden, _ = gate_expert_hidden(x @ state.A.T, logits, state.rank, alpha / state.rank, top_k)
    return hidden @ state.B.T
