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


def team_problems(team_size: int, *, group: int | None = None,
                  ranks: int | None = None) -> list[str]:
    """What is wrong with ``distill.group_ranks`` = ``team_size`` for BN groups of ``group``
    rows and ``ranks`` ranks (either may be unknown: None): it must divide both, since each rank
    of a team holds an equal share of every group and teams are whole. The one rule that config
    validation, the estimate, the runtime and the matching plan apply."""
    out = []
    if ranks is not None and ranks % team_size:
        out.append(f"distill.group_ranks ({team_size}) must divide the number of ranks "
                   f"({ranks}): each BN group is spread over that many ranks")
    if group is not None and group % team_size:
        out.append(f"distill.group_ranks ({team_size}) must divide the BN group size ({group}, "
                   f"distill.bn_group or the batch): each rank of a group's team holds an equal "
                   f"share of its rows")
    return out


def check_team(team_size: int, *, group: int | None = None, ranks: int | None = None) -> None:
    """ValueError listing :func:`team_problems` (none: returns)."""
    problems = team_problems(team_size, group=group, ranks=ranks)
    if problems:
        raise ValueError("; ".join(problems))
