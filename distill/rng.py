"""Explicit randomness (docs/design.md §9): one :func:`make_generator` and one table of stream tags.

Every random draw of the pipeline comes from a CPU ``torch.Generator`` seeded from a position
tuple ``(seed, tag, position...)``: the run seed (or a seed derived from it), the tag of the
purpose (:data:`STREAMS`), and where in the run the draw happens (expert, epoch, step,
iteration, class, ...). Nothing reads the clock, so a run resumed or repeated anywhere draws the
same numbers.

The tag numbers are part of every recorded result: changing one changes the draws. Two streams
share 21 (``EVAL_INIT`` and ``RANDOM_SELECTION``, as they always have): their positions have
different lengths, ``(seed, 21)`` and ``(seed, 21, class)``, which SeedSequence mixes into
different streams; :func:`check_streams` checks that no two streams share a tag and a length.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from distill.checks import int_problem


def make_generator(*seeds: int) -> torch.Generator:
    """CPU generator seeded from a position tuple such as (run seed, tag, iteration, step).

    Why SeedSequence: it mixes the tuple into well-separated streams, so (1, 2, 3) and (1, 2, 4)
    or (12, 3) and (1, 23) never collide the way sums or string joins can.
    """
    if not seeds:
        raise ValueError("make_generator needs at least one seed")
    if any(int_problem("seed", s, 0) for s in seeds):
        raise ValueError(f"seeds must be integers >= 0, got {seeds!r}")
    state = np.random.SeedSequence([int(s) for s in seeds]).generate_state(1, dtype=np.uint64)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(state[0]))
    return gen


@dataclass(frozen=True)
class Stream:
    """One purpose's random stream: its tag and the names of the position that follows it."""

    name: str
    tag: int
    position: tuple[str, ...]

    def generator(self, seed: int, *position: int) -> torch.Generator:
        """The generator of ``(seed, tag, *position)``; the position must name every part."""
        if len(position) != len(self.position):
            raise ValueError(f"stream {self.name} takes (seed, {', '.join(self.position) or '-'})"
                             f" after its tag, got {len(position)} position value(s)")
        return make_generator(seed, self.tag, *position)


# experts (distill/experts.py): seed = the run seed
EXPERT_INIT = Stream("expert_init", 11, ("expert",))
EXPERT_SHUFFLE = Stream("expert_shuffle", 12, ("expert", "epoch"))
EXPERT_AUGMENT = Stream("expert_augment", 13, ("expert", "epoch", "step"))
# evaluation networks (distill/evaluate.py): seed = the run's own seed, drawn from EVAL_RUN
EVAL_INIT = Stream("eval_init", 21, ())
EVAL_SHUFFLE = Stream("eval_shuffle", 22, ("epoch",))
EVAL_AUGMENT = Stream("eval_augment", 23, ("epoch", "step"))
EVAL_RUN = Stream("eval_run", 24, ("run",))  # seed = the evaluation's seed (run seed, repetition)
EVAL_RADIUS = Stream("eval_radius", 25, ())  # seed = 0: the radius subset belongs to the dataset
# selection (distill/selection.py): MTT's random initialisation, per class
RANDOM_SELECTION = Stream("random_selection", 21, ("class",))
# the matching step (distill/matching.py): batches, then each step's DSA parameters
MATCH_PLAN = Stream("match_plan", 31, ("iteration",))
MATCH_AUGMENT = Stream("match_augment", 32, ("iteration", "step"))
# the distiller (distill/distiller.py): which expert and start epoch an iteration matches
SEGMENT = Stream("segment", 41, ("iteration",))
# the validation split of the window search and the tune trials (distill/search.py)
VALIDATION_SPLIT = Stream("validation_split", 51, ("class",))

STREAMS: tuple[Stream, ...] = (
    EXPERT_INIT, EXPERT_SHUFFLE, EXPERT_AUGMENT, EVAL_INIT, EVAL_SHUFFLE, EVAL_AUGMENT, EVAL_RUN,
    EVAL_RADIUS, RANDOM_SELECTION, MATCH_PLAN, MATCH_AUGMENT, SEGMENT, VALIDATION_SPLIT,
)


def check_streams(streams: tuple[Stream, ...] = STREAMS) -> None:
    """Raise unless every (tag, position length) and every name is used once."""
    keys = [(s.tag, len(s.position)) for s in streams]
    names = [s.name for s in streams]
    if len(set(keys)) != len(keys) or len(set(names)) != len(names):
        raise ValueError(f"random streams collide: {sorted(keys)} / {sorted(names)}")


check_streams()  # at import: a new stream that collides with another fails every command


def derived_seed(gen: torch.Generator) -> int:
    """An integer seed drawn from ``gen`` (for ``torch.manual_seed`` before building a network)."""
    return int(torch.randint(0, 2**62, (1,), generator=gen))


@contextlib.contextmanager
def seeded(gen: torch.Generator) -> Iterator[None]:
    """Run with torch's global CPU RNG seeded from ``gen`` (network initialisation, which draws
    from the global RNG), leaving the caller's RNG state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(gen))
        yield
