"""Seeded stratified splits: class counts follow largest-remainder apportionment, seeds reproduce."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from layermoe.data.split import stratified_indices


def _expected_counts(labels: list[int], count: int) -> dict[int, int]:
    """Independent reference: floor of each class's share, leftovers to the largest remainders."""
    sizes = Counter(labels)
    total = len(labels)
    floors = {c: (count * n) // total for c, n in sizes.items()}
    remainders = sorted(sizes, key=lambda c: (-((count * sizes[c]) % total), c))
    for c in remainders[: count - sum(floors.values())]:
        floors[c] += 1
    return floors


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 3), min_size=4, max_size=80),
    frac=st.floats(0.05, 0.95),
    seed=st.integers(0, 10_000),
)
@example(labels=[0, 0, 0, 0, 1, 2], frac=0.75, seed=0)  # an exact tie that float shares used to break
def test_split_is_stratified_disjoint_and_complete(labels, frac, seed):
    count = max(1, round(frac * len(labels)))
    if count >= len(labels):
        count = len(labels) - 1
    kept, taken = stratified_indices(labels, count, seed)
    assert sorted(kept + taken) == list(range(len(labels)))
    assert len(taken) == count
    assert Counter(labels[i] for i in taken) + Counter() == Counter(
        {c: n for c, n in _expected_counts(labels, count).items() if n}
    )


def test_split_is_seeded():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    first = stratified_indices(labels, 0.2, seed=7)
    assert first == stratified_indices(labels, 0.2, seed=7)
    assert first != stratified_indices(labels, 0.2, seed=8)
    assert Counter(labels[i] for i in first[1]) == {0: 10, 1: 6, 2: 4}


def test_fraction_and_count_agree():
    labels = [i % 2 for i in range(40)]
    assert stratified_indices(labels, 0.25, seed=1) == stratified_indices(labels, 10, seed=1)


def test_unlabeled_split_is_random_but_seeded():
    kept, taken = stratified_indices(None, 5, seed=3, total=20)
    assert len(taken) == 5 and len(kept) == 15
    assert (kept, taken) == stratified_indices(None, 5, seed=3, total=20)


@pytest.mark.parametrize("size", [1.5, -1, 100, "10", True])
def test_bad_sizes_name_the_field(size):
    with pytest.raises(ValueError, match="val_size"):
        stratified_indices([0, 1] * 50, size, seed=0)
