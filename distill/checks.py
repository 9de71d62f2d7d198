"""The argument check library functions share, worded once: "<name> must be an integer >= k".

A leaf (no project imports), so every module may use it. A bool is not an integer here (True
would pass ``isinstance(True, int)``); numpy integers are.
"""

from __future__ import annotations

import numbers
from typing import Any


def int_problem(name: str, value: Any, low: int = 1) -> str | None:
    """``"<name> must be an integer >= <low>, got <value!r>"`` unless ``value`` is one."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        return f"{name} must be an integer >= {low}, got {value!r}"
    return None


def check_int(name: str, value: Any, low: int = 1) -> int:
    """``value`` when it is an integer >= ``low``; a ValueError naming it otherwise."""
    problem = int_problem(name, value, low)
    if problem is not None:
        raise ValueError(problem)
    return value
