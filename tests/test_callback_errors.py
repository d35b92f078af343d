"""(f) Bad configurations raise the documented errors, naming the field and the fix, before training."""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

from layermoe.callbacks import CallbackConfigError, LayerInfluenceCallback
from tests.fixtures import cpu_trainer
from tests.scripts.callback_fixtures import TinyLlamaModule, assert_fit_fails_before_first_step, loaders


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"scorer": "no_such_scorer"}, "scorer='no_such_scorer'.*registered"),
        ({"scorer": "layerif", "scorer_options": {"bogus": 1}}, "scorer_options"),
        ({"allocator": "greedy"}, "allocator='greedy'.*power_law"),
        ({"allocator_options": {"betta": 2.0}}, "allocator_options.*betta"),
        ({"budget": "params:-3"}, "budget"),
        ({"budget": "dollars:5"}, "budget"),
        ({"num_train_samples": 0}, "num_train_samples=0"),
        ({"num_val_samples": 2.5}, "num_val_samples"),
        ({"schedule": {"warmup": 2.0}}, "schedule.warmup"),
        ({"schedule": {"every": 3, "max_rewires": 0}}, "schedule.max_rewires"),
        ({"schedule": "often"}, "schedule="),
        ({"scope": "everything"}, "scope='everything'"),
        ({"inject": {"experts": -1}}, "inject"),
        ({"inject": ["q_proj"]}, "inject="),
        ({"loss_fn": 3}, "loss_fn"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises(CallbackConfigError, match=pattern):
        LayerInfluenceCallback(**kwargs)


@pytest.mark.parametrize("strategy", [FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy])
def test_sharded_strategies_are_rejected_in_setup(strategy: type) -> None:
    try:
        instance = strategy()
    except Exception as exc:  # DeepSpeed's constructor needs the deepspeed package
        pytest.skip(f"cannot build {strategy.__name__} here: {exc}")
    cb = LayerInfluenceCallback()
    # setup only reads trainer.strategy: FSDP/DeepSpeed trainers cannot be built on this CPU-only machine
    with pytest.raises(CallbackConfigError, match=f"{strategy.__name__}.*ddp"):
        cb.setup(SimpleNamespace(strategy=instance), TinyLlamaModule(), "fit")


def _fit_fails(
    module: TinyLlamaModule, cb: LayerInfluenceCallback, pattern: str, val: bool = True, **kw: Any
) -> None:
    train, val_loader = loaders()
    assert_fit_fails_before_first_step(
        module, cb, CallbackConfigError, pattern, train, val_loader if val else None, **kw
    )


def test_module_without_adapters_and_no_inject() -> None:
    _fit_fails(TinyLlamaModule(adapt=False), LayerInfluenceCallback(), "no MoE-LoRA layers.*inject")


def test_no_validation_data() -> None:
    _fit_fails(TinyLlamaModule(), LayerInfluenceCallback(), "val_dataloader", val=False)


def test_warmup_beyond_the_run() -> None:
    cb = LayerInfluenceCallback(schedule={"warmup": 10})
    _fit_fails(TinyLlamaModule(), cb, "warmup resolves to 10 optimizer steps but the run has only 4")


def test_fractional_warmup_on_an_endless_run() -> None:
    cb = LayerInfluenceCallback(schedule={"warmup": 0.5})
    _fit_fails(TinyLlamaModule(), cb, "fraction of the run", max_steps=-1, max_epochs=-1)


def test_epoch_schedule_without_validation() -> None:
    cb = LayerInfluenceCallback(schedule={"warmup": 1, "interval": "epoch"})
    _fit_fails(TinyLlamaModule(), cb, "limit_val_batches=0", limit_val_batches=0, max_epochs=3)


class FailsOnRebuild(TinyLlamaModule):
    """configure_optimizers works at setup and raises when the rewire calls it again."""

    calls = 0

    def configure_optimizers(self) -> Any:
        type(self).calls += 1
        if type(self).calls > 1:
            raise RuntimeError("optimizer factory exploded")
        return super().configure_optimizers()


class RewireSpy(LayerInfluenceCallback):
    """Records the model and optimizer right before the rewire is attempted."""

    def _apply_pending(self, trainer: Trainer, pl_module: Any) -> None:
        from layermoe.adapters import layout

        self.before = {
            "layout": layout(pl_module),
            "params": dict(pl_module.named_parameters()),
            "values": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "optimizer": trainer.optimizers[0],
            "opt_state": {
                k: {kk: vv.clone() for kk, vv in v.items()} for k, v in trainer.optimizers[0].state.items()
            },
        }
        super()._apply_pending(trainer, pl_module)


# a rewire after step 2 that moves capacity to block 1 (FailsOnRebuild makes it fail)
FAILING_REWIRE: dict[str, Any] = {
    "scorer": "test_fixed_scores",
    "scorer_options": {"scores": {0: 0.1, 1: 4.0, 2: 0.1}},
    "schedule": {"warmup": 2},
    "num_train_samples": 4,
    "num_val_samples": 4,
    "plot": False,
}


def test_failed_rewire_restores_model_and_optimizer() -> None:
    from layermoe.adapters import layout
    from layermoe.callbacks import RewireError

    FailsOnRebuild.calls = 0
    module = FailsOnRebuild(experts=2, rank=4)
    cb = RewireSpy(**FAILING_REWIRE)
    trainer = cpu_trainer([cb], max_steps=4, limit_val_batches=0)
    train, val = loaders()
    with pytest.raises(RewireError, match="configure_optimizers.*exploded.*restored") as info:
        trainer.fit(module, train, val)
    assert isinstance(info.value.__cause__, RuntimeError)
    before = cb.before
    assert layout(module) == before["layout"]
    now = dict(module.named_parameters())
    assert now.keys() == before["params"].keys() and all(now[k] is before["params"][k] for k in now)
    for k, v in module.state_dict().items():
        assert torch.equal(v, before["values"][k]), k
    assert trainer.optimizers[0] is before["optimizer"]
    for p, state in trainer.optimizers[0].state.items():
        for key, value in state.items():
            assert torch.equal(value, before["opt_state"][p][key])
    assert cb.state_dict()["pending"] is not None and cb.state_dict()["rewires_done"] == 0


def _fit_to_the_end(module: Any, cb: LayerInfluenceCallback, max_steps: int = 4) -> Trainer:
    trainer = cpu_trainer([cb], max_steps=max_steps, limit_val_batches=0)
    train, val = loaders()
    trainer.fit(module, train, val)
    return trainer


class _Returns:
    """A registered scorer whose output is wrong in a given way."""

    value: Any = None


def _register_bad_scorer() -> None:
    from layermoe.scoring import SCORERS, Scorer, register_scorer

    if "test_bad_output" in SCORERS:
        return

    @register_scorer("test_bad_output")
    class BadOutput(Scorer):
        def score(self, stats: dict[int, Any]) -> Any:
            return _Returns.value


@pytest.mark.parametrize("value", [[0.1, 4.0, 0.1], None, {0: 1.0, 1: "high", 2: 1.0}, {0: 1.0, 1: 2.0}])
def test_scorer_with_bad_output_is_named(value: Any) -> None:
    """Issue 24: a scorer returning a list, None, a non-number or too few blocks gets a message saying
    what score() must return, instead of an AttributeError from deep inside the callback."""
    from layermoe.callbacks import RewireError

    _register_bad_scorer()
    _Returns.value = value
    cb = LayerInfluenceCallback(
        scorer="test_bad_output", schedule={"warmup": 2}, num_train_samples=4, num_val_samples=4, plot=False
    )
    with pytest.raises(RewireError, match=r"score\(\) must return a dict \{block_index: float\}"):
        _fit_to_the_end(TinyLlamaModule(experts=2, rank=4), cb)


class SkipSpy(RewireSpy):
    """Checks, right after a skipped rewire, that the model and optimizer are as they were before it."""

    def _apply_pending(self, trainer: Trainer, pl_module: Any) -> None:
        from layermoe.adapters import layout

        super()._apply_pending(trainer, pl_module)
        before = self.before
        self.unchanged = (
            layout(pl_module) == before["layout"]
            and all(p is before["params"][k] for k, p in pl_module.named_parameters())
            and all(torch.equal(v, before["values"][k]) for k, v in pl_module.state_dict().items())
            and trainer.optimizers[0] is before["optimizer"]
            and all(
                torch.equal(value, before["opt_state"][p][key])
                for p, state in trainer.optimizers[0].state.items()
                for key, value in state.items()
            )
        )


def test_on_error_skip_keeps_model_and_optimizer_and_trains_on() -> None:
    """Issue 24: on_error="skip" warns, records the failure, leaves everything as it was, trains on."""
    FailsOnRebuild.calls = 0
    module = FailsOnRebuild(experts=2, rank=4)
    cb = SkipSpy(**FAILING_REWIRE, on_error="skip")
    with pytest.warns(UserWarning, match="rewire skipped at global step 2.*exploded"):
        trainer = _fit_to_the_end(module, cb, max_steps=5)
    assert trainer.global_step == 5  # trained on to the end
    assert cb.unchanged
    state = cb.state_dict()
    assert state["rewires_done"] == 0 and state["pending"] is None
    assert [(f["step"], f["stage"]) for f in state["failures"]] == [(2, "rewire")]
    assert "exploded" in state["failures"][0]["error"]


def test_on_error_skip_after_a_scoring_failure_uses_up_the_slot() -> None:
    _register_bad_scorer()
    _Returns.value = None
    cb = LayerInfluenceCallback(
        scorer="test_bad_output",
        schedule={"warmup": 2, "every": 2, "max_rewires": 2},
        num_train_samples=4,
        num_val_samples=4,
        plot=False,
        on_error="skip",
    )
    with pytest.warns(UserWarning, match="rewire skipped"):
        _fit_to_the_end(TinyLlamaModule(experts=2, rank=4), cb, max_steps=6)
    # due at steps 2 and 4; each failure uses its slot, so scoring is not retried at every step
    assert [(f["step"], f["stage"]) for f in cb.state.failures] == [(2, "scoring"), (4, "scoring")]
    with pytest.raises(CallbackConfigError, match="on_error='ignore'"):
        LayerInfluenceCallback(on_error="ignore")


def test_settings_that_feed_derived_state_are_read_only() -> None:
    callback = LayerInfluenceCallback(scorer="uniform")
    key = callback.state_key
    with pytest.raises(AttributeError, match=r"pass scorer= to the LayerInfluenceCallback constructor"):
        callback.scorer = "grad_norm"
    assert callback.scorer == "uniform" and callback.state_key == key


def test_sample_counts_stay_assignable_and_checked() -> None:
    callback = LayerInfluenceCallback()
    callback.rewiring.val_batches = ["loaded with the old count"]
    callback.num_val_samples = 3
    assert callback.num_val_samples == 3 and callback.rewiring.val_batches is None
    with pytest.raises(CallbackConfigError, match=r"num_train_samples=0"):
        callback.num_train_samples = 0


def _probe_raising(when: Callable[[], bool]) -> Callable[..., float]:
    from layermoe.callbacks.rewiring import Rewiring

    real = Rewiring.probe

    def probe(self: Rewiring, trainer: Trainer, pl_module: Any) -> float:
        if when():
            raise RuntimeError("probe exploded")
        return real(self, trainer, pl_module)

    return probe


def test_on_error_skip_covers_a_probe_failure_before_the_transaction(monkeypatch: pytest.MonkeyPatch) -> None:
    from layermoe.callbacks import rewiring

    monkeypatch.setattr(rewiring.Rewiring, "probe", _probe_raising(lambda: True))
    # the loss before is then probed, not reused from the scoring forward
    monkeypatch.setattr(rewiring, "probe_forward_is_scoring_forward", lambda model: False)
    module = TinyLlamaModule(experts=2, rank=4)
    cb = SkipSpy(**FAILING_REWIRE, on_error="skip")
    with pytest.warns(UserWarning, match="rewire skipped at global step 2.*probe exploded"):
        trainer = _fit_to_the_end(module, cb, max_steps=5)
    assert trainer.global_step == 5 and cb.unchanged
    state = cb.state_dict()
    assert state["rewires_done"] == 0 and state["pending"] is None
    assert [(f["step"], f["stage"]) for f in state["failures"]] == [(2, "rewire")]


def test_a_probe_failure_after_the_transaction_is_recorded_not_reapplied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from layermoe.callbacks import rewiring

    applied: list[bool] = []
    real_rewire = rewiring.rewire

    def rewire(*args: Any, **kwargs: Any) -> Any:
        result = real_rewire(*args, **kwargs)
        applied.append(True)
        return result

    monkeypatch.setattr(rewiring, "rewire", rewire)
    monkeypatch.setattr(rewiring.Rewiring, "probe", _probe_raising(lambda: bool(applied)))
    cb = LayerInfluenceCallback(**FAILING_REWIRE)  # on_error="raise": the fit must not stop
    with pytest.warns(UserWarning, match="rewire at global step 2 is applied.*probe exploded.*NaN"):
        _fit_to_the_end(TinyLlamaModule(experts=2, rank=4), cb, max_steps=5)
    state = cb.state_dict()
    assert len(applied) == 1 and state["rewires_done"] == 1 and state["pending"] is None
    record = state["history"][0]
    assert math.isnan(record["val_loss_after"]) and math.isnan(record["disturbance"])
    assert math.isfinite(record["val_loss_before"])


def test_a_failed_fade_removal_is_not_counted_as_another_rewire(monkeypatch: pytest.MonkeyPatch) -> None:
    from layermoe.callbacks import RewireError
    from layermoe.callbacks.rewiring import Rewiring

    def remove_faded(self: Rewiring, trainer: Any, pl_module: Any, target: Any) -> Any:
        raise RewireError("removal exploded")

    monkeypatch.setattr(Rewiring, "remove_faded", remove_faded)
    cb = LayerInfluenceCallback(on_error="skip", schedule={"every": 2, "max_rewires": 3})
    cb.state.rewires_done = 1
    cb.state.fade = {"blocks": {}, "steps": 2, "done": 2, "target": {}, "history_index": 0}
    trainer = SimpleNamespace(global_step=7, loggers=[])
    with pytest.warns(UserWarning, match="removal exploded"):
        cb._finish_fade(trainer, None)
    assert [(f["step"], f["stage"]) for f in cb.state.failures] == [(7, "fade_removal")]
    assert cb.state.fade is None and cb.state.plans_made == 1  # the rewire itself, once
