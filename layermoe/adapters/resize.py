"""Public resize operations on a live `MoELoRALinear`, each returning a `ResizeReport`.

A resize is planned on float32 copies (`surgery.py`, on a stack of layers: one layer is a stack of one,
`apply_layout` stacks the layers with the same resize), measured on an optional probe input, and only
then installed, so a failure at any point leaves the layer as it was. Order inside one resize: grow rank,
remove experts (merging into the larger rank), shrink rank, add experts (copies are split after any
truncation so the split stays exact).

``keep_scaling`` (every entry point, default False): a rank change r -> r' multiplies the layer's
lora_alpha by r'/r, so its scaling lora_alpha / rank, the kept directions' factors and their Adam steps
stay what they were (without it the scaling becomes alpha / r' and growth rescales the old B by r'/r,
which shrinks their B-side steps by r/r'). The layer persists its alpha (`lora_layer_alpha`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from layermoe.layout import effective_top_k, is_int_at_least

from . import surgery
from .layer import MoELoRALinear
from .surgery import PARAM_NAMES, LayerStack, LayerState, ParamMap, adapter_output, layer_generator


@dataclass
class ResizeReport:
    """What one resize did to one layer.

    exact: the adapter's output is unchanged by construction (up to float rounding).
    output_change: max over probe tokens of ||new output - old output||_2 (None without a probe).
    discarded_energy: fraction of sum_e ||scaling * B_e A_e||_F^2 removed by truncation (0 when none).
    discarded_norm: bound on the truncation's effect: the max over experts of the Frobenius norm of the
        discarded part of scaling * B_e A_e; with unchanged gates (shrink rank) each token's output moves
        by at most discarded_norm * ||x||.
    state_map: full parameter name -> ParamMap (new slice i along `dim` = old slice index[i] * scale[i],
        -1 fresh), or None when no entry correspondence survives. Only replaced parameters are listed;
        the others keep the same Parameter object (and so their optimizer state).
    """

    module: str
    old_experts: int
    old_rank: int
    new_experts: int
    new_rank: int
    exact: bool = True
    output_change: float | None = None
    discarded_energy: float = 0.0
    discarded_norm: float = 0.0
    operations: list[str] = field(default_factory=list)
    state_map: dict[str, ParamMap | None] = field(default_factory=dict)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run the many tiny QR/SVD/matmul calls of a resize on one thread.

    They are far below the size where intra-op threads help, and on a shared, oversubscribed CPU the
    thread pool's synchronization made a 30-block resize 20-40x slower than single-threaded.
    """
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_target(name: str, value: object, low: int = 1) -> int:
    if not is_int_at_least(value, low):
        raise ValueError(f"resize: {name} must be an int >= {low}, got {value!r}")
    return value


def plan_resize(
    layer: MoELoRALinear,
    experts: int | None = None,
    rank: int | None = None,
    routing_mass: torch.Tensor | None = None,
    probe: torch.Tensor | None = None,
    name: str = "",
    keep_scaling: bool = False,
) -> tuple[LayerState, ResizeReport]:
    """Compute (without touching the layer) the state after resizing to (experts, rank) and its report;
    ``keep_scaling``: see the module docstring."""
    experts = layer.experts if experts is None else _check_target("experts", experts, low=0)
    rank = layer.rank if rank is None else _check_target("rank", rank)
    generator = layer_generator(layer.adapter_placement()[0])
    ((state, report),) = plan_stack(
        [layer], [routing_mass], [generator], experts, rank, [name], keep_scaling=keep_scaling
    )
    if probe is not None:
        old = LayerStack.of([layer], [routing_mass], [None]).unstack()[0]
        x = probe.detach().to(device=layer.adapter_placement()[0])
        with torch.no_grad():
            before = adapter_output(old, x, effective_top_k(layer.top_k, old.experts))
            after = adapter_output(state, x, effective_top_k(layer.top_k, state.experts))
        report.output_change = float((after - before).norm(dim=-1).max()) if x.numel() else 0.0
    return state, report


def plan_stack(
    layers: Sequence[MoELoRALinear],
    masses: Sequence[torch.Tensor | None],
    generators: Sequence[torch.Generator],
    experts: int,
    rank: int,
    names: Sequence[str],
    keep_scaling: bool = False,
) -> list[tuple[LayerState, ResizeReport]]:
    """Plan (without touching them) the resize of layers of identical shapes, (experts, rank), top_k and
    lora_alpha to one new (experts, rank), as one stack: each layer's state and report, in order.
    `masses`: optional routing masses; `generators`: one per layer (`surgery.layer_generator`);
    `keep_scaling`: a rank change moves lora_alpha with it (module docstring)."""
    first = layers[0]
    stack = LayerStack.of(layers, masses, generators)
    alpha = stack.alpha
    exact = torch.ones(stack.size, dtype=torch.bool)
    kept = torch.ones(stack.size, dtype=torch.float64)
    norm = torch.zeros(stack.size, dtype=torch.float64)
    operations: list[str] = []
    if experts == 0 or stack.experts == 0:  # a block without adapter: no other step has work after this
        if stack.experts > 0:
            operations.append(f"remove_all_experts {stack.experts}->0")
            share, norm = surgery.remove_all_experts(stack)
            exact, kept = share == 0, 1.0 - share
        if stack.rank != rank:  # an empty layer only remembers its rank
            operations.append(f"set_rank {stack.rank}->{rank}")
            stack.update({}, rank=rank, alpha=surgery.rank_alpha(stack.alpha, stack.rank, rank, keep_scaling))
        if experts > 0:
            operations.append(f"add_fresh_experts 0->{experts}")
            surgery.add_fresh_experts(stack, experts, rank)
    if rank > stack.rank:
        operations.append(f"grow_rank {stack.rank}->{rank}")
        surgery.grow_rank(stack, rank, keep_scaling)
    if experts < stack.experts:
        operations.append(f"remove_experts {stack.experts}->{experts}")
        dense = effective_top_k(first.top_k, stack.experts) is None
        share, extra, merged_exact = surgery.remove_experts(stack, experts)
        exact &= merged_exact & dense
        kept *= 1.0 - share
        norm += extra
    if rank < stack.rank:
        operations.append(f"shrink_rank {stack.rank}->{rank}")
        share, extra = surgery.shrink_rank(stack, rank, keep_scaling)
        exact &= share <= 1e-10
        kept *= 1.0 - share
        norm += extra
    if experts > stack.experts:
        operations.append(f"add_experts {stack.experts}->{experts}")
        surgery.add_experts(stack, experts)
        exact &= effective_top_k(first.top_k, experts) is None
    if stack.alpha != alpha:
        operations.append(f"lora_alpha {alpha:g}->{stack.alpha:g} (scaling kept)")
    stack.check(first.in_features, first.out_features)
    discarded = (1.0 - kept).clamp(min=0.0)
    plans = []
    for i, (layer, state, name) in enumerate(zip(layers, stack.unstack(), names, strict=True)):
        report = ResizeReport(
            name,
            layer.experts,
            layer.rank,
            experts,
            rank,
            exact=bool(exact[i]),
            discarded_energy=float(discarded[i]),
            discarded_norm=float(norm[i]),
            operations=list(operations),
            state_map=state_map(state, name),
        )
        plans.append((state, report))
    return plans


def state_map(state: LayerState, name: str = "") -> dict[str, ParamMap | None]:
    """Full parameter name -> ParamMap of the parameters a planned state replaces."""
    prefix = f"{name}." if name else ""
    return {prefix + n: state.maps.get(n) for n in PARAM_NAMES if n in state.changed and _present(state, n)}


def _present(state: LayerState, name: str) -> bool:
    return state.experts > 1 or (state.experts == 1 and "router" not in name)


def install_state(layer: MoELoRALinear, state: LayerState) -> None:
    """Swap a planned state into the layer, cast to its dtype/device; unchanged parameters are kept."""
    device, dtype = layer.adapter_placement()
    if state.experts == 0:
        layer.install(0, state.rank, None, None, None, None, state.mass.to(device), lora_alpha=state.alpha)
        return

    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device=device, dtype=dtype)

    keep = frozenset(n for n in PARAM_NAMES if n not in state.changed)
    layer.install(
        state.experts,
        state.rank,
        cast(state.A),
        cast(state.B),
        cast(state.router_weight),
        cast(state.router_bias),
        state.mass.to(device),
        keep=keep,
        lora_alpha=state.alpha,
    )


def resize_layer(
    layer: MoELoRALinear,
    experts: int | None = None,
    rank: int | None = None,
    routing_mass: torch.Tensor | None = None,
    probe: torch.Tensor | None = None,
    name: str = "",
    keep_scaling: bool = False,
) -> ResizeReport:
    """Resize one layer to (experts, rank) in place (None keeps the current value); ``keep_scaling``:
    a rank change moves lora_alpha with it (module docstring)."""
    with single_thread():
        state, report = plan_resize(layer, experts, rank, routing_mass, probe, name, keep_scaling)
    if report.operations:
        install_state(layer, state)
    return report


def grow_rank(
    layer: MoELoRALinear, new_rank: int, probe: torch.Tensor | None = None, keep_scaling: bool = False
) -> ResizeReport:
    """Raise every expert's rank (exact: new B columns zero, new A rows LoRA-initialized)."""
    if _check_target("new_rank", new_rank) <= layer.rank:
        raise ValueError(f"grow_rank: new_rank {new_rank} must exceed the current rank {layer.rank}")
    return resize_layer(layer, rank=new_rank, probe=probe, keep_scaling=keep_scaling)


def shrink_rank(
    layer: MoELoRALinear, new_rank: int, probe: torch.Tensor | None = None, keep_scaling: bool = False
) -> ResizeReport:
    """Lower every expert's rank by truncated SVD of its delta (reports the discarded energy)."""
    if _check_target("new_rank", new_rank) >= layer.rank:
        raise ValueError(f"shrink_rank: new_rank {new_rank} must be below the current rank {layer.rank}")
    return resize_layer(layer, rank=new_rank, probe=probe, keep_scaling=keep_scaling)


def add_experts(
    layer: MoELoRALinear,
    new_experts: int,
    routing_mass: torch.Tensor | None = None,
    probe: torch.Tensor | None = None,
) -> ResizeReport:
    """Split the most-loaded experts until there are `new_experts` (exact under dense routing)."""
    if _check_target("new_experts", new_experts) <= layer.experts:
        raise ValueError(f"add_experts: new_experts {new_experts} must exceed the current {layer.experts}")
    return resize_layer(layer, experts=new_experts, routing_mass=routing_mass, probe=probe)


def remove_experts(
    layer: MoELoRALinear,
    new_experts: int,
    routing_mass: torch.Tensor | None = None,
    probe: torch.Tensor | None = None,
) -> ResizeReport:
    """Drop the least important experts, folding each into its most similar survivor (0: drop all)."""
    if _check_target("new_experts", new_experts, low=0) >= layer.experts:
        raise ValueError(
            f"remove_experts: new_experts {new_experts} must be below the current {layer.experts}"
        )
    return resize_layer(layer, experts=new_experts, routing_mass=routing_mass, probe=probe)


def rotate_to_singular_basis(layer: MoELoRALinear) -> None:
    """Re-express every expert's factors in the singular basis of its delta B_e A_e, strongest first,
    in place (the output is unchanged up to rounding): rank slot j of an expert then carries its j-th
    singular direction, so the trailing slots are the ones a shrink to a lower rank would drop.
    The values change, not the shapes: optimizer state of lora_A/lora_B no longer corresponds."""
    factors = singular_basis_factors(layer)
    if factors is not None:
        with torch.no_grad():
            layer.lora_A.copy_(factors[0])
            layer.lora_B.copy_(factors[1])


def singular_basis_factors(layer: MoELoRALinear) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``(lora_A, lora_B)`` that :func:`rotate_to_singular_basis` would write (None: no adapter),
    computed without changing the layer, so several layers can be rotated all or nothing."""
    if not layer.has_adapter:
        return None
    with torch.no_grad(), single_thread():
        stack = LayerStack.of([layer], [None], [None])
        A, B = stack.blocks()
        new_B, new_A, _ = surgery.truncate_factors(B[0], A[0], stack.rank)
        A2, B2 = (t[0] for t in surgery.join_blocks(new_A[None], new_B[None]))
        return A2.to(layer.lora_A.dtype), B2.to(layer.lora_B.dtype)


def scale_trailing_slots(layer: MoELoRALinear, keep_rank: int, factor: float) -> None:
    """Multiply the B columns of every expert's rank slots >= keep_rank by `factor` (in place): one
    step of fading those directions out (factor 0 leaves them contributing exactly nothing)."""
    if not layer.has_adapter or keep_rank >= layer.rank:
        return
    with torch.no_grad():
        B = layer.lora_B.view(layer.out_features, layer.experts, layer.rank)
        B[:, :, keep_rank:] *= factor
