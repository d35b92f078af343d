"""Function-preserving growth of `MoELoRALinear` layers: new rank slots and new experts with B = 0.

Unlike `add_experts` (which splits a loaded expert into copies that carry its learned delta), growth adds
*fresh* capacity: every new B column is zero, so the layer's output is unchanged, and the new A rows are
either LoRA's init (``init="lora"``) or the strongest input directions of the loss gradient with respect
to the module's weight that the block's existing A rows do not already span (``init="gradient"``, as in
LoRA-GA / GoRA; :func:`gradient_directions`, fed by :func:`weight_gradients`). A zero B with
gradient-aligned A rows makes the first gradient on the new B columns as large as it can be for their
norm, so the new capacity learns at once.

**Rank.** The layer's scaling is ``lora_alpha / rank``. Growing r -> r' keeps the output exact either by
multiplying the old B columns by r'/r (``keep_scaling=False``, the default, what `grow_rank` does) or by
raising the layer's ``lora_alpha`` by r'/r so the scaling stays where it was (``keep_scaling=True``).
Under Adam only the second keeps the old directions' step size: Adam moves each entry by about the
learning rate whatever its scale, so after B -> B r'/r with scaling alpha/r' the B-side change of the
delta per step is r/r' of what it was (tests/test_adapter_grow.py measures it); with rsLoRA's
alpha / sqrt(r) it would still be sqrt(r/r'). Exact function *and* unchanged Adam steps of A and B need
an unchanged scaling, whatever rule it starts from. The layer persists its own alpha (the
``lora_layer_alpha`` buffer), so checkpoints, resumes, adapter artifacts and peft exports (``alpha_pattern``)
keep a grown layer's scaling; ``ResizeReport.operations`` names the change.

**Experts** (dense softmax exact). A new expert with B = 0 changes the output only through the gates:
a new router row would take probability from every expert. Instead each new expert shares the gate of
the expert with the most routing mass per share: the source's router row is copied, the source and
its new experts get the source's bias + log(1 / parts) (their softmax probabilities then sum to the
source's, every other gate is unchanged exactly), and the source's B is multiplied by ``parts`` so its
gated delta is unchanged. Under top-k routing the selection among the copies changes (not exact).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from layermoe.layout import effective_top_k, is_int_at_least, normalize_layout

from .layer import MoELoRALinear, lora_init_A
from .layout import layers_by_block
from .probe import probe_empty_layers
from .resize import ResizeReport, install_state, single_thread, state_map
from .surgery import (
    PARAM_NAMES,
    ROUTER_NAMES,
    LayerStack,
    LayerState,
    ParamMap,
    adapter_output,
    grow_rank,
    layer_generator,
    rank_alpha,
)

GROW_INITS = ("lora", "gradient")
#: norm of one row of LoRA's A init in expectation (kaiming_uniform a=sqrt(5): U(+-1/sqrt(d_in)), so
#: E||row||^2 = d_in / (3 d_in)); gradient directions are scaled to it so both inits start alike
LORA_ROW_NORM = 1.0 / math.sqrt(3.0)


def gradient_directions(
    gradient: torch.Tensor,
    rows: int,
    exclude: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``rows`` A rows (rows, d_in) from a weight gradient G (d_out, d_in): the top right singular
    vectors of G restricted to the complement of the row space of ``exclude`` (the A rows already
    there), each scaled to LoRA's row norm. Directions beyond the rank of the restricted G (a gradient
    of low rank, or one fully covered by ``exclude``) get LoRA's random init."""
    if gradient.dim() != 2:
        raise ValueError(f"gradient must be a (d_out, d_in) matrix, got shape {tuple(gradient.shape)}")
    if not torch.isfinite(gradient).all():
        raise ValueError("gradient has NaN/inf entries; recompute it (weight_gradients) or use init='lora'")
    g = gradient.detach().to(torch.float64)
    d_in = g.shape[1]
    if exclude is not None and exclude.numel():
        q, _ = torch.linalg.qr(exclude.detach().to(device=g.device, dtype=torch.float64).T)
        g = g - (g @ q) @ q.T
    _, s, vh = torch.linalg.svd(g, full_matrices=False)
    top = s[0] if s.numel() else torch.zeros((), dtype=g.dtype, device=g.device)
    useful = int((s > top * 1e-6).sum()) if float(top) > 0 else 0
    take = min(rows, useful)
    out = torch.empty(rows, d_in, dtype=torch.float32, device=gradient.device)
    out[:take] = (vh[:take] * LORA_ROW_NORM).to(out)
    if take < rows:
        out[take:] = lora_init_A(
            rows - take, d_in, device=gradient.device, dtype=torch.float32, generator=generator
        )
    return out


def weight_gradients(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    layers: Mapping[str, MoELoRALinear],
) -> dict[str, torch.Tensor]:
    """Sum over ``batches`` of dL/dW (d_out, d_in, float32) of each layer's frozen weight W, with L the
    sum of ``loss_fn(model, batch)`` (per-sample losses): the sum over tokens of dL/d(output) x input^T.

    One forward and backward per batch in eval mode, with each layer's ``capture_hook`` (set here and
    restored after); no parameter's ``.grad`` is touched. The output must be part of the graph: layers
    with experts are (their adapter is trainable); a layer without experts (a block a growth round adapts
    for the first time) gets the scoring pass's temporary probe expert meanwhile (B = 0: the outputs, so
    the gradients, are unchanged; ``layermoe.adapters.probe``). Pass the scoring pass's training samples.
    """
    sums: dict[str, torch.Tensor] = {}
    hooked = dict(layers)
    previous = {name: layer.capture_hook for name, layer in hooked.items()}
    modes = {name: module.training for name, module in model.named_modules()}

    def hook_for(name: str) -> Callable[[MoELoRALinear, dict[str, Any]], None]:
        def capture(layer: MoELoRALinear, tensors: dict[str, Any]) -> None:
            x, output = tensors["x"].detach(), tensors["output"]
            if not output.requires_grad:
                raise RuntimeError(f"weight_gradients: {name} is not in the graph (a layer without experts)")

            def accumulate(grad: torch.Tensor) -> None:
                g = grad.reshape(-1, grad.shape[-1]).to(torch.float32)
                product = g.T @ x.reshape(-1, x.shape[-1]).to(torch.float32)
                sums[name] = product if name not in sums else sums[name] + product

            output.register_hook(accumulate)

        return capture

    try:
        model.eval()
        for name, layer in hooked.items():
            layer.capture_hook = hook_for(name)
        with torch.enable_grad(), probe_empty_layers(model):
            params = [p for p in model.parameters() if p.requires_grad]
            for batch in batches:
                loss = loss_fn(model, batch).sum()
                # differentiate w.r.t. the parameters without storing .grad: the hooks do the work
                torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        for name, layer in hooked.items():
            layer.capture_hook = previous[name]
        for name, module in model.named_modules():
            module.train(modes.get(name, module.training))
    return sums


def _new_rows(
    init: str,
    count: int,
    d_in: int,
    gradient: torch.Tensor | None,
    exclude: torch.Tensor,
    generator: torch.Generator,
    device: torch.device,
) -> torch.Tensor:
    if count == 0:
        return torch.zeros(0, d_in, device=device)
    if init == "lora":
        return lora_init_A(count, d_in, device=device, dtype=torch.float32, generator=generator)
    assert gradient is not None
    return gradient_directions(gradient.to(device), count, exclude, generator)


def _lane_map(dim: int, index: torch.Tensor, scale: torch.Tensor | None = None) -> ParamMap:
    """A map of the one-layer stack: CPU tensors with the stack's leading layer axis."""
    index = index.cpu()[None]
    return ParamMap(dim, index, torch.ones(index.shape) if scale is None else scale.cpu()[None])


def _add_experts(
    stack: LayerStack, new_experts: int, rows: Callable[[int, torch.Tensor], torch.Tensor]
) -> None:
    """Fresh experts (B = 0) for a one-layer stack, each sharing the gate of its source (module docstring)."""
    E, r = stack.experts, stack.rank
    A, B, mass = stack.A[0], stack.B[0], stack.mass[0]
    d_in, d_out = A.shape[1], B.shape[0]
    if E == 0:  # a block without adapter: fresh experts (nothing to preserve but the base output)
        router = new_experts > 1
        stack.update(
            dict.fromkeys(PARAM_NAMES),  # none of these existed: fresh optimizer state
            experts=new_experts,
            A=rows(new_experts * r, A).to(A)[None],
            B=B.new_zeros(1, d_out, new_experts * r),
            router_weight=A.new_zeros(1, new_experts, d_in) if router else None,
            router_bias=A.new_zeros(1, new_experts) if router else None,
            mass=torch.full((1, new_experts), 1.0 / new_experts, device=mass.device),
        )
        return
    parts = [1] * E
    sources = []
    for _ in range(new_experts - E):
        source = max(range(E), key=lambda e: (float(mass[e]) / parts[e], -parts[e]))
        parts[source] += 1
        sources.append(source)
    part = torch.tensor(parts, dtype=torch.float32, device=A.device)
    src = torch.tensor(list(range(E)) + sources, dtype=torch.long, device=A.device)
    scaled_B = (B.reshape(d_out, E, r) * part.view(1, E, 1)).reshape(d_out, E * r)
    if stack.router_weight is None:  # one expert: no router yet, equal logits split the gate evenly
        weight, bias = A.new_zeros(new_experts, d_in), A.new_zeros(new_experts)
        router_maps: dict[str, ParamMap | None] = dict.fromkeys(ROUTER_NAMES)
    else:
        weight = stack.router_weight[0][src]
        bias = stack.router_bias[0][src] - torch.log(part)[src].to(stack.router_bias)
        router_maps = dict.fromkeys(ROUTER_NAMES, _lane_map(0, src))
    added = (new_experts - E) * r
    index = torch.cat([torch.arange(E * r), torch.full((added,), -1, dtype=torch.long)])
    scale_B = torch.cat([part.cpu().repeat_interleave(r), torch.ones(added)])
    stack.update(
        {"lora_A": _lane_map(0, index), "lora_B": _lane_map(1, index, scale_B), **router_maps},
        experts=new_experts,
        A=torch.cat([A, rows(added, A).to(A)])[None],
        B=torch.cat([scaled_B, B.new_zeros(d_out, added)], dim=1)[None],
        router_weight=weight[None],
        router_bias=bias[None],
        mass=(mass / part.to(mass))[src.to(mass.device)][None],
    )


def plan_grow(
    layer: MoELoRALinear,
    experts: int | None = None,
    rank: int | None = None,
    *,
    init: str = "lora",
    gradient: torch.Tensor | None = None,
    keep_scaling: bool = False,
    probe: torch.Tensor | None = None,
    name: str = "",
) -> tuple[LayerState, ResizeReport, float]:
    """Plan (without touching the layer) what :func:`grow_layer` does: ``(state, report, lora_alpha)``."""
    experts = layer.experts if experts is None else experts
    rank = layer.rank if rank is None else rank
    where = f" ({name})" if name else ""
    if not is_int_at_least(experts, layer.experts):
        raise ValueError(
            f"grow_layer{where}: experts must be an int >= the current {layer.experts} (growth never removes), "
            f"got {experts!r}"
        )
    if not is_int_at_least(rank, layer.rank):
        raise ValueError(
            f"grow_layer{where}: rank must be an int >= the current {layer.rank} (growth never removes), "
            f"got {rank!r}"
        )
    if init not in GROW_INITS:
        raise ValueError(f"grow_layer: init = {init!r}; use one of {GROW_INITS}")
    if init == "gradient":
        if gradient is None:
            raise ValueError(
                f"grow_layer{where}: init='gradient' needs gradient= (d_out, d_in); see weight_gradients"
            )
        if tuple(gradient.shape) != (layer.out_features, layer.in_features):
            raise ValueError(
                f"grow_layer{where}: gradient shape {tuple(gradient.shape)} is not (d_out, d_in) = "
                f"({layer.out_features}, {layer.in_features})"
            )
    report = ResizeReport(name, layer.experts, layer.rank, experts, rank)
    with torch.no_grad():
        device = layer.adapter_placement()[0]
        generator = layer_generator(device)
        stack = LayerStack.of([layer], [None], [generator])
        old = stack.unstack()[0]

        def rows(count: int, existing: torch.Tensor) -> torch.Tensor:
            return _new_rows(init, count, layer.in_features, gradient, existing, generator, device)

        if rank > stack.rank and stack.experts == 0:  # an empty layer only remembers its rank
            report.operations.append(f"set_rank {stack.rank}->{rank}")
            stack.update({}, rank=rank, alpha=rank_alpha(stack.alpha, stack.rank, rank, keep_scaling))
        if rank > stack.rank:
            report.operations.append(f"grow_rank {stack.rank}->{rank} (B = 0, A {init})")
            # per expert: gradient directions exclude that expert's own A rows
            grow_rank(
                stack,
                rank,
                keep_scaling,
                lambda _, A, count: torch.stack([rows(count, A[e]) for e in range(stack.experts)]),
            )
        if stack.alpha != old.alpha:
            report.operations.append(f"lora_alpha {old.alpha:g}->{stack.alpha:g} (scaling kept)")
        if experts > stack.experts:
            report.operations.append(f"add_fresh_experts {stack.experts}->{experts} (B = 0, A {init})")
            _add_experts(stack, experts, rows)
            report.exact = effective_top_k(layer.top_k, experts) is None
        stack.check(layer.in_features, layer.out_features)
        state = stack.unstack()[0]
        if probe is not None:
            x = probe.detach().to(device)
            before = adapter_output(old, x, effective_top_k(layer.top_k, old.experts))
            after = adapter_output(state, x, effective_top_k(layer.top_k, state.experts))
            report.output_change = float((after - before).norm(dim=-1).max()) if x.numel() else 0.0
    report.state_map = state_map(state, name)
    return state, report, state.alpha


def _install(layer: MoELoRALinear, state: LayerState, report: ResizeReport) -> None:
    if report.operations:
        install_state(layer, state)  # with the planned alpha (``state.alpha``)


def grow_layer(
    layer: MoELoRALinear, experts: int | None = None, rank: int | None = None, **options: Any
) -> ResizeReport:
    """Grow `layer` in place to (experts, rank) with fresh, function-preserving capacity (module
    docstring): rank first, then experts at the new rank. ``options`` are :func:`plan_grow`'s keywords
    (``init``, ``gradient``, ``keep_scaling``, ``probe``, ``name``); ``init="gradient"`` needs
    ``gradient``, the module's weight gradient (d_out, d_in), e.g. from :func:`weight_gradients`. The
    report's ``state_map`` tells the optimizer how old entries moved (fresh entries -1; B columns
    rescaled where a gate or the scaling changed). All-or-nothing: the layer changes only once every
    tensor is built and checked."""
    with single_thread():
        state, report, _ = plan_grow(layer, experts, rank, **options)
    _install(layer, state, report)
    return report


def grow_model(
    model: nn.Module,
    layout: Mapping[Any, Any],
    *,
    init: str = "lora",
    gradients: Mapping[str, torch.Tensor] | None = None,
    keep_scaling: bool = False,
    probes: Mapping[str, torch.Tensor] | None = None,
) -> list[ResizeReport]:
    """Grow every layer of the blocks in `layout` to its (experts, rank) with :func:`grow_layer`, all or
    nothing: every layer is planned and checked before any changes (a block asked to shrink, or a layer
    without its gradient under ``init="gradient"``, raises first). ``gradients`` and ``probes`` map full
    module names (as :func:`named_moe_layers`) to the layer's weight gradient / probe input. Returns one
    report per changed layer, in block order."""
    target = normalize_layout(layout)
    layers, by_block = layers_by_block(model, target)
    plans = []
    with single_thread():
        for block, spec in target.items():
            for name in by_block[block]:
                layer = layers[name]
                if (layer.experts, layer.rank) == (spec["experts"], spec["rank"]):
                    continue
                gradient = None if gradients is None else gradients.get(name)
                if init == "gradient" and gradient is None:
                    raise ValueError(f"grow_model: init='gradient' but gradients has no entry for {name}")
                probe = None if probes is None else probes.get(name)
                plans.append(
                    (layer,)
                    + plan_grow(
                        layer,
                        spec["experts"],
                        spec["rank"],
                        init=init,
                        gradient=gradient,
                        keep_scaling=keep_scaling,
                        probe=probe,
                        name=name,
                    )
                )
    for layer, state, report, _ in plans:
        _install(layer, state, report)
    return [report for _, _, report, _ in plans]
