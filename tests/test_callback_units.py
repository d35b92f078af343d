"""Unit tests of the callback's pieces that need no trainer: schedule, state, optimizer carry, rollback."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from layermoe.adapters import MoELoRAConfig, apply_layout, inject, layout
from layermoe.callbacks import CallbackConfigError, RewireSchedule
from layermoe.callbacks.optimizer_carry import map_param_state
from layermoe.callbacks.state import CallbackState
from layermoe.callbacks.transaction import ModuleSnapshot
from tests.tiny_models import random_tokens, tiny_llama


def naive_due_points(warmup: int, every: int | None, limit: float, horizon: int) -> list[int]:
    """Steps at which rewires fire when the schedule is polled at every step 1..horizon."""
    fired: list[int] = []
    for step in range(1, horizon + 1):
        if len(fired) >= limit:
            break
        nxt = warmup + len(fired) * (every or 0)
        if every is None and fired:
            break
        if step >= nxt:
            fired.append(step)
    return fired


@pytest.mark.parametrize(
    ("warmup", "every", "max_rewires", "expected"),
    [
        (5, None, None, [5]),
        (3, 4, 3, [3, 7, 11]),
        (0, 2, None, [1, 2, 4, 6, 8, 10]),
        (0.3, None, None, [6]),
    ],
)
def test_schedule_fires_where_a_naive_poller_does(warmup, every, max_rewires, expected) -> None:
    sched = RewireSchedule(warmup=warmup, every=every, max_rewires=max_rewires)
    w = sched.warmup_units(20)
    fired = []
    for step in range(1, 11 if every == 2 else 21):
        if sched.is_due(step, len(fired), w):
            fired.append(step)
    assert fired == expected
    if isinstance(warmup, int):
        assert fired == naive_due_points(warmup, every, sched.limit, 10 if every == 2 else 20)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"warmup": -1}, "warmup"),
        ({"warmup": 1.5}, "warmup"),
        ({"warmup": True}, "warmup"),
        ({"every": 0}, "every"),
        ({"max_rewires": 3}, "max_rewires"),
        ({"interval": "batch"}, "interval"),
    ],
)
def test_schedule_rejects_bad_fields_naming_them(kwargs, field) -> None:
    with pytest.raises(CallbackConfigError, match=f"schedule.{field}"):
        RewireSchedule(**kwargs)


def test_schedule_fraction_needs_a_known_run_length() -> None:
    with pytest.raises(CallbackConfigError, match="max_steps"):
        RewireSchedule(warmup=0.5).warmup_units(math.inf)
    with pytest.raises(CallbackConfigError, match="unknown keys"):
        RewireSchedule.coerce({"warmup": 2, "period": 3})


def test_state_round_trips_through_primitives_and_string_keys() -> None:
    state = CallbackState(
        rewires_done=1,
        pending={"layout": {"0": {"experts": 3, "rank": 2}}, "scores": {"0": 1.5}, "step": 7, "epoch": 0},
        history=[{"layout_before": {"1": {"experts": 2, "rank": 4}}, "scores": {"1": 0.5}, "step": 3}],
        budget=1234,
    )
    data = state.to_dict()
    buffer = __import__("io").BytesIO()
    torch.save(data, buffer)
    buffer.seek(0)
    loaded = CallbackState.from_dict(torch.load(buffer, weights_only=True))
    assert loaded.pending["layout"] == {0: {"experts": 3, "rank": 2}}
    assert loaded.pending["scores"] == {0: 1.5}
    assert loaded.history[0]["layout_before"] == {1: {"experts": 2, "rank": 4}}
    assert loaded.plans_made == 2 and loaded.budget == 1234


def test_mapped_state_matches_a_naive_gather() -> None:
    """Gathered Adam moments: new[i] = old[index[i]] / scale[i] (first) and / scale[i]^2 (second)."""
    old_p = torch.randn(4, 5)
    new_p = torch.randn(6, 5)
    state = {"step": torch.tensor(9.0), "exp_avg": torch.randn(4, 5), "exp_avg_sq": torch.rand(4, 5)}
    index = torch.tensor([2, -1, 0, 3, 3, -1])
    scale = torch.tensor([1.0, 1.0, 2.0, 0.5, 4.0, 1.0])
    pmap = type("PM", (), {"dim": 0, "index": index, "scale": scale})()
    got = map_param_state(state, old_p, new_p, pmap)
    for i in range(6):
        j = int(index[i])
        exp1 = torch.zeros(5) if j < 0 else state["exp_avg"][j] / float(scale[i])
        exp2 = torch.zeros(5) if j < 0 else state["exp_avg_sq"][j] / float(scale[i]) ** 2
        torch.testing.assert_close(got["exp_avg"][i], exp1)
        torch.testing.assert_close(got["exp_avg_sq"][i], exp2)
    assert float(got["step"]) == 9.0


def test_mapped_state_along_columns() -> None:
    old_p, new_p = torch.randn(3, 4), torch.randn(3, 2)
    state = {"momentum_buffer": torch.randn(3, 4)}
    pmap = type("PM", (), {"dim": 1, "index": torch.tensor([3, 1]), "scale": torch.ones(2)})()
    got = map_param_state(state, old_p, new_p, pmap)
    torch.testing.assert_close(got["momentum_buffer"], state["momentum_buffer"][:, [3, 1]])


def test_module_snapshot_undoes_a_real_resize_exactly() -> None:
    model = tiny_llama()
    inject(model, MoELoRAConfig(experts=2, rank=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    ids = random_tokens()
    before_out = model(input_ids=ids).logits
    before_layout = layout(model)
    before_state = copy.deepcopy(model.state_dict())
    before_params = dict(model.named_parameters())
    snap = ModuleSnapshot(model)
    apply_layout(model, {0: {"experts": 3, "rank": 2}, 1: {"experts": 1, "rank": 6}})
    assert layout(model) != before_layout
    snap.restore()
    assert layout(model) == before_layout
    after = dict(model.named_parameters())
    assert after.keys() == before_params.keys()
    assert all(after[k] is before_params[k] for k in after)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before_state[k], rtol=0, atol=0)
    torch.testing.assert_close(model(input_ids=ids).logits, before_out, rtol=0, atol=0)


def test_scoring_samples_ignore_the_loaders_order_and_the_global_rng() -> None:
    from torch.utils.data import DataLoader

    from layermoe.callbacks.data import training_batches, validation_batches

    rows = [{"x": torch.tensor([i])} for i in range(20)]
    longest_first = DataLoader(rows, batch_size=4, sampler=list(range(19, -1, -1)))  # an eval loader's order
    before = torch.random.get_rng_state()
    val = validation_batches(longest_first, 6, batch_size=4)
    assert [b["x"].flatten().tolist() for b in val] == [[0, 1, 2, 3], [4, 5]]  # dataset order, not sampler's
    train = training_batches(longest_first, 7, seed=3, batch_size=4)
    drawn = torch.cat([b["x"].flatten() for b in train]).tolist()
    assert drawn == torch.randperm(20, generator=torch.Generator().manual_seed(3))[:7].tolist()
    assert torch.equal(torch.random.get_rng_state(), before)
