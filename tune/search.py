"""Unimodal grid search (the paper's App. E): a pure state machine, no Ray.

SelMatch's accuracy-vs-β and accuracy-vs-α curves are concave (paper Fig. 3, 4a), so instead of
the whole grid we start in the middle, probe both neighbours, walk towards the better one and stop
as soon as the metric no longer improves. Across IPCs the optima only decrease, so the optimum found
at a smaller IPC is an upper bound for the next one (``bound`` of
:func:`distill.baselines.make_grid`, the grid both searches share).

    climb = HillClimb(make_grid(0.0, 1.0, 0.1))     # distill.baselines.make_grid
    while (value := climb.suggest()) is not None:   # or several at once, up to max_in_flight
        climb.observe(value, evaluate(value))         # None / NaN = failed trial
    climb.best()                                      # (value, metric) or None

Rules (pinned by tests/test_tune.py):

* The incumbent is the best observed point: highest metric (``mode="max"``; lowest for "min"),
  ties broken by distance to the start, then by lower value, so the walk depends only on *which*
  points were observed, never on the order in which parallel trials finished.
* Until the start is observed, suggestions are the start and its two neighbours; then they are
  the not-yet-tried grid neighbours of the incumbent. Nothing is ever suggested twice, so the
  search ends after at most ``len(grid)`` trials whatever the metric does (plateaus, noise,
  failures).
* The search is finished when both neighbours of the incumbent have been observed (or lie off the
  grid) and no trial is pending: neither neighbour improves on it.
* A failed trial (metric None, NaN or infinite) is recorded with status "failed" and counts as the
  worst possible value for the walk; it is never the result of :meth:`HillClimb.best`.
* :meth:`HillClimb.observe` also accepts values that were not suggested (finished trials replayed
  from an earlier, interrupted search), as long as they lie on the grid and are new.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from distill.checks import check_int

MODES = ("max", "min")


@dataclass(frozen=True)
class Observation:
    """One finished trial: its grid value, its metric (None when it failed) and its status."""

    value: float
    metric: float | None
    status: str  # "ok" or "failed"
    order: int  # 0, 1, ... in the order the observations arrived

    def to_dict(self) -> dict:
        return asdict(self)


def is_failure(metric: float | None) -> bool:
    return metric is None or not math.isfinite(float(metric))


class HillClimb:
    """Hill-climb on a 1-D grid of values; see the module docstring for the rules."""

    def __init__(self, grid: Sequence[float], *, start: float | None = None, mode: str = "max",
                 max_in_flight: int = 2):
        if not grid:
            raise ValueError("the grid is empty")
        if list(grid) != sorted(set(grid)):
            raise ValueError(f"grid values must be strictly increasing, got {list(grid)}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        check_int("max_in_flight", max_in_flight)
        self.grid = [float(v) for v in grid]
        self.mode = mode
        self.max_in_flight = max_in_flight
        self.start = (len(self.grid) - 1) // 2 if start is None else self.index(start, snap=True)
        self.history: list[Observation] = []
        self._score: dict[int, float] = {}  # grid index -> signed metric (-inf when failed)
        self._pending: list[int] = []

    # -- grid positions ----------------------------------------------------------------------

    def index(self, value: float, *, snap: bool = False) -> int:
        """Grid index of ``value``; with ``snap`` the nearest grid point (for a prior start)."""
        nearest = min(range(len(self.grid)), key=lambda i: (abs(self.grid[i] - value), i))
        if not snap and abs(self.grid[nearest] - value) > 1e-6:
            raise ValueError(f"{value!r} is not on the grid {self.grid}")
        return nearest

    def _key(self, i: int) -> tuple[float, int, int]:
        return self._score[i], -abs(i - self.start), -i

    def _incumbent(self) -> int | None:
        return max(self._score, key=self._key) if self._score else None

    def _candidates(self) -> list[int]:
        """Grid points the walk needs next, not yet observed or pending, most useful first."""
        if self.start not in self._score:  # the start and both its neighbours come first
            wanted = [self.start, self.start - 1, self.start + 1]
        else:
            best = self._incumbent()
            wanted = [best - 1, best + 1]
        return [i for i in wanted if 0 <= i < len(self.grid)
                and i not in self._score and i not in self._pending]

    # -- the protocol ------------------------------------------------------------------------

    def suggest(self) -> float | None:
        """The next value to try; None when finished or when waiting for pending trials."""
        if len(self._pending) >= self.max_in_flight:
            return None
        candidates = self._candidates()
        if not candidates:
            return None
        self._pending.append(candidates[0])
        return self.grid[candidates[0]]

    def observe(self, value: float, metric: float | None) -> Observation:
        """Record a finished trial; None, NaN or an infinite metric marks it failed."""
        i = self.index(value)
        if i in self._score:
            raise ValueError(f"{self.grid[i]:g} was already observed; a grid point is tried once")
        if i in self._pending:
            self._pending.remove(i)
        failed = is_failure(metric)
        sign = 1.0 if self.mode == "max" else -1.0
        self._score[i] = -math.inf if failed else sign * float(metric)
        obs = Observation(self.grid[i], None if failed else float(metric),
                          "failed" if failed else "ok", len(self.history))
        self.history.append(obs)
        return obs

    # -- state -------------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return not self._pending and not self._candidates()

    def best(self) -> tuple[float, float] | None:
        """(value, metric) of the best successful trial; None while no trial succeeded."""
        best = self._incumbent()
        if best is None or self._score[best] == -math.inf:
            return None
        return self.grid[best], next(o.metric for o in self.history if o.value == self.grid[best])

    def summary(self) -> dict:
        best = self.best()
        return {"grid": list(self.grid), "grid_size": len(self.grid),
                "start": self.grid[self.start], "mode": self.mode,
                "trials": len(self.history),
                "failed": sum(o.status == "failed" for o in self.history),
                "best_value": None if best is None else best[0],
                "best_metric": None if best is None else best[1],
                "finished": self.finished}
