"""LayerInfluenceCallback inside real fits on a tiny HF Llama: planted cases, optimizer, accumulation.

Every check compares against an independent reference: the planted block, the budget recomputed from
module shapes, the optimizer state recorded before the rewire (and a naive per-entry gather), the
closed-form LR of the schedule, and the step boundaries implied by the accumulation factor.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from layermoe.adapters import moe_layers
from layermoe.callbacks import LayerInfluenceCallback
from layermoe.scoring import causal_lm_per_sample_loss
from tests.fixtures import QUIET_INFLUENCE, cpu_trainer
from tests.scripts.callback_fixtures import TinyLlamaModule, loaders, plant_grad_norm_winner

N_SAMPLES = 8
QUIET_SAMPLES = {**QUIET_INFLUENCE, "num_train_samples": N_SAMPLES, "num_val_samples": N_SAMPLES}


def _trainer(callbacks: list[Callback], tmp_path: Any, **kw: Any) -> Trainer:
    return cpu_trainer(callbacks, **{"limit_val_batches": 2, "default_root_dir": str(tmp_path), **kw})


def _adapter_params(module: torch.nn.Module) -> int:
    """Independent count: every adapter tensor actually present in the model."""
    return sum(
        p.numel()
        for layers in moe_layers(module).values()
        for layer in layers.values()
        for name, p in layer.named_parameters(recurse=False)
        if name.startswith("lora_")
    )


@torch.no_grad()
def _val_loss(module: TinyLlamaModule, val_loader: Any, m: int) -> float:
    """Mean per-sample loss over the first ``m`` validation samples (what the callback probes)."""
    was = module.training
    module.eval()
    losses = []
    for batch in val_loader:
        losses.append(causal_lm_per_sample_loss(module.model, batch))
    module.train(was)
    return float(torch.cat(losses)[:m].double().mean())


class StateRecorder(Callback):
    """Placed before the LayerInfluenceCallback: the optimizer state by parameter name after each step."""

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        names = {id(p): n for n, p in pl_module.named_parameters()}
        opt = trainer.optimizers[0]
        self.params = dict(pl_module.named_parameters())
        self.state = {names[id(p)]: copy.deepcopy(s) for p, s in opt.state.items()}


class RewireChecker(Callback):
    """Placed after it: on the batch where a rewire happened, check the rebuilt optimizer."""

    def __init__(self, cb: LayerInfluenceCallback, recorder: StateRecorder) -> None:
        self.cb, self.recorder, self.seen = cb, recorder, 0
        self.checked: list[dict[str, int]] = []

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if len(self.cb.history) == self.seen:
            return
        self.seen = len(self.cb.history)
        opt = trainer.optimizers[0]
        listed = [p for g in opt.param_groups for p in g["params"]]
        trainable = [p for p in pl_module.parameters() if p.requires_grad]
        assert len({id(p) for p in listed}) == len(listed), "a parameter is listed twice"
        assert {id(p) for p in listed} == {id(p) for p in trainable}, "optimizer != trainable parameters"
        now = dict(pl_module.named_parameters())
        maps = {k: v for r in self.cb.last_reports for k, v in r.state_map.items()}
        kept = mapped = 0
        for name, p in now.items():
            if not p.requires_grad or name not in self.recorder.state:
                continue
            old_state = self.recorder.state[name]
            if self.recorder.params.get(name) is p:
                for key, value in old_state.items():
                    assert torch.equal(opt.state[p][key], value), (name, key)
                kept += 1
            elif maps.get(name) is not None:
                pm = maps[name]
                for key in ("exp_avg", "exp_avg_sq"):
                    old = old_state[key]
                    power = 1 if key == "exp_avg" else 2
                    for i, j in enumerate(pm.index.tolist()):
                        want = torch.zeros_like(old.select(pm.dim, 0)) if j < 0 else old.select(pm.dim, j)
                        want = want / float(pm.scale[i]) ** power if j >= 0 else want
                        torch.testing.assert_close(opt.state[p][key].select(pm.dim, i), want)
                mapped += 1
            else:
                assert p not in opt.state, f"{name} has no correspondence but got optimizer state"
        self.checked.append(
            {"kept": kept, "mapped": mapped, "batch_idx": batch_idx, "step": trainer.global_step}
        )


def test_fixed_scores_favoured_block_gets_capacity_and_optimizer_is_rebuilt(tmp_path) -> None:
    """(a) fixed scores via the public registry, (b) optimizer coverage and carried state, LR continuity."""
    seed_everything(0)
    module = TinyLlamaModule(experts=3, rank=4, lr=1e-2, scheduler="inverse", train_head=True)
    train, val = loaders()
    budget_before = _adapter_params(module)
    cb = LayerInfluenceCallback(
        scorer="test_fixed_scores",
        scorer_options={"scores": {0: 0.2, 1: 5.0, 2: 0.1}},
        schedule={"warmup": 4},
        **QUIET_SAMPLES,
    )
    recorder = StateRecorder()
    checker = RewireChecker(cb, recorder)
    trainer = _trainer([recorder, cb, checker], tmp_path, max_steps=12, limit_val_batches=0)
    trainer.fit(module, train, val)

    assert len(cb.history) == 1 and len(checker.checked) == 1
    entry = cb.history[0]
    assert entry["step"] == 4
    after = entry["layout_after"]
    assert after[1]["experts"] * after[1]["rank"] > max(
        after[b]["experts"] * after[b]["rank"] for b in (0, 2)
    )
    assert after[1]["experts"] >= max(after[0]["experts"], after[2]["experts"])
    assert _adapter_params(module) <= budget_before == entry["budget"]
    assert entry["params_after"] == _adapter_params(module)
    assert checker.checked[0]["kept"] > 0
    assert _val_loss(module, val, N_SAMPLES) < entry["val_loss_after"]
    # LambdaLR 1/(1+0.1 t) continued through the rebuild: the LR after 12 steps is the closed form.
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(1e-2 / (1 + 0.1 * 12), rel=1e-9)
    state = cb.state_dict()
    assert state["rewires_done"] == 1 and state["pending"] is None


def test_grad_norm_planted_block_wins(tmp_path) -> None:
    """(a) adapters 1000x smaller in every block but one: grad_norm favours that block."""
    seed_everything(0)
    module = TinyLlamaModule(experts=3, rank=4, lr=0.05, optimizer="sgd")
    plant_grad_norm_winner(module, keep_block=2)
    train, val = loaders()
    cb = LayerInfluenceCallback(
        scorer="grad_norm",
        schedule={"warmup": 2},
        **QUIET_SAMPLES,
    )
    budget = _adapter_params(module)
    trainer = _trainer([cb], tmp_path, max_steps=8, limit_val_batches=0)
    trainer.fit(module, train, val)
    entry = cb.history[0]
    scores = entry["scores"]
    assert max(scores, key=scores.get) == 2
    after = entry["layout_after"]
    assert after[2]["experts"] == max(v["experts"] for v in after.values())
    assert after[2]["experts"] > entry["layout_before"][2]["experts"]
    assert _adapter_params(module) <= budget
    assert _val_loss(module, val, N_SAMPLES) < entry["val_loss_after"]


class AccumulationProbe(Callback):
    """Records grads around validation and the batch on which the rewire landed."""

    def __init__(self, cb: LayerInfluenceCallback) -> None:
        self.cb, self.rewire_at, self.grad_checks = cb, None, 0

    def on_validation_start(self, trainer: Trainer, pl_module: Any) -> None:
        self.grads = {n: None if p.grad is None else p.grad.clone() for n, p in pl_module.named_parameters()}
        self.modes = {n: m.training for n, m in pl_module.named_modules()}

    def on_validation_end(self, trainer: Trainer, pl_module: Any) -> None:
        for n, p in pl_module.named_parameters():
            before = self.grads[n]
            assert (p.grad is None) == (before is None), n
            if before is not None:
                assert torch.equal(p.grad, before), n
        assert {n: m.training for n, m in pl_module.named_modules()} == self.modes
        self.grad_checks += 1

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.cb.history and self.rewire_at is None:
            self.rewire_at = (batch_idx, trainer.global_step)
            assert pl_module.training


def test_accumulation_rewire_lands_on_a_step_boundary(tmp_path) -> None:
    """(c) scored at a validation in the middle of an accumulation window, applied after the next step."""
    seed_everything(0)
    module = TinyLlamaModule(experts=2, rank=4)
    train, val = loaders()
    cb = LayerInfluenceCallback(
        scorer="test_fixed_scores",
        scorer_options={"scores": {0: 1.0, 1: 1.0, 2: 3.0}},
        schedule={"warmup": 0, "interval": "epoch"},
        allocator_options={"rank_policy": "scores"},
        **QUIET_SAMPLES,
    )
    probe = AccumulationProbe(cb)
    trainer = _trainer([cb, probe], tmp_path, max_steps=3, accumulate_grad_batches=4, val_check_interval=6)
    trainer.fit(module, train, val)
    assert probe.grad_checks >= 1
    assert cb.history[0]["scored_at_step"] == 1  # validation after batch 6: mid-window of step 2
    batch_idx, step = probe.rewire_at
    assert (batch_idx + 1) % 4 == 0 and step == (batch_idx + 1) // 4 == 2
    assert cb.history[0]["step"] == 2


def test_warmup_zero_allocates_before_the_first_optimizer_step(tmp_path) -> None:
    """schedule.warmup=0: the one-shot allocation of the published methods, applied before any update."""
    seed_everything(0)
    module = TinyLlamaModule(experts=3, rank=4, lr=1e-2)
    train, val = loaders()
    seen_at_first_step: list[dict[int, int]] = []

    class FirstStepLayout(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == 0 and not seen_at_first_step:
                seen_at_first_step.append(
                    {b: next(iter(layers.values())).experts for b, layers in moe_layers(pl_module).items()}
                )

    cb = LayerInfluenceCallback(
        scorer="test_fixed_scores",
        scorer_options={"scores": {0: 0.1, 1: 0.2, 2: 6.0}},
        schedule={"warmup": 0},
        **QUIET_SAMPLES,
    )
    trainer = _trainer([cb, FirstStepLayout()], tmp_path, max_steps=3, limit_val_batches=0)
    trainer.fit(module, train, val)
    assert len(cb.history) == 1 and cb.history[0]["step"] == 0
    assert seen_at_first_step[0] == {b: e["experts"] for b, e in cb.history[0]["layout_after"].items()}
    assert seen_at_first_step[0][2] > max(seen_at_first_step[0][0], seen_at_first_step[0][1])
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    in_optimizer = [id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]]
    assert sorted(in_optimizer) == sorted(trainable)


def _fit_probing_the_rewire(
    module: TinyLlamaModule, tmp_path: Any
) -> tuple[LayerInfluenceCallback, list[float], list[int]]:
    """Five steps with one grad_norm rewire after step 3. Returns the callback, an independent eval-mode
    validation loss taken right before each rewire, and how many loss probes each rewire ran itself
    (with rank_fade_steps=0 the callback probes only inside the rewire)."""
    train, val = loaders()
    probed: list[float] = []
    probes: list[int] = []

    class Probed(LayerInfluenceCallback):
        def _apply_pending(self, trainer: Trainer, pl_module: Any) -> None:
            probed.append(_val_loss(pl_module, val, N_SAMPLES))
            calls = []
            original = self.rewiring.probe
            self.rewiring.probe = lambda *a: calls.append(1) or original(*a)  # type: ignore[method-assign]
            super()._apply_pending(trainer, pl_module)
            probes.append(len(calls))

    cb = Probed(
        scorer="grad_norm",
        schedule={"warmup": 3},
        **QUIET_SAMPLES,
    )
    _trainer([cb], tmp_path, max_steps=5, limit_val_batches=0).fit(module, train, val)
    return cb, probed, probes


def test_loss_before_the_rewire_comes_from_the_scoring_forward(tmp_path) -> None:
    """The rewire's "loss before" reuses the scoring pass's validation losses (no second forward): it
    equals an independent eval-mode probe of the same samples taken right before the rewire."""
    seed_everything(0)
    module = TinyLlamaModule(experts=3, rank=4, lr=1e-2, train_head=True)
    cb, probed, probes = _fit_probing_the_rewire(module, tmp_path)
    assert len(cb.history) == 1 and len(probed) == 1
    assert probes == [1]  # only the loss after the rewire is probed
    assert cb.history[0]["val_loss_before"] == pytest.approx(probed[0], rel=1e-6)


def test_scoring_store_inside_training_is_a_tenth_of_the_peak_memory(tmp_path, monkeypatch) -> None:
    """Without max_store_bytes the callback bounds the scoring rows by 10% of the process's peak memory
    (capped by 10% of the available memory); an explicit capture option wins."""
    import layermoe.scoring.plan as plan_module

    monkeypatch.setattr(plan_module, "peak_memory_bytes", lambda device: 50_000_000)
    monkeypatch.setattr(plan_module, "available_memory_bytes", lambda device: 10**12)
    seen: list[int] = []
    import layermoe.callbacks.rewiring as callback_module

    original = callback_module.capture_statistics

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["max_store_bytes"])
        return original(*args, **kwargs)

    monkeypatch.setattr(callback_module, "capture_statistics", recording)
    for options, expected in (({}, 5_000_000), ({"max_store_bytes": 123_456_789}, 123_456_789)):
        seed_everything(0)
        module = TinyLlamaModule(experts=2, rank=2, lr=1e-2)
        train, val = loaders()
        cb = LayerInfluenceCallback(
            scorer="grad_norm",
            schedule={"warmup": 1},
            capture_options=options,
            **QUIET_SAMPLES,
        )
        _trainer([cb], tmp_path, max_steps=2, limit_val_batches=0).fit(module, train, val)
        assert seen[-1] == expected


def test_loss_before_is_probed_when_the_probe_forward_differs_from_the_scoring_forward(tmp_path) -> None:
    """Scoring always runs the dense path in the parameters' dtype; a layer whose ordinary forward takes
    the grouped path (or computes bf16 in float32) gets its own "loss before" probe instead of the scored
    loss, so before and after are the same computation."""
    from layermoe.adapters import named_moe_layers

    seed_everything(0)
    module = TinyLlamaModule(experts=4, rank=4, lr=1e-2, train_head=True)
    for layer in named_moe_layers(module.model).values():
        layer.top_k, layer.path = 1, "grouped"
    cb, probed, probes = _fit_probing_the_rewire(module, tmp_path)
    assert len(cb.history) == 1 and probes == [2]  # loss before and loss after
    assert cb.history[0]["val_loss_before"] == pytest.approx(probed[0], rel=1e-6)


def test_scored_loss_stands_in_only_for_layers_whose_forward_scoring_reproduces(monkeypatch) -> None:
    import layermoe.adapters.layer as layer_module
    from layermoe.adapters import MoELoRAConfig, inject
    from layermoe.callbacks.rewiring import (
        probe_forward_is_scoring_forward as _probe_forward_is_scoring_forward,
    )
    from tests.tiny_models import tiny_llama

    model = tiny_llama()
    inject(model, MoELoRAConfig(experts={0: 0, 1: 2, 2: 1}, rank=4))
    assert _probe_forward_is_scoring_forward(model)  # float32, dense; the empty block has no adapter
    model.to(torch.bfloat16)
    monkeypatch.setattr(layer_module, "_native_bf16_cpu", lambda: True)
    assert _probe_forward_is_scoring_forward(model)  # bf16 computed in bf16, as scoring does
    monkeypatch.setattr(layer_module, "_native_bf16_cpu", lambda: False)
    assert not _probe_forward_is_scoring_forward(model)  # bf16 computed in float32 outside scoring
