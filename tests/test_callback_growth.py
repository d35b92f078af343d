"""Growth mode of LayerInfluenceCallback (issue 34, items 3-4) in real fits on a tiny HF Llama.

References are independent of the growth code: the model's logits before and after each round (dense
routing), parameter counts taken from the tensors present in the model, unit costs written out from the
module shapes, the weight gradient recomputed by autograd on the frozen base weight, and the unbroken
run's checkpoint for resume.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer, seed_everything

from layermoe.adapters import layout, moe_layers, named_moe_layers
from layermoe.adapters.grow import gradient_directions
from layermoe.allocation import plan_growth
from layermoe.callbacks import CallbackConfigError, GrowthOptions, LayerInfluenceCallback
from layermoe.callbacks import growing as growing_module
from layermoe.callbacks.rewiring import block_dims
from layermoe.callbacks.state import CallbackState, RewirePlan
from layermoe.cli import main
from layermoe.scoring import causal_lm_per_sample_loss
from tests.fixtures import cpu_trainer, quiet_influence
from tests.scripts.callback_fixtures import (
    TinyLlamaModule,
    assert_fit_fails_before_first_step,
    fit_counting_task,
    loaders,
)
from tests.test_callback_ddp import _run_job
from tests.test_cli_errors import _with_influence
from tests.test_cli_quickstart import QUICKSTART, _override

SCORES = {0: 1.0, 1: 5.0, 2: 1.0}  # block 1 planted as the one that matters
ROUNDS, WARMUP, EVERY, MAX_STEPS = 3, 1, 2, 7  # rounds after steps 1, 3 and 5
FIXED = {"scorer_options": {"scores": SCORES}}


def _adapter_params(module: torch.nn.Module) -> int:
    """Every adapter tensor present in the model (A, B, routers)."""
    return sum(
        p.numel()
        for layer in named_moe_layers(module).values()
        for name, p in layer.named_parameters(recurse=False)
        if name.startswith("lora_")
    )


def _units(module: torch.nn.Module) -> dict[int, tuple[int, int]]:
    """Per block: (one rank unit, one new expert) in parameters, from the module shapes: a rank unit adds a
    row of A and a column of B to every expert of every module, an expert adds r rows and columns plus its
    router row (d_in + 1 per module; the router itself appears at the second expert: two rows)."""
    units = {}
    for block, layers in moe_layers(module).items():
        (e, r), *others = {(layer.experts, layer.rank) for layer in layers.values()}
        assert not others, "one layout per block"
        s = sum(layer.in_features + layer.out_features for layer in layers.values())
        router = sum(layer.in_features + 1 for layer in layers.values())
        units[block] = (e * s, r * s + (2 if e == 1 else 1) * router)
    return units


class Around(Callback):
    """Two of these sandwich the influence callback: the first records the logits of a fixed batch (eval
    mode) and the model's state at every step; the second compares them when a round happened."""

    def __init__(self, batch: dict[str, torch.Tensor], first: Around | None = None) -> None:
        self.batch, self.first = batch, first
        self.logits: torch.Tensor | None = None
        self.rounds: list[dict[str, Any]] = []

    @torch.no_grad()
    def _logits(self, module: Any) -> torch.Tensor:
        was = module.training
        module.eval()
        out = module.model(input_ids=self.batch["input_ids"]).logits.clone()
        module.train(was)
        return out

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, *args: Any) -> None:
        if self.first is None:
            self.logits = self._logits(pl_module)
            self.layout = layout(pl_module)
            return
        if layout(pl_module) == self.first.layout:
            return
        after = self._logits(pl_module)
        self.rounds.append(
            {
                "step": trainer.global_step,
                "change": float((after - self.first.logits).abs().max()),
                "scale": float(self.first.logits.abs().max()),
                "params": _adapter_params(pl_module),
                "units": _units(pl_module),
                "layout": layout(pl_module),
                "optimizer_params": sum(
                    p.numel() for g in trainer.optimizers[0].param_groups for p in g["params"]
                ),
                "trainable": sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
            }
        )


def _grow_fit(
    tmp_path: Path, keep_scaling: bool = False, on_error: str = "raise", **growth: Any
) -> tuple[TinyLlamaModule, LayerInfluenceCallback, Around, int]:
    seed_everything(0)
    module = TinyLlamaModule(experts=2, rank=4)
    budget = _adapter_params(module)  # budget "current": the injected layout's parameters
    train, val = loaders()
    batch = next(iter(val))
    first = Around(batch)
    second = Around(batch, first)
    cb = quiet_influence(
        "test_fixed_scores",
        **FIXED,
        growth={"rounds": ROUNDS, **growth},
        keep_scaling=keep_scaling,
        schedule={"warmup": WARMUP, "every": EVERY},
        on_error=on_error,
    )
    trainer = cpu_trainer(
        [first, cb, second], max_steps=MAX_STEPS, limit_val_batches=2, default_root_dir=str(tmp_path)
    )
    trainer.fit(module, train, val)
    return module, cb, second, budget


def _targets(initial: int, budget: int) -> list[int]:
    """The growth schedule written out: equal increments from the starting cost to the budget."""
    return [initial + (budget - initial) * (k + 1) // ROUNDS for k in range(ROUNDS)]


@pytest.mark.parametrize(
    ("control", "init", "keep_scaling"),
    [
        ("none", "lora", False),
        ("none", "gradient", True),
        ("uniform", "lora", False),
        ("placebo", "lora", True),
    ],
)
def test_every_round_keeps_the_function_and_the_budget(
    tmp_path: Path, control: str, init: str, keep_scaling: bool
) -> None:
    module, cb, seen, budget = _grow_fit(tmp_path, control=control, init=init, keep_scaling=keep_scaling)
    plan = cb.state.growth["plan"]
    # the fit started from one expert per block at an even rank, at most a quarter of the budget
    assert {spec["experts"] for spec in plan["initial"].values()} == {1}
    assert len({spec["rank"] for spec in plan["initial"].values()}) == 1
    assert plan["budget"] == budget and plan["initial_params"] <= budget // 4
    assert [r["step"] for r in seen.rounds] == [WARMUP + k * EVERY for k in range(ROUNDS)]
    assert [e["growth_round"] for e in cb.history] == list(range(ROUNDS))
    assert cb.state.growth["rounds_done"] == ROUNDS and cb.state.rewires_done == ROUNDS
    targets = _targets(plan["initial_params"], budget)
    previous = plan["initial_params"]
    for k, (entry, seen_round) in enumerate(zip(cb.history, seen.rounds, strict=True)):
        # dense routing, B = 0: the logits of a fixed batch do not move
        assert seen_round["change"] <= 1e-6 * max(1.0, seen_round["scale"]), seen_round
        assert abs(entry["disturbance"]) < 1e-6
        # the count in the history is what the model holds, and the optimizer holds exactly that
        assert entry["trainable_adapter_params"] == entry["params_after"] == seen_round["params"]
        assert seen_round["optimizer_params"] == seen_round["trainable"]
        assert entry["layout_after"] == seen_round["layout"] and entry["mode"] == "grow"
        # capacity only grows, never above the budget or the round's target
        assert all(
            entry["layout_after"][b]["experts"] >= entry["layout_before"][b]["experts"]
            and entry["layout_after"][b]["rank"] >= entry["layout_before"][b]["rank"]
            for b in SCORES
        )
        assert previous < seen_round["params"] <= targets[k] <= budget
        previous = seen_round["params"]
    # the last round spends the budget up to less than any block's cheapest unit
    final = seen.rounds[-1]
    cheapest = min(min(units) for units in final["units"].values())
    assert budget - final["params"] < cheapest, (budget, final)
    assert _adapter_params(module) == final["params"]
    sizes = {b: _block_params(module, b) for b in SCORES}
    if control == "uniform":  # the increments spread evenly: blocks within one unit of each other
        assert max(sizes.values()) - min(sizes.values()) <= max(max(u) for u in final["units"].values())
    if control == "none":  # the planted block takes the most
        assert sizes[1] > max(sizes[0], sizes[2])
    # the scaling alpha / rank: kept at the configured 8 / 4 through every rank change, or alpha 8 / rank
    scalings = {layer.lora_alpha / layer.rank for layer in named_moe_layers(module).values()}
    ranks = {spec["rank"] for spec in final["layout"].values()}
    assert scalings == ({8.0 / 4} if keep_scaling else {8.0 / r for r in ranks})


@pytest.mark.parametrize("control", ["none", "uniform"])
def test_a_start_on_some_blocks_grows_into_the_empty_ones_keeping_the_function(
    tmp_path: Path, control: str
) -> None:
    """A share below rank 1 in every block: the fit starts with an adapter in the middle block only, and
    the rounds add fresh experts (B = 0) to the empty blocks without moving the logits."""
    module, cb, seen, budget = _grow_fit(tmp_path, control=control, initial_fraction=0.05)
    plan = cb.state.growth["plan"]
    assert {b: spec["experts"] for b, spec in plan["initial"].items()} == {0: 0, 1: 1, 2: 0}
    assert plan["initial_params"] <= budget // 20
    targets = _targets(plan["initial_params"], budget)
    for k, seen_round in enumerate(seen.rounds):
        assert seen_round["change"] <= 1e-6 * max(1.0, seen_round["scale"]), seen_round
        assert (
            seen_round["params"] <= targets[k] and seen_round["optimizer_params"] == seen_round["trainable"]
        )
    final = seen.rounds[-1]
    assert budget - final["params"] < min(min(units) for units in final["units"].values())
    # the first round already adapts the empty blocks (a fresh expert is the cheapest unit there); the
    # scored arm then gives the planted block the most
    assert all(seen.rounds[0]["layout"][b]["experts"] >= 1 for b in (0, 2)), seen.rounds[0]["layout"]
    if control == "none":
        sizes = {b: _block_params(module, b) for b in SCORES}
        assert sizes[1] > max(sizes[0], sizes[2])


def test_a_failed_round_under_skip_changes_nothing_and_its_allowance_carries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round 0's growth fails after the layers were resized (on_error="skip"): the failure names the growth
    surgery, the model keeps its layout and alphas until round 1, which places the carried allowance, and
    the last round still ends within one unit of the budget."""
    real, calls = growing_module.grow_model, []

    def fails_once(*args: Any, **kwargs: Any) -> Any:
        reports = real(*args, **kwargs)
        calls.append(len(reports))
        if len(calls) == 1:
            raise RuntimeError("planted failure after the resize")
        return reports

    monkeypatch.setattr(growing_module, "grow_model", fails_once)
    with pytest.warns(UserWarning, match="rewire skipped at global step 1"):
        module, cb, seen, budget = _grow_fit(tmp_path, keep_scaling=True, on_error="skip")
    assert calls[0] > 0  # the first call did resize layers before failing
    ((failure,),) = [cb.state.failures]
    assert failure["step"] == WARMUP and failure["stage"] == "rewire"
    assert "failed during grow_model: RuntimeError: planted failure" in failure["error"]
    plan = cb.state.growth["plan"]
    assert [e["growth_round"] for e in cb.history] == [1, 2] and cb.state.growth["rounds_done"] == 2
    # nothing changed at the failed round: the first change seen is round 1's, from the starting layout
    assert cb.history[0]["layout_before"] == plan["initial"]
    assert [r["step"] for r in seen.rounds] == [WARMUP + EVERY, WARMUP + 2 * EVERY]
    targets = _targets(plan["initial_params"], budget)
    assert targets[0] < seen.rounds[0]["params"] <= targets[1]  # round 0's share carried to round 1
    final = seen.rounds[-1]
    assert final["params"] <= budget
    assert budget - final["params"] < min(min(units) for units in final["units"].values())
    assert {layer.lora_alpha / layer.rank for layer in named_moe_layers(module).values()} == {8.0 / 4}


def _block_params(module: torch.nn.Module, block: int) -> int:
    return sum(
        p.numel()
        for layer in moe_layers(module)[block].values()
        for name, p in layer.named_parameters(recurse=False)
        if name.startswith("lora_")
    )


def test_controls_spend_the_same_allowance_each_round(tmp_path: Path) -> None:
    spent, layouts, all_targets = {}, {}, set()
    for control in ("none", "uniform", "placebo"):
        _, cb, seen, budget = _grow_fit(tmp_path / control, control=control)
        spent[control] = [r["params"] for r in seen.rounds]
        layouts[control] = seen.rounds[-1]["layout"]
        targets = _targets(cb.state.growth["plan"]["initial_params"], budget)
        all_targets.add(tuple(targets))
        widest = max(max(u) for r in seen.rounds for u in r["units"].values())
        # each round lands within one unit below the cumulative target
        assert all(t - widest < p <= t for p, t in zip(spent[control], targets, strict=True)), (
            control,
            spent,
        )
    assert len(all_targets) == 1  # one schedule for the three arms: only the placement differs
    assert layouts["none"] != layouts["uniform"]


class GradientReference(Callback):
    """Before the influence callback: at the round steps, dL/dW of every adapted module's frozen base
    weight by autograd (L = the sum of per-sample losses on the callback's scoring training samples), and
    each layer's A before the round."""

    def __init__(self, cb: LayerInfluenceCallback, steps: list[int]) -> None:
        self.cb, self.steps = cb, steps
        self.grads: dict[int, dict[str, torch.Tensor]] = {}
        self.a_before: dict[int, dict[str, tuple[int, int, torch.Tensor]]] = {}

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, *args: Any) -> None:
        step = trainer.global_step
        if step not in self.steps or step in self.grads:
            return
        layers = named_moe_layers(pl_module)
        weights = {n: layer.base_layer.weight for n, layer in layers.items()}
        was = pl_module.training
        pl_module.eval()
        for w in weights.values():
            w.requires_grad_(True)
        try:
            with torch.enable_grad():
                total = sum(
                    causal_lm_per_sample_loss(pl_module.model, b).sum()
                    for b in self.cb.rewiring.scoring_train_batches(trainer)
                )
                grads = torch.autograd.grad(total, list(weights.values()))
        finally:
            for w in weights.values():
                w.requires_grad_(False)
            pl_module.train(was)
        self.grads[step] = dict(zip(weights, grads, strict=True))
        self.a_before[step] = {
            n: (layer.experts, layer.rank, layer.lora_A.detach().clone()) for n, layer in layers.items()
        }


def test_gradient_init_places_new_rows_along_the_block_gradient(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    captured: list[dict[str, torch.Tensor]] = []
    real = growing_module.weight_gradients

    def capture(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        out = real(*args, **kwargs)
        captured.append({k: v.clone() for k, v in out.items()})
        return out

    monkeypatch.setattr(growing_module, "weight_gradients", capture)
    seed_everything(0)
    module = TinyLlamaModule(experts=2, rank=4)
    train, val = loaders()
    steps = [WARMUP + k * EVERY for k in range(2)]
    # a huge router_ratio: blocks grow by rank units only (each expert's new rows, one call per expert)
    cb = quiet_influence(
        "test_fixed_scores",
        **FIXED,
        growth={"rounds": 2, "init": "gradient", "router_ratio": 1e9},
        schedule={"warmup": WARMUP, "every": EVERY},
    )
    reference = GradientReference(cb, steps)
    after: list[dict[str, torch.Tensor]] = []

    class AfterRound(Callback):
        def on_train_batch_end(self, trainer: Trainer, pl_module: Any, *args: Any) -> None:
            if trainer.global_step in steps:
                after.append(
                    {n: layer.lora_A.detach().clone() for n, layer in named_moe_layers(pl_module).items()}
                )

    trainer = cpu_trainer(
        [reference, cb, AfterRound()], max_steps=4, limit_val_batches=2, default_root_dir=str(tmp_path)
    )
    trainer.fit(module, train, val)
    assert len(captured) == len(cb.history) == 2
    checked = 0
    for k, step in enumerate(steps):
        entry = cb.history[k]
        grown = {b for b in SCORES if entry["layout_after"][b] != entry["layout_before"][b]}
        # only the growing layers' gradients are computed, and they are the base weight's gradient
        names = {n for n in reference.grads[step] if int(n.split(".layers.")[1].split(".")[0]) in grown}
        assert set(captured[k]) == names and names
        for name in names:
            torch.testing.assert_close(captured[k][name], reference.grads[step][name], rtol=1e-4, atol=1e-6)
            experts, rank, a_old = reference.a_before[step][name]
            new_rank = entry["layout_after"][int(name.split(".layers.")[1].split(".")[0])]["rank"]
            assert new_rank > rank and after[k][name].shape[0] == experts * new_rank
            a_new = after[k][name].reshape(experts, new_rank, -1)
            for e in range(experts):
                old_rows = a_old.reshape(experts, rank, -1)[e]
                torch.testing.assert_close(a_new[e, :rank], old_rows, rtol=0, atol=0)
                expected = gradient_directions(captured[k][name], new_rank - rank, old_rows)
                torch.testing.assert_close(a_new[e, rank:], expected, rtol=0, atol=1e-6)
                checked += 1
    assert checked > 0


def _resume_fit(
    tmp_path: Path, run: str, ckpt: Path | None = None, keep_scaling: bool = False, **growth: Any
) -> LayerInfluenceCallback:
    seed_everything(0)
    module = TinyLlamaModule(experts=2, rank=4)
    cb = quiet_influence(
        "test_fixed_scores",
        **FIXED,
        growth={"rounds": 2, "init": "gradient", **growth},
        keep_scaling=keep_scaling,
        schedule={"warmup": 2, "every": 3},  # rounds after steps 2 and 5
    )
    fit_counting_task(module, cb, tmp_path, run, ckpt)
    return cb


@pytest.mark.parametrize(
    ("keep_scaling", "initial_fraction"),
    [(False, 0.25), (True, 0.25), (False, 0.05)],  # 0.05: a start on the middle block only
)
def test_resume_between_rounds_equals_the_unbroken_run(
    tmp_path: Path, keep_scaling: bool, initial_fraction: float
) -> None:
    share = {"initial_fraction": initial_fraction}
    unbroken = _resume_fit(tmp_path, "a", keep_scaling=keep_scaling, **share)
    assert [e["step"] for e in unbroken.history] == [2, 5]
    starts = [spec["experts"] for spec in unbroken.state.growth["plan"]["initial"].values()]
    assert starts == ([0, 1, 0] if initial_fraction == 0.05 else [1, 1, 1])
    resumed = _resume_fit(tmp_path, "b", tmp_path / "a" / "step=3.ckpt", keep_scaling=keep_scaling, **share)
    assert [e["layout_after"] for e in resumed.history] == [e["layout_after"] for e in unbroken.history]
    assert resumed.state.growth == unbroken.state.growth
    for step in (6, 8):
        expected = torch.load(tmp_path / "a" / f"step={step}.ckpt", weights_only=True)
        actual = torch.load(tmp_path / "b" / f"step={step}.ckpt", weights_only=True)
        tensors = {k: v for k, v in expected["state_dict"].items() if v.is_floating_point()}
        assert sorted(actual["state_dict"]) == sorted(expected["state_dict"])
        assert [k for k in tensors if not torch.equal(actual["state_dict"][k], tensors[k])] == []
        (want,), (got,) = expected["optimizer_states"], actual["optimizer_states"]
        assert sorted(got["state"]) == sorted(want["state"])
        for index, moments in want["state"].items():
            for key, value in moments.items():
                assert torch.equal(got["state"][index][key], value), (step, index, key)
    # a growth checkpoint resumed with another plan, or in rewire mode, is refused before training
    with pytest.raises(CallbackConfigError, match=r"growth: the checkpoint's run was planned with rounds=2"):
        _resume_fit(
            tmp_path, "c", tmp_path / "a" / "step=3.ckpt", rounds=3, keep_scaling=keep_scaling, **share
        )
    seed_everything(0)
    with pytest.raises(CallbackConfigError, match=r"growth=None: the checkpoint's run is a growth run"):
        fit_counting_task(
            TinyLlamaModule(experts=2, rank=4),
            quiet_influence("test_fixed_scores", **FIXED, schedule={"warmup": 2, "every": 3}),
            tmp_path,
            "d",
            tmp_path / "a" / "step=3.ckpt",
        )


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["train.py"])
    return tmp_path


def test_growth_from_yaml_through_train_py(
    run_dir: Path, tiny_spec: dict, toy_files: dict, caplog: pytest.LogCaptureFixture
) -> None:
    growth = {"rounds": 2, "initial_fraction": 0.3, "init": "gradient", "control": "uniform"}
    override = _with_influence(
        _override(run_dir, tiny_spec, toy_files),
        scorer="grad_norm",
        growth=growth,
        schedule={"warmup": 2, "every": 2},
        num_train_samples=8,
        num_val_samples=8,
    )
    cli = main(["fit", "--config", str(QUICKSTART), "--config", str(override)])
    out = caplog.text
    # the table and the figure of each round (the quickstart's CSV logger gives the figure folder)
    assert "growth round 1 of 2 (control uniform, init gradient) at step 2" in out
    assert "growth round 2 of 2 (control uniform, init gradient) at step 4" in out
    assert "layermoe/growth_round" in next(run_dir.glob("runs/quickstart/logs/*/metrics.csv")).read_text()
    figures = sorted(p.name for p in run_dir.glob("runs/quickstart/logs/*/layermoe/*.png"))
    assert figures == ["rewire_00_step2.png", "rewire_01_step4.png"]
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, LayerInfluenceCallback)]
    assert cb.growth == GrowthOptions(**growth)
    assert [e["growth_round"] for e in cb.history] == [0, 1]
    assert cb.history[-1]["params_after"] == _adapter_params(cli.model) <= cb.state.budget
    config = yaml.safe_load(override.read_text())
    config["trainer"]["callbacks"][0]["init_args"]["growth"] = {"rounds": 2, "init": "svd"}
    override.write_text(yaml.safe_dump(config))
    with pytest.raises(CallbackConfigError, match=r"growth.init='svd': use one of \['lora', 'gradient'\]"):
        main(["fit", "--config", str(QUICKSTART), "--config", str(override)])


@pytest.mark.parametrize(
    ("arguments", "pattern"),
    [
        ({"growth": {"rounds": 0}}, r"growth.rounds=0: must be an int >= 1"),
        (
            {"growth": {"rounds": 1, "initial_fraction": 0}},
            r"growth.initial_fraction=0: must be a number in \(0, 1\]",
        ),
        ({"growth": {"rounds": 1, "initial_fraction": 1.5}}, r"growth.initial_fraction=1.5"),
        ({"growth": {"rounds": 1, "init": "pissa"}}, r"growth.init='pissa': use one of"),
        ({"growth": {"rounds": 1, "control": "random"}}, r"growth.control='random': use one of"),
        (
            {"growth": {"rounds": 1, "router_ratio": -1}},
            r"growth.router_ratio=-1: must be a finite number >= 0",
        ),
        (
            {"growth": {"rounds": 1}, "keep_scaling": "yes"},
            r"keep_scaling='yes': must be true or false",
        ),
        ({"growth": {"rounds": 1, "round": 2}}, r"growth has unknown keys \['round'\]"),
        ({"growth": "grow"}, r"growth='grow': give a GrowthOptions, a dict"),
        ({"growth": {}}, r"growth.rounds=3 needs a period: set schedule.every=K"),
        (
            {"growth": {"rounds": 2}, "schedule": {"warmup": 1, "every": 2, "max_rewires": 3}},
            r"schedule.max_rewires=3 conflicts with growth.rounds=2",
        ),
        ({"growth": {"rounds": 1}, "budget": "total_experts:6"}, r"a growth run spends a parameter budget"),
        (
            {"growth": {"rounds": 1}, "rank_fade_steps": 2},
            r"rank_fade_steps=2 with growth: .*nothing to fade",
        ),
        (
            {"growth": {"rounds": 1}, "allocator_options": {"max_moves": 1}},
            r"allocator_options \['max_moves'\] with growth",
        ),
        # the callback passes the scores' own errors: a second score_errors crashed the first allocation
        # with a TypeError (got multiple values for keyword argument), in either mode
        (
            {"growth": {"rounds": 1}, "allocator_options": {"score_errors": {0: 0.1}}},
            r"allocator_options.score_errors: .*error_groups",
        ),
        (
            {"allocator_options": {"score_errors": {0: 0.1}}},
            r"allocator_options.score_errors: .*error_groups",
        ),
    ],
)
def test_bad_growth_settings_name_the_field(arguments: dict[str, Any], pattern: str) -> None:
    with pytest.raises(CallbackConfigError, match=pattern):
        LayerInfluenceCallback(scorer="grad_norm", **arguments)


@pytest.mark.parametrize(
    ("schedule", "run", "pattern"),
    [
        ({"warmup": 1, "every": 2}, {"max_steps": 4}, r"after 5 optimizer steps .* the run has only 4"),
        (
            {"warmup": 1, "every": 1, "interval": "epoch"},
            {"max_epochs": 3, "limit_train_batches": 2},
            r"after 3 epochs .* the run has only 3",
        ),
    ],
)
def test_a_run_too_short_for_every_round_is_refused_before_training(
    schedule: dict[str, Any], run: dict[str, Any], pattern: str
) -> None:
    """Three rounds at warmup + k x every: a run that ends before the last would silently leave part of the
    budget unplaced (a growth arm compared at equal budget would not be), so the fit stops first, naming
    the settings to change."""
    seed_everything(0)
    cb = LayerInfluenceCallback(
        scorer="grad_norm", growth={"rounds": 3}, schedule=schedule, verbose=False, plot=False
    )
    assert_fit_fails_before_first_step(
        TinyLlamaModule(experts=2, rank=4),
        cb,
        CallbackConfigError,
        r"growth.rounds=3: the last round would come " + pattern,
        *loaders(),
        weights_unchanged=False,  # the starting resize ran in setup
        **{"max_steps": -1, **run},
    )


def test_growth_rounds_are_the_schedule_slots() -> None:
    cb = LayerInfluenceCallback(
        scorer="grad_norm", growth=GrowthOptions(rounds=4), schedule={"warmup": 3, "every": 5}
    )
    assert cb.schedule.limit == 4 and cb.schedule.due_at(3, 3) == 18
    with pytest.raises(AttributeError):  # fixed at construction: the schedule was shaped by it
        cb.growth = None  # type: ignore[misc]
    one = LayerInfluenceCallback(scorer="grad_norm", growth={"rounds": 1})  # the default schedule: one slot
    assert one.schedule.limit == 1
    rewire = LayerInfluenceCallback(scorer="grad_norm")
    assert rewire.growth is None and rewire.growing is None
    assert copy.deepcopy(GrowthOptions()).to_dict() == {
        "rounds": 3,
        "initial_fraction": 0.25,
        "init": "lora",
        "control": "none",
        "router_ratio": 1.0,
    }


def test_growth_state_survives_a_weights_only_checkpoint(tmp_path: Path) -> None:
    plan = plan_growth({b: [(32, 32), (32, 64)] for b in range(3)}, 20_000, rounds=2)
    pending = RewirePlan(
        layout=plan.initial, scores={0: 1.0, 1: 2.0, 2: 3.0}, step=4, epoch=1, growth_round=1
    )
    state = CallbackState(
        rewires_done=1,
        pending=pending.to_dict(),
        growth={"plan": plan.to_dict(), "options": GrowthOptions(rounds=2).to_dict(), "rounds_done": 1},
    )
    torch.save({"state": state.to_dict()}, tmp_path / "state.pt")
    loaded = CallbackState.from_dict(torch.load(tmp_path / "state.pt", weights_only=True)["state"])
    assert loaded == state and loaded.plan == pending and loaded.plan.growth_round == 1
    assert loaded.plans_made == 2


def test_ddp_ranks_agree_after_growth_rounds(tmp_path: Path) -> None:
    r0, r1, output = _run_job(tmp_path, "grow")
    assert [h["growth_round"] for h in r0["history"]] == [0, 1], output
    assert [h["layout_after"] for h in r0["history"]] == [h["layout_after"] for h in r1["history"]]
    assert r0["layout"] == r1["layout"] == r0["history"][-1]["layout_after"]
    assert all(abs(h["disturbance"]) < 1e-6 for h in r0["history"])
    assert r0["weights"].keys() == r1["weights"].keys()
    for key, value in r0["weights"].items():
        assert torch.equal(value, r1["weights"][key]), key
    for r in (r0, r1):
        assert r["optimizer_matches_trainable"] and r["wrapped_module_is_resized"]
    # gradient init: each rank's weight gradients (its own samples) summed over the ranks, so both derive
    # the new A rows from the whole scoring sample (before: each its own, and DDP kept rank 0's rows)
    (g0, g1) = (r0["gradients"], r1["gradients"])
    assert len(g0["used"]) == len(g1["used"]) == 2 and len(g0["local"]) == 2
    for k in range(2):
        assert g0["used"][k].keys() == g0["local"][k].keys() == g1["local"][k].keys() and g0["used"][k]
        for name, used in g0["used"][k].items():
            assert torch.equal(used, g1["used"][k][name]), name
            torch.testing.assert_close(used, g0["local"][k][name] + g1["local"][k][name])
        assert any(not torch.equal(g0["local"][k][n], g1["local"][k][n]) for n in g0["local"][k])


def test_the_start_warns_when_adapters_already_learned() -> None:
    seed_everything(0)
    fresh = TinyLlamaModule(experts=2, rank=4)
    cb = LayerInfluenceCallback(scorer="grad_norm", growth={"rounds": 1}, verbose=False, plot=False)
    budget = cb.budget.resolve(layout(fresh), block_dims(fresh))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = cb.growing.start(fresh, budget)
    assert layout(fresh) == state["plan"]["initial"]
    trained = TinyLlamaModule(experts=2, rank=4)
    with torch.no_grad():
        named_moe_layers(trained)["model.model.layers.0.mlp.up_proj"].lora_B.fill_(0.1)
    with pytest.warns(
        UserWarning, match=r"1 adapter\(s\) already hold learned deltas .*layers.0.mlp.up_proj"
    ):
        cb.growing.start(trained, budget)


def test_growth_refuses_top_k_routing_before_changing_the_model(tmp_path: Path) -> None:
    """Growth is exact only under dense routing: a top-k adapter is refused at set-up, model untouched."""
    seed_everything(0)
    module = TinyLlamaModule(experts=2, rank=4)
    for layer in named_moe_layers(module).values():
        layer.top_k = 1
    before = layout(module)
    cb = quiet_influence("test_fixed_scores", **FIXED, growth={"rounds": 1})
    train, val = loaders()
    trainer = cpu_trainer([cb], max_steps=3, limit_val_batches=2, default_root_dir=str(tmp_path))
    with pytest.raises(CallbackConfigError, match=r"growth with top_k routing .*model\.adapter\.top_k"):
        trainer.fit(module, train, val)
    assert layout(module) == before
