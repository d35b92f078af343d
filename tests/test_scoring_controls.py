"""Control scorers (issue 22, part 3): random, placebo, inverse, pattern, each from the registry as a YAML
config names it, checked against an independent reference (the named scorer's own allocation, the
negated scores, MoLA's published 2-4-6-8 vector)."""

from __future__ import annotations

import pytest
import yaml

from layermoe.adapters import MoELoRAConfig, inject
from layermoe.allocation import allocate
from layermoe.callbacks import LayerInfluenceCallback
from layermoe.scoring import get_scorer
from tests.scripts import callback_fixtures  # noqa: F401 - registers test_fixed_scores
from tests.tiny_models import tiny_llama

SCORES = {0: 0.3, 1: 2.5, 2: 1.1, 3: 7.0, 4: 0.9, 5: 4.2}
DIMS = {b: [(32, 32)] * 3 for b in SCORES}
CURRENT = {b: {"experts": 3, "rank": 4} for b in SCORES}


def _experts(scores: dict[int, float], **kw) -> dict[int, int]:
    layout = allocate(scores, "power_law", "current", CURRENT, DIMS, **kw)
    return {b: spec["experts"] for b, spec in layout.items()}


def _stats() -> dict[int, None]:
    return dict.fromkeys(SCORES)  # test_fixed_scores reads only the block indices


def test_controls_build_from_a_yaml_callback_entry() -> None:
    entry = yaml.safe_load(
        """
        scorer: placebo
        scorer_options: {scorer: grad_norm, seed: 3}
        allocator_options: {experts_bounds: [0, null]}
        """
    )
    cb = LayerInfluenceCallback(**entry)
    assert type(cb._scorer).__name__ == "PlaceboScorer" and cb._scorer.needs_statistics
    for name, options in (("random", {"seed": 1}), ("inverse", {"scorer": "alpha_hill"}), ("pattern", {})):
        assert LayerInfluenceCallback(scorer=name, scorer_options=options)._scorer.name == name
    assert not LayerInfluenceCallback(
        scorer="inverse", scorer_options={"scorer": "alpha_hill"}
    )._scorer.needs_statistics


def test_random_scores_are_seeded_and_cover_every_adapted_block() -> None:
    model = tiny_llama(num_blocks=4)
    inject(model, MoELoRAConfig(experts={0: 0, 1: 2, 2: 2, 3: 2}, rank=2))
    first = get_scorer("random", seed=5).score(model)
    assert sorted(first) == [0, 1, 2, 3]  # a block without adapter is scored too (it can come back)
    assert first == get_scorer("random", seed=5).score(model)
    assert first != get_scorer("random", seed=6).score(model)
    assert all(0.0 <= v < 1.0 for v in first.values()) and len(set(first.values())) == 4


def test_placebo_places_the_named_scorers_capacities_at_random() -> None:
    named = _experts(SCORES)
    placements = set()
    for seed in range(4):
        placebo = get_scorer(
            "placebo", scorer="test_fixed_scores", scorer_options={"scores": SCORES}, seed=seed
        )
        permuted = placebo.score(_stats())
        assert sorted(permuted.values()) == sorted(SCORES.values())
        got = _experts(permuted)
        assert sorted(got.values()) == sorted(named.values())  # same capacities ...
        source = {b: next(s for s, v in SCORES.items() if v == permuted[b]) for b in SCORES}
        assert got == {b: named[source[b]] for b in SCORES}  # ... moved with the scores
        placements.add(tuple(got.values()))
    assert len(placements) > 1  # ... to places that depend on the seed


def test_inverse_allocates_like_the_negated_scores() -> None:
    inverse = get_scorer("inverse", scorer="test_fixed_scores", scorer_options={"scores": SCORES})
    reflected = inverse.score(_stats())
    assert _experts(reflected) == _experts({b: -s for b, s in SCORES.items()})
    mdl = allocate(reflected, "mdl", "current", CURRENT, DIMS)
    order = sorted(SCORES, key=SCORES.get)
    experts = [mdl[b]["experts"] for b in order]
    assert experts == sorted(experts, reverse=True) and experts[0] > experts[-1]


@pytest.mark.parametrize("blocks", [8, 30])
def test_pattern_rises_by_quarters_and_scales_to_the_budget(blocks: int) -> None:
    model = tiny_llama(num_blocks=blocks, hidden=8) if blocks == 8 else None
    if model is not None:
        inject(model, MoELoRAConfig(experts=1, rank=1))
        scores = get_scorer("pattern").score(model)
    else:  # the same rule on SmolLM2's depth, from block indices alone
        scorer = get_scorer("pattern")
        scores = {b: scorer.values[min(b * 4 // blocks, 3)] for b in range(blocks)}
    quarter = [min(b * 4 // blocks, 3) for b in range(blocks)]
    assert [scores[b] for b in range(blocks)] == [2.0 + 2.0 * q for q in quarter]
    if blocks == 8:
        current = {b: {"experts": 5, "rank": 4} for b in range(blocks)}
        dims = {b: [(32, 32)] for b in range(blocks)}
        out = allocate(
            scores, "power_law", "total_experts:40", current, dims, experts_bounds=(0, None), shift=False
        )
        assert [out[b]["experts"] for b in range(blocks)] == [2, 2, 4, 4, 6, 6, 8, 8]  # MoLA's 2-4-6-8
    with pytest.raises(ValueError, match="values"):
        get_scorer("pattern", values=[])
