"""How the checkpoint checks word what they found."""

from __future__ import annotations

from collections.abc import Sequence


def listed_problems(problems: Sequence[str], limit: int) -> str:
    """The first ``limit`` problems, one per indented line, then how many more there are: an error stays
    readable when a whole model's worth of parameters disagrees."""
    listed = "\n  ".join(problems[:limit])
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return listed + more
