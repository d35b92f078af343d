"""Growth mode's steps, as a plain object beside :class:`~layermoe.callbacks.rewiring.Rewiring`.

``LayerInfluenceCallback(growth=...)`` decides *when* (the schedule's slots, one per round); ``Growing``
does *what*: it starts the fit from an even share of the budget (:meth:`Growing.start`, before the
optimizer is built) and, at each round, places the round's allowance with ``grow_layout`` (or the
``uniform``/``placebo`` controls) in place of ``allocate``, and grows the layers with ``grow_model`` in
place of ``apply_layout``. Scoring, the probe loss around the change, the DDP re-wrap, the optimizer
rebuild and the carry of its moments through each report's ``state_map`` are the rewire's own
(``Rewiring.plan`` / ``Rewiring.apply``), so a growth round is as all-or-nothing as a rewire.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import nn

from layermoe.adapters import apply_layout, layout, named_moe_layers
from layermoe.adapters.grow import grow_model, weight_gradients
from layermoe.adapters.inject import split_block_name
from layermoe.allocation import (
    AllocationError,
    Budget,
    GrowthPlan,
    grow_layout,
    placebo_grow,
    plan_growth,
    uniform_grow,
)
from layermoe.allocation.allocate import ALLOCATE_OPTIONS
from layermoe.callbacks.distributed import Lockstep, sum_over_ranks
from layermoe.callbacks.errors import CallbackConfigError
from layermoe.callbacks.growth_options import GrowthOptions
from layermoe.callbacks.rewire import Surgery
from layermoe.callbacks.rewiring import Allocator, Applied, Rewiring, block_dims
from layermoe.callbacks.scoring_pass import resolve_per_sample_loss, scoring_context
from layermoe.callbacks.state import RewirePlan
from layermoe.layout import Layout, layout_params

#: ``allocate`` options that have no meaning when capacity is only added (``grow_layout`` takes the
#: method options, ``error_shrinkage`` and the bounds' highs)
_REWIRE_ONLY_OPTIONS = tuple(
    name
    for name in ALLOCATE_OPTIONS
    if name not in ("experts_bounds", "rank_bounds", "score_errors", "error_shrinkage")
)


class Growing:
    """Start a growth run and grow it round by round (module docstring). Settings checked here."""

    def __init__(self, options: GrowthOptions, rewiring: Rewiring) -> None:
        self.options = options
        self.rewiring = rewiring
        given = sorted(set(rewiring.allocator_options) & set(_REWIRE_ONLY_OPTIONS))
        if given:
            raise CallbackConfigError(
                f"allocator_options {given} with growth: growth keeps every block's experts and rank and "
                "adds units by the scores; it takes the method options, error_shrinkage, experts_bounds and "
                "rank_bounds (highs). Drop the others"
            )

    # ------------------------------------------------------------------ the start
    def start(self, pl_module: nn.Module, budget: Budget) -> dict[str, Any]:
        """Resize the module to the growth plan's even starting layout (all or nothing) and return the
        callback's growth state. Its random numbers (LoRA A rows of resized layers) come from the
        callback's seed under ``isolate_rng``: the training RNG stream is untouched."""
        try:
            plan = plan_growth(
                block_dims(pl_module), int(budget.value), self.options.rounds, self.options.initial_fraction
            )
        except AllocationError as exc:
            raise CallbackConfigError(f"growth: budget={budget}: {exc}") from exc
        routed = sorted(
            name for name, layer in named_moe_layers(pl_module).items() if layer.top_k is not None
        )
        if routed:
            # a new expert shares its source's gate: exact under dense softmax, but under top-k the copies tie
            # and the source's rescaled B is selected alone (measured: logits move by ~0.5 at top_k=1)
            raise CallbackConfigError(
                f"growth with top_k routing ({len(routed)} layer(s), e.g. {routed[0]} top_k="
                f"{named_moe_layers(pl_module)[routed[0]].top_k}): growth is function-preserving only under"
                " dense routing; set the adapter's top_k to null (model.adapter.top_k) or use rewire mode"
                " (growth=None)"
            )
        learned = [
            n for n, p in pl_module.named_parameters() if n.endswith("lora_B") and bool(p.detach().any())
        ]
        if learned:
            # a fresh adapter has B = 0; shrinking one that learned (loaded weights) cuts its delta
            rank_zero_warn(
                f"LayerInfluenceCallback(growth=...): {len(learned)} adapter(s) already hold learned deltas"
                f" (non-zero B, e.g. {learned[0]}); the starting resize to {plan.initial} cuts them. Growth"
                " is meant to start from fresh adapters (on resume the checkpoint's weights replace these)."
            )
        try:
            with torch.no_grad(), isolate_rng():
                torch.manual_seed(self.rewiring.seed)
                apply_layout(pl_module, plan.initial, keep_scaling=self.rewiring.keep_scaling)
        except Exception as exc:
            raise CallbackConfigError(
                f"growth: resizing the model to the starting layout {plan.initial} failed (the model is"
                f" unchanged): {type(exc).__name__}: {exc}"
            ) from exc
        return {"plan": plan.to_dict(), "options": self.options.to_dict(), "rounds_done": 0}

    # ------------------------------------------------------------------ a round: allocate
    def allocator(self, state: Mapping[str, Any], round_index: int) -> Allocator:
        """The allocation step of round ``round_index``: the round's allowance (what its cumulative target
        leaves above the current parameters) placed by the scores or the control."""
        plan = GrowthPlan.from_dict(state["plan"])

        def allocate(
            pl_module: nn.Module,
            scores: dict[int, float],
            errors: dict[int, float] | None,
            budget: Budget | None,
        ) -> Layout:
            return self.grow(pl_module, plan, round_index, scores, errors)

        return allocate

    def grow(
        self,
        pl_module: nn.Module,
        plan: GrowthPlan,
        round_index: int,
        scores: Mapping[int, float],
        errors: Mapping[int, float] | None,
    ) -> Layout:
        """The layout after round ``round_index`` (raises ``AllocationError``)."""
        current, dims = layout(pl_module), block_dims(pl_module)
        allowance = plan.allowance(round_index, int(layout_params(current, dims)))
        seed = self.rewiring.seed + round_index
        options = dict(self.rewiring.allocator_options)
        bounds = {k: options.pop(k) for k in ("experts_bounds", "rank_bounds") if k in options}
        common = {"router_ratio": self.options.router_ratio, "seed": seed, **bounds}
        if self.options.control == "uniform":
            return uniform_grow(current, dims, allowance, plan.budget, **common)
        if self.options.control == "placebo":
            return placebo_grow(
                current,
                scores,
                dims,
                allowance,
                plan.budget,
                score_errors=errors,
                method=self.rewiring.allocator,
                **options,
                **common,
            )
        return grow_layout(
            current,
            scores,
            dims,
            allowance,
            plan.budget,
            method=self.rewiring.allocator,
            score_errors=errors,
            **options,
            **common,
        )

    def record(
        self, state: dict[str, Any], entry: dict[str, Any], plan: RewirePlan, pl_module: nn.Module
    ) -> None:
        """Count the applied round and add what a growth round adds to its history entry."""
        state["rounds_done"] += 1
        entry.update(
            mode="grow",
            growth_round=plan.growth_round,
            growth_rounds=self.options.rounds,
            growth_control=self.options.control,
            growth_init=self.options.init,
            trainable_adapter_params=trainable_adapter_params(pl_module),
        )

    def check_fits(self, pl_module: nn.Module, state: Mapping[str, Any], round_index: int) -> None:
        """Grow once on equal scores: bounds the current layout already breaks fail before training."""
        # zero errors: error_shrinkage is checked but leaves equal scores be
        equal, zero = dict.fromkeys(layout(pl_module), 1.0), dict.fromkeys(layout(pl_module), 0.0)
        try:
            self.grow(pl_module, GrowthPlan.from_dict(state["plan"]), round_index, equal, zero)
        except AllocationError as exc:
            raise CallbackConfigError(f"growth / allocator_options cannot grow this model: {exc}") from exc

    # ------------------------------------------------------------------ a round: apply
    def apply(
        self, trainer: Any, pl_module: nn.Module, plan: RewirePlan, budget: Budget | None, index: int
    ) -> Applied:
        """Grow to ``plan.layout`` mid-fit (``Rewiring.apply`` with ``grow_model`` as the surgery)."""
        gradients = (
            self._gradients(trainer, pl_module, plan.layout) if self.options.init == "gradient" else None
        )
        return self.rewiring.apply(trainer, pl_module, plan, budget, index, surgery=self.surgery(gradients))

    def surgery(self, gradients: Mapping[str, torch.Tensor] | None) -> Surgery:
        options = self.options

        def grow_model_(module: nn.Module, target: Layout, routing_mass: Any) -> list[Any]:
            if routing_mass is not None:
                # every rank must split the same experts: use the mass averaged over ranks (the rewire
                # passes it to apply_layout); the snapshot of the transaction restores the buffers
                for name, layer in named_moe_layers(module).items():
                    mass = layer.lora_routing_mass
                    layer.lora_routing_mass = routing_mass[name].reshape(mass.shape).to(mass)
            return grow_model(
                module,
                target,
                init=options.init,
                gradients=gradients,
                keep_scaling=self.rewiring.keep_scaling,
            )

        grow_model_.__name__ = "grow_model"  # the stage a failure names
        return grow_model_

    def _gradients(self, trainer: Any, pl_module: nn.Module, target: Layout) -> dict[str, torch.Tensor]:
        """Weight gradients of the growing layers on the scoring training samples (``weight_gradients``),
        summed over the ranks under DDP (each rank's own samples: together the whole scoring sample), so
        every rank derives the same new A rows."""
        before = layout(pl_module)
        growing = {b for b, spec in target.items() if spec != before.get(b)}
        sync = Lockstep(trainer, "growth round")
        # a failure is shared with the other ranks at the check before the sum
        with sync.stage("the weight gradients for init='gradient'"):
            layers = {
                name: layer
                for name, layer in named_moe_layers(pl_module).items()
                if _block_of(name) in growing
            }
            batches = self.rewiring.scoring_train_batches(trainer)
            loss = resolve_per_sample_loss(pl_module, self.rewiring.loss_fn)
            with scoring_context(pl_module), isolate_rng():
                gradients = weight_gradients(pl_module, batches, loss, layers)
        sync.check()
        return sum_over_ranks(trainer.strategy, gradients)


def _block_of(name: str) -> int | None:
    parts = split_block_name(name)
    return None if parts is None else parts[1]


def trainable_adapter_params(pl_module: nn.Module) -> int:
    """Trainable parameters of the MoE-LoRA layers (A, B, routers) as they are in the module."""
    return sum(
        p.numel()
        for layer in named_moe_layers(pl_module).values()
        for p in layer.parameters()
        if p.requires_grad
    )


def resume_growth_conflict(kept: Mapping[str, Any] | None, growing: Growing | None) -> str | None:
    """Why this callback cannot continue a run whose growth state is ``kept`` (None: a rewire-mode run),
    or None. The growth schedule (rounds, starting share) is fixed at the first fit; how the rounds place
    and initialise capacity may change (another arm from the same checkpoint)."""
    if kept is None and growing is None:
        return None
    if kept is None:
        return (
            "growth=: the checkpoint's run is a rewire-mode run (no growth plan in its callback state); resume"
            " it without growth=, or start a new growth run without --ckpt_path"
        )
    if growing is None:
        return (
            f"growth=None: the checkpoint's run is a growth run (growth={kept['options']!r}); resume it with"
            " the same growth= settings, or start a new run without --ckpt_path"
        )
    options = kept["options"]
    changed = [k for k in ("rounds", "initial_fraction") if options.get(k) != getattr(growing.options, k)]
    if not changed:
        return None
    return (
        f"growth: the checkpoint's run was planned with {', '.join(f'{k}={options.get(k)!r}' for k in changed)}"
        " and a resumed run keeps its growth plan; resume with those values, or start a new run without"
        " --ckpt_path"
    )
