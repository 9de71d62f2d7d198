"""Explicit randomness: one make_generator, one table of stream tags (distill/rng.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from distill import rng
from distill.rng import STREAMS, Stream, check_streams, make_generator


def test_make_generator_reproducible_and_distinct():
    a = torch.rand(4, generator=make_generator(1, 2, 3))
    assert torch.equal(a, torch.rand(4, generator=make_generator(1, 2, 3)))
    assert not torch.equal(a, torch.rand(4, generator=make_generator(1, 2, 4)))
    assert not torch.equal(torch.rand(4, generator=make_generator(12, 3)),
                           torch.rand(4, generator=make_generator(1, 23)))
    with pytest.raises(ValueError):
        make_generator(-1)


def test_stream_tags_are_pinned():
    """The tags are part of every recorded result (benchmarks, tests): a changed number changes
    the draws of that stream everywhere."""
    assert {s.name: (s.tag, s.position) for s in STREAMS} == {
        "expert_init": (11, ("expert",)),
        "expert_shuffle": (12, ("expert", "epoch")),
        "expert_augment": (13, ("expert", "epoch", "step")),
        "eval_init": (21, ()),
        "eval_shuffle": (22, ("epoch",)),
        "eval_augment": (23, ("epoch", "step")),
        "eval_run": (24, ("run",)),
        "eval_radius": (25, ()),
        "random_selection": (21, ("class",)),
        "match_plan": (31, ("iteration",)),
        "match_augment": (32, ("iteration", "step")),
        "segment": (41, ("iteration",)),
        "validation_split": (51, ("class",)),
    }
    assert set(STREAMS) == {v for v in vars(rng).values() if isinstance(v, Stream)}


def test_streams_never_collide():
    check_streams()
    clash = dataclasses.replace(rng.SEGMENT, name="other")  # same tag and position length
    with pytest.raises(ValueError, match="collide"):
        check_streams((*STREAMS, clash))


def test_a_stream_is_its_tag_in_the_position_tuple_and_needs_every_part():
    a = torch.rand(3, generator=rng.EXPERT_SHUFFLE.generator(7, 1, 2))
    assert torch.equal(a, torch.rand(3, generator=make_generator(7, 12, 1, 2)))
    with pytest.raises(ValueError, match=r"expert_shuffle takes \(seed, expert, epoch\)"):
        rng.EXPERT_SHUFFLE.generator(7, 1)


def test_seeded_restores_the_global_rng():
    torch.manual_seed(3)
    before = torch.get_rng_state()
    with rng.seeded(make_generator(1)):
        first = torch.rand(2)
    assert torch.equal(torch.get_rng_state(), before)
    with rng.seeded(make_generator(1)):
        assert torch.equal(torch.rand(2), first)
