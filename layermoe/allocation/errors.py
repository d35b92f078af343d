"""The one exception type of the allocation package.

A separate class (subclassing ``ValueError``) lets the callback tell "this budget/bounds/score input can
never give a layout" apart from bugs, and lets users catch it without importing anything heavier.
"""


class AllocationError(ValueError):
    """Bad allocation input: the message names the offending field and how to fix it."""
