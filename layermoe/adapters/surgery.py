"""Resize math on detached float32 copies of adapter tensors, for a stack of layers (`LayerStack`: layers
of the same shapes on a leading layer axis; one layer is a stack of one).

Each operation updates the stack and composes how each new parameter's entries come from the old ones
(`ParamMap`), so nothing touches a layer until `layermoe.adapters.resize` installs a finished plan.

- grow rank: new A rows get LoRA's A init, new B columns zero, old B columns scaled by r'/r (the scaling
  lora_alpha / rank shrinks): the delta is unchanged exactly. With ``keep_scaling`` the layer's
  lora_alpha moves with the rank instead (`rank_alpha`): the scaling, the old B and so the old
  directions' Adam steps stay what they were.
- shrink rank: per expert, truncated SVD of B_e A_e from the factors (QR of A_e^T and B_e, r x r SVD),
  split sqrt(S) to each side so A and B stay balanced; the discarded energy is reported. ``keep_scaling``
  as for growth.
- add experts: split the expert with the largest routing mass per copy; copies share its router row
  with the bias shifted by log(share), shares slightly unequal (SPLIT_SKEW) and summing to 1, so dense
  softmax gates of the copies sum to the original gate while top-k never sees tied copies; their A rows
  get a perturbation with zero share-weighted sum (same B makes the sum exact) that breaks the symmetry.
- remove experts: drop the lowest routing mass x ||B_e A_e||_F, fold each into the survivor with the
  most similar router row (delta merged with gate/mass weights, truncated back to rank r, bias raised
  by the merged share): removing a just-split copy is exact.
- to 0 experts: the whole adapter goes (its full energy is the discarded part; exact only if B was 0);
  from 0 experts: fresh experts with LoRA's init (A kaiming, B zero, router zero), exact.

Why a stack: a SmolLM2-wide rewire resizes ~200 small layers; one layer at a time, a plan is tens of
tiny torch calls (~90k calls of a few microseconds for the whole rewire), stacked a few hundred (one
QR/SVD per stack and step). A layer's result does not depend on the layers stacked with it: choices
(which expert to split, drop, merge into) are made per layer, and random draws come from each layer's
own generator (`layer_generator`); tests/test_adapter_batched_resize.py checks it bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .layer import MoELoRALinear, gate_expert_hidden, lora_init_A

PARAM_NAMES = ("lora_A", "lora_B", "lora_router_weight", "lora_router_bias")
ROUTER_NAMES = ("lora_router_weight", "lora_router_bias")
SPLIT_PERTURBATION = 0.01  # zero-sum noise on the copies' A rows, relative to the RMS of the split expert's A
# Copies of a split expert share its gate in proportions (1 + SPLIT_SKEW * t) / copies, t evenly spread in
# [-1, 1]: their router logits then differ by a margin far above rounding, so top-k routing never meets an
# exact tie that two computations (the resize report, the forward) could break differently.
SPLIT_SKEW = 0.01


@dataclass
class ParamMap:
    """How a new parameter's entries come from the old parameter of the same name.

    Along `dim`, new slice i is old slice `index[i]` times `scale[i]` (index -1: fresh, no old state).
    Adam-style state maps the same way (second moments with scale**2). Inside a `LayerStack`, index
    and scale carry the leading layer axis.
    """

    dim: int
    index: torch.Tensor
    scale: torch.Tensor

    def then(self, other: ParamMap | None) -> ParamMap | None:
        """Compose: self maps old -> mid, other maps mid -> new."""
        if other is None:
            return None
        valid = other.index >= 0
        safe = other.index.clamp(min=0)
        index = torch.where(valid, self.index.gather(-1, safe), torch.full_like(other.index, -1))
        scale = torch.where(valid, self.scale.gather(-1, safe) * other.scale, torch.ones_like(other.scale))
        return ParamMap(other.dim, index, scale)


def _slot_map(dim: int, index: torch.Tensor, scale: torch.Tensor | None = None) -> ParamMap:
    """A stack's map on the CPU (where optimizer state carry reads it); scale 1 unless given."""
    index = index.cpu()
    return ParamMap(dim, index, torch.ones(index.shape) if scale is None else scale.cpu())


@dataclass
class LayerState:
    """One layer's planned float32 adapter tensors plus the maps from its current parameters."""

    experts: int
    rank: int
    A: torch.Tensor
    B: torch.Tensor
    router_weight: torch.Tensor | None
    router_bias: torch.Tensor | None
    mass: torch.Tensor
    maps: dict[str, ParamMap | None]
    #: the layer's lora_alpha after the plan (its scaling is alpha / rank)
    alpha: float
    changed: set[str] = field(default_factory=set)
    #: the layer's source of random draws (see `LayerStack.generators`)
    generator: torch.Generator | None = None


@dataclass
class LayerStack:
    """Float32 copies of L layers' adapter tensors (same shapes) on a leading layer axis, plus the maps
    from the layers' current parameters."""

    experts: int
    rank: int
    A: torch.Tensor  # (L, E*r, d_in)
    B: torch.Tensor  # (L, d_out, E*r)
    router_weight: torch.Tensor | None  # (L, E, d_in); None when experts <= 1
    router_bias: torch.Tensor | None  # (L, E)
    mass: torch.Tensor  # (L, E), normalized routing mass
    maps: dict[str, ParamMap | None]
    #: one per layer, seeded from the global RNG in layer order (`layer_generator`): a layer gets the
    #: same draws (new A rows, split noise, fresh experts) whatever stack it is planned in
    generators: list[torch.Generator | None]
    #: the layers' common lora_alpha (stacked layers share it), moved with the rank by `keep_scaling`
    alpha: float
    changed: set[str] = field(default_factory=set)

    @staticmethod
    def of(
        layers: Sequence[MoELoRALinear],
        masses: Sequence[torch.Tensor | None],
        generators: Sequence[torch.Generator | None],
    ) -> LayerStack:
        """The stack of layers of identical shapes, with optional routing masses (default: each layer's
        running average) and one generator per layer."""
        first = layers[0]
        L, E, r = len(layers), first.experts, first.rank
        alphas = {layer.lora_alpha for layer in layers}
        if len(alphas) != 1:
            raise ValueError(f"a stack's layers must share lora_alpha, got {sorted(alphas)}")
        device = first.adapter_placement()[0]
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
        stacked = torch.where(total > 0, stacked / total, torch.full_like(stacked, 1.0 / max(E, 1)))

        def f32(name: str) -> torch.Tensor:
            return torch.stack([getattr(layer, name).detach() for layer in layers]).to(torch.float32)

        maps: dict[str, ParamMap | None] = {}
        for name, size, dim, present in (
            ("lora_A", E * r, 0, E > 0),
            ("lora_B", E * r, 1, E > 0),
            ("lora_router_weight", E, 0, E > 1),
            ("lora_router_bias", E, 0, E > 1),
        ):
            if present:
                maps[name] = _slot_map(dim, torch.arange(size).expand(L, size).clone())
        if E > 0:
            A, B = f32("lora_A"), f32("lora_B")
        else:  # empty factors, so the math needs no special case for reading them
            A = torch.zeros(L, 0, first.in_features, device=device)
            B = torch.zeros(L, first.out_features, 0, device=device)
        router = E > 1
        return LayerStack(
            E,
            r,
            A,
            B,
            f32("lora_router_weight") if router else None,
            f32("lora_router_bias") if router else None,
            stacked,
            maps,
            list(generators),
            alphas.pop(),
        )

    @property
    def size(self) -> int:
        return int(self.A.shape[0])

    def blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, E, r, d_in) and (L, E, d_out, r) views: each expert's A_e and B_e."""
        L, E, r = self.size, self.experts, self.rank
        A = self.A.reshape(L, E, r, self.A.shape[-1])
        B = self.B.reshape(L, self.B.shape[1], E, r).permute(0, 2, 1, 3)
        return A, B

    def update(self, changed: dict[str, ParamMap | None], **values: object) -> None:
        """Replace `values` and compose the maps of the `changed` parameters with their new step."""
        for name, step in changed.items():
            prev = self.maps.get(name)
            self.maps[name] = None if prev is None else prev.then(step)
        self.changed |= set(changed)
        if values.get("experts", self.experts) <= 1:
            for name in ROUTER_NAMES:
                self.maps.pop(name, None)
            if self.router_weight is not None:
                self.changed |= set(ROUTER_NAMES)
        for name, value in values.items():
            setattr(self, name, value)

    def check(self, d_in: int, d_out: int) -> None:
        """Raise if the tensors do not form valid layers of (experts, rank): run before installing."""
        E, r, L = self.experts, self.rank, self.size
        if self.A.shape != (L, E * r, d_in) or self.B.shape != (L, d_out, E * r):
            raise RuntimeError(
                f"resize produced lora_A {tuple(self.A.shape[1:])} / lora_B {tuple(self.B.shape[1:])} "
                f"for {E}x{r}"
            )
        if (self.router_weight is None) != (E <= 1) or (self.router_bias is None) != (E <= 1):
            raise RuntimeError(f"resize produced a router inconsistent with {E} experts")
        if E > 1 and (self.router_weight.shape != (L, E, d_in) or self.router_bias.shape != (L, E)):
            raise RuntimeError("resize produced router tensors of the wrong shape")
        if self.mass.shape != (L, E):
            raise RuntimeError("resize produced a routing mass of the wrong shape")
        for name in ("A", "B", "router_weight", "router_bias"):
            tensor = getattr(self, name)
            # a sum is non-finite iff an entry is (overflow of finite entries aside): one cheap check
            if tensor is not None and not bool(
                torch.isfinite(tensor.sum(dim=tuple(range(1, tensor.ndim)))).all()
            ):
                raise RuntimeError(f"resize produced non-finite values in {name}; no layer was changed")

    def unstack(self) -> list[LayerState]:
        """One `LayerState` per layer, in stack order."""
        out = []
        for i in range(self.size):
            maps = {
                name: None if m is None else ParamMap(m.dim, m.index[i], m.scale[i])
                for name, m in self.maps.items()
            }
            router_weight, router_bias = self.router_weight, self.router_bias
            out.append(
                LayerState(
                    self.experts,
                    self.rank,
                    self.A[i].clone(),
                    self.B[i].clone(),
                    None if router_weight is None else router_weight[i].clone(),
                    None if router_bias is None else router_bias[i].clone(),
                    self.mass[i].clone(),
                    maps,
                    self.alpha,
                    set(self.changed),
                    self.generators[i],
                )
            )
        return out


def join_blocks(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, E, r, d_in), (L, E, d_out, r) -> (L, E*r, d_in), (L, d_out, E*r): the inverse of `blocks`."""
    L, E, r, d_in = A.shape
    return A.reshape(L, E * r, d_in), B.permute(0, 2, 1, 3).reshape(L, B.shape[2], E * r)


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


def rank_alpha(alpha: float, rank: int, new_rank: int, keep_scaling: bool) -> float:
    """A layer's lora_alpha after its rank goes rank -> new_rank: unchanged, or, keeping the scaling
    alpha / rank, multiplied by new_rank / rank."""
    return alpha * new_rank / rank if keep_scaling else alpha


def layer_generator(device: torch.device) -> torch.Generator:
    """A generator for one layer's random draws, seeded by one draw from the global RNG."""
    seed = int(torch.randint(0, 2**62, (1,)))
    return torch.Generator(device=device).manual_seed(seed)


def _factor_energy(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """||B_e A_e||_F^2 per expert from the factors: sum((B^T B) * (A A^T))."""
    return ((B.transpose(-1, -2) @ B) * (A @ A.transpose(-1, -2))).sum(dim=(-1, -2)).clamp(min=0)


def split_noise_scale(A: torch.Tensor) -> torch.Tensor:
    """(..., E) scale of the copies' zero-sum noise: SPLIT_PERTURBATION x the RMS of each expert's A
    (..., E, r, d_in), or of LoRA's init scale 1/sqrt(d_in) where A is zero."""
    rms = A.pow(2).mean(dim=(-1, -2)).sqrt()
    rms = torch.where(rms == 0, torch.full_like(rms, 1.0 / math.sqrt(A.shape[-1])), rms)
    return SPLIT_PERTURBATION * rms


def _slot_index(sources: torch.Tensor, rank: int, old_rank: int, kept: int) -> torch.Tensor:
    """(L, E'*rank) index: new expert j takes old expert sources[l, j]'s first `kept` slots (-1 fresh)."""
    sources = sources.cpu()
    L, E = sources.shape
    slots = torch.arange(rank)
    index = sources[:, :, None] * old_rank + slots
    index = torch.where((sources[:, :, None] >= 0) & (slots < kept), index, torch.full_like(index, -1))
    return index.reshape(L, E * rank)


def _init_rows(stack: LayerStack, layer: int, rows: int, like: torch.Tensor) -> torch.Tensor:
    """LoRA's A init for `rows` rows of one layer, from that layer's generator."""
    generator = stack.generators[layer]
    return lora_init_A(rows, like.shape[-1], device=like.device, dtype=like.dtype, generator=generator)


def _revive_dead_rows(
    stack: LayerStack, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor | None = None
) -> None:
    """Give LoRA's A init (in place) to rank slots whose A row and B column are both zero: they could
    never learn. Exact: a zero B column multiplies whatever the A row holds. `slots` (L, E*r) limits
    it to some slots; those are then revived expert by expert."""
    dead = (A.abs().sum(-1) == 0) & (B.abs().sum(-2) == 0)
    if slots is not None:
        dead &= slots.to(dead.device)
    for layer in dead.any(dim=1).nonzero().flatten().tolist():
        if slots is None:
            mask = dead[layer]
            A[layer, mask] = _init_rows(stack, layer, int(mask.sum()), A)
            continue
        r = stack.rank
        for k in range(A.shape[1] // r):
            mask = dead[layer, k * r : (k + 1) * r]
            if mask.any():
                A[layer, k * r : (k + 1) * r][mask] = _init_rows(stack, layer, int(mask.sum()), A)


#: new A rows of one layer of a stack: (layer index, its (E, r, d_in) A blocks, rows per expert) ->
#: (E, rows, d_in)
NewRows = Callable[[int, torch.Tensor, int], torch.Tensor]


def grow_rank(
    stack: LayerStack, new_rank: int, keep_scaling: bool = False, new_rows: NewRows | None = None
) -> None:
    """New rank slots: A from LoRA init (or ``new_rows``: growth's gradient directions), B zero; old B
    scaled by r'/r so scaling changes cancel, or the scaling kept (alpha x r'/r, old B as it was). Exact."""
    L, E, r = stack.size, stack.experts, stack.rank
    A, B = stack.blocks()
    extra = new_rank - r
    if new_rows is None:

        def new_rows(layer: int, _: torch.Tensor, count: int) -> torch.Tensor:
            return _init_rows(stack, layer, E * count, A).reshape(E, count, -1)

    A = torch.cat([A, torch.stack([new_rows(layer, A[layer], extra).to(A) for layer in range(L)])], dim=2)
    ratio = 1.0 if keep_scaling else new_rank / r
    B = torch.cat([B * ratio, B.new_zeros(L, E, B.shape[2], extra)], dim=3)
    A, B = join_blocks(A, B)
    index = _slot_index(torch.arange(E).expand(L, E), new_rank, r, r)
    scale_B = torch.where(index >= 0, torch.full(index.shape, ratio), torch.ones(index.shape))
    stack.update(
        {"lora_A": _slot_map(0, index), "lora_B": _slot_map(1, index, scale_B)},
        rank=new_rank,
        alpha=rank_alpha(stack.alpha, r, new_rank, keep_scaling),
        A=A,
        B=B,
    )


def shrink_rank(
    stack: LayerStack, new_rank: int, keep_scaling: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert truncated SVD to `new_rank` from the factors; returns each layer's discarded share of
    the energy and its per-token bound (float64, (L,)). ``keep_scaling``: alpha x r'/r, scaling kept."""
    L, E, r = stack.size, stack.experts, stack.rank
    A, B = stack.blocks()
    new_alpha = rank_alpha(stack.alpha, r, new_rank, keep_scaling)
    old_scaling, new_scaling = stack.alpha / r, new_alpha / new_rank
    # scaling * B A must keep its best rank-r' part: rescale the product by old/new scaling.
    flat_B = (B * (old_scaling / new_scaling)).reshape(L * E, B.shape[2], r)
    new_B, new_A, discarded = truncate_factors(flat_B, A.reshape(L * E, r, -1), new_rank)
    total = _factor_energy(B.reshape(L * E, B.shape[2], r), A.reshape(L * E, r, -1)).view(L, E).sum(-1)
    A2, B2 = join_blocks(new_A.view(L, E, new_rank, -1), new_B.view(L, E, -1, new_rank))
    _revive_dead_rows(stack, A2, B2)
    discarded = discarded.view(L, E)
    share = (discarded * new_scaling**2).sum(-1) / (total * old_scaling**2)
    share = torch.where(total > 0, share, torch.zeros_like(share))
    norm = (discarded.sqrt() * new_scaling).max(-1).values
    stack.update({"lora_A": None, "lora_B": None}, rank=new_rank, alpha=new_alpha, A=A2, B=B2)
    return share.double().cpu(), norm.double().cpu()


def remove_experts(stack: LayerStack, new_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop the least important experts one at a time, each folded into its most similar survivor.

    One at a time so that a survivor's mass grows before the next choice: of a just-split pair only one
    copy goes (into the other), which undoes the split exactly. Each step merges one expert per layer
    (one small QR/SVD per layer, batched). Returns each layer's discarded share, bound and exactness.
    """
    L, E, r = stack.size, stack.experts, stack.rank
    device = stack.A.device
    lanes = torch.arange(L, device=device)
    A, B = stack.blocks()
    A, B = A.clone(), B.clone()
    energy = _factor_energy(B, A).double()  # (L, E)
    mass = stack.mass.double()
    bias = stack.router_bias.clone()
    weight = stack.router_weight
    unit = weight / weight.norm(dim=2, keepdim=True).clamp(min=1e-12)
    alive = torch.ones(L, E, dtype=torch.bool, device=device)
    changed = torch.zeros(L, E, dtype=torch.bool, device=device)
    discarded_total = torch.zeros(L, dtype=torch.float64, device=device)
    energy_total = torch.zeros(L, dtype=torch.float64, device=device)
    norm = torch.zeros(L, dtype=torch.float64, device=device)
    exact = torch.ones(L, dtype=torch.bool, device=device)
    positions = torch.arange(E, device=device)
    for _ in range(E - new_experts):
        importance = torch.where(alive, mass * energy.sqrt(), torch.full_like(mass, math.inf))
        lowest = importance.min(dim=1, keepdim=True).values
        # lowest importance; among ties the later expert goes (keeps the original of a split pair)
        e = torch.where(alive & (importance == lowest), positions, -1).max(dim=1).values
        others = alive & (positions != e[:, None])
        same = others & (weight == weight[lanes, e][:, None, :]).all(dim=-1)
        has_same = same.any(dim=1)
        first_same = torch.where(same, positions, E).min(dim=1).values
        # row-wise products, not a matvec: equal rows (split copies) get equal similarities, so the
        # first of them wins (a matvec may round rows apart)
        similarity = (unit * unit[lanes, e][:, None, :]).sum(-1)
        nearest = torch.where(others, similarity, torch.full_like(similarity, -math.inf)).argmax(dim=1)
        s = torch.where(has_same, first_same, nearest)
        # same router row: logits differ only by the bias, the two gates are in ratio exp(b_s) : exp(b_e)
        pair = torch.stack([bias[lanes, s], bias[lanes, e]], dim=1)
        m_s, m_e = mass[lanes, s].clamp(min=1e-12), mass[lanes, e].clamp(min=1e-12)
        w_mass = torch.stack([m_s / (m_s + m_e), m_e / (m_s + m_e)], dim=1)
        w = torch.where(has_same[:, None], torch.softmax(pair, dim=1).double(), w_mass).to(A.dtype)
        # math.log, as the per-layer merge this replaced computed it, so results stay bit for bit
        shift = [math.log((a + b) / a) for a, b in zip(m_s.tolist(), m_e.tolist(), strict=True)]
        raised = bias[lanes, s] + torch.tensor(shift, dtype=torch.float64, device=device).to(bias.dtype)
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
        norm += discarded.sqrt() * stack.alpha / r
        exact &= ~((merged > 0) & (discarded > 1e-10 * merged))
        changed[lanes, s] = True
        alive[lanes, e] = False
    keep = alive.nonzero()[:, 1].view(L, new_experts)
    A2, B2 = join_blocks(A[lanes[:, None], keep], B[lanes[:, None], keep])
    kept_changed = changed.gather(1, keep)
    _revive_dead_rows(stack, A2, B2, kept_changed.repeat_interleave(r, dim=1))
    index = _slot_index(torch.where(kept_changed, -1, keep), r, r, r)
    maps: dict[str, ParamMap | None] = {"lora_A": _slot_map(0, index), "lora_B": _slot_map(1, index)}
    router_w = router_b = None
    if new_experts > 1:
        router_w = weight.gather(1, keep[:, :, None].expand(-1, -1, weight.shape[2]))
        router_b = bias.gather(1, keep)
        maps["lora_router_weight"] = _slot_map(0, keep)
        maps["lora_router_bias"] = _slot_map(0, keep)
    new_mass = mass.gather(1, keep).to(torch.float32)
    stack.update(
        maps, experts=new_experts, A=A2, B=B2, router_weight=router_w, router_bias=router_b, mass=new_mass
    )
    share = torch.where(energy_total > 0, discarded_total / energy_total, torch.zeros_like(energy_total))
    return share.cpu(), norm.cpu(), exact.cpu()


def add_experts(stack: LayerStack, new_experts: int) -> None:
    """Split the most-loaded experts into copies; dense routing output unchanged exactly."""
    L, E, r = stack.size, stack.experts, stack.rank
    device = stack.A.device
    lanes = torch.arange(L)
    copies = torch.ones(L, E)
    for _ in range(new_experts - E):
        copies[lanes, torch.argmax(stack.mass.cpu() / copies, dim=1)] += 1
    counts = copies.long().tolist()
    sources = [list(range(E)) + [e for e in range(E) for _ in range(c[e] - 1)] for c in counts]
    src = torch.tensor(sources, dtype=torch.long)
    src_here = src.to(device)
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
                len(members), r, A.shape[-1], device=device, dtype=A.dtype, generator=stack.generators[layer]
            )
            # zero mean under the gate shares: sum_j share_j A_j = A_e, so dense routing is unchanged
            weights = parts.to(device=device, dtype=A.dtype).view(-1, 1, 1)
            new_A[layer, members] += scale[layer, e] * (noise - (weights * noise).sum(dim=0, keepdim=True))
    log_share = share.log().to(device=device, dtype=A.dtype)
    if stack.router_weight is None:
        router_w = torch.zeros(L, new_experts, A.shape[-1], device=device, dtype=A.dtype)
        router_b = log_share
        router_maps: dict[str, ParamMap | None] = dict.fromkeys(ROUTER_NAMES)
    else:
        router_w = stack.router_weight[lanes[:, None], src]
        router_b = stack.router_bias.gather(1, src_here) + log_share.to(stack.router_bias.dtype)
        router_maps = dict.fromkeys(ROUTER_NAMES, _slot_map(0, src))
    mass = stack.mass.gather(1, src_here) / copies.to(device).gather(1, src_here)
    A2, B2 = join_blocks(new_A, new_B)
    index = _slot_index(src, r, r, r)
    maps = {"lora_A": _slot_map(0, index), "lora_B": _slot_map(1, index), **router_maps}
    stack.update(
        maps, experts=new_experts, A=A2, B=B2, router_weight=router_w, router_bias=router_b, mass=mass
    )


def remove_all_experts(stack: LayerStack) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove every expert: the adapter's whole delta is the discarded part. Returns each layer's
    discarded share (1, or 0 if B was 0) and per-token bound."""
    A, B = stack.blocks()
    energy = _factor_energy(B, A)
    share = (energy.sum(-1) > 0).double()
    # gates sum to at most 1, so no token moves by more than the largest expert delta times ||x||
    norm = energy.sqrt().max(-1).values.double() * (stack.alpha / stack.rank)
    L = stack.size
    stack.update(
        dict.fromkeys(("lora_A", "lora_B")),
        experts=0,
        A=stack.A.new_zeros(L, 0, stack.A.shape[-1]),
        B=stack.B.new_zeros(L, stack.B.shape[1], 0),
        router_weight=None,
        router_bias=None,
        mass=stack.mass.new_zeros(L, 0),
    )
    return share.cpu(), norm.cpu()


def add_fresh_experts(stack: LayerStack, experts: int, rank: int) -> None:
    """Fresh experts for layers that had none: LoRA's init (B zero), so the output is unchanged."""
    L, d_in, d_out = stack.size, stack.A.shape[-1], stack.B.shape[1]
    device = stack.A.device
    A = torch.stack(
        [
            lora_init_A(experts * rank, d_in, device=device, dtype=torch.float32, generator=generator)
            for generator in stack.generators
        ]
    )
    router_w = router_b = None
    if experts > 1:
        router_w, router_b = (
            torch.zeros(L, experts, d_in, device=device),
            torch.zeros(L, experts, device=device),
        )
    stack.update(
        dict.fromkeys(PARAM_NAMES),  # none of these existed: fresh optimizer state
        experts=experts,
        rank=rank,
        A=A,
        B=torch.zeros(L, d_out, experts * rank, device=device),
        router_weight=router_w,
        router_bias=router_b,
        mass=torch.full((L, experts), 1.0 / experts, device=device),
    )


def adapter_output(state: LayerState, x: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """The adapter's contribution for input x under `state` (float32, no dropout, its own alpha), to
    measure changes; gated by the layer's own `gate_expert_hidden`."""
    x = x.to(torch.float32)
    logits = None if state.router_weight is None else x @ state.router_weight.T + state.router_bias
    hidden, _ = gate_expert_hidden(x @ state.A.T, logits, state.rank, state.alpha / state.rank, top_k)
    return hidden @ state.B.T
