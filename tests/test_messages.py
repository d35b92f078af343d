"""Error messages that list what they found say when they cut the list (layermoe/messages.py)."""

from hypothesis import given
from hypothesis import strategies as st

from layermoe.messages import listed, listed_lines


def test_short_list_is_listed_whole():
    assert listed(["a", "b"], 3) == "a, b"
    assert listed([], 3) == ""


def test_long_list_says_how_many_were_left_out():
    assert listed(range(10), 3) == "0, 1, 2, ... and 7 more"
    assert listed_lines(["x", "y", "z"], 2) == "x\n  y\n  ... and 1 more"


@given(st.lists(st.text(alphabet="abc", min_size=1, max_size=3), max_size=20), st.integers(1, 8))
def test_every_item_is_shown_or_counted(items, limit):
    text = listed(items, limit, sep="|")
    parts = text.split("|")
    shown = [p for p in parts if not p.startswith("... and ")] if items else []
    counted = int(parts[-1].split()[2]) if parts[-1].startswith("... and ") else 0
    assert shown == items[:limit]
    assert len(shown) + counted == len(items)
