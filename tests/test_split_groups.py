"""One BN group spread over several ranks (``distill.group_ranks``) computes what one process
computes with whole groups: float64, ≤ 1e-10 relative (docs/design.md §4).

Each member of a team holds g / R rows of every group of its team; batch norm sums its
statistics over the team with a differentiable all-reduce, so the replay's double backward
reaches every member's rows. Two gloo ranks run one launch for every scenario; four ranks (two
teams of two, i.e. groups among teams and each group over a team) run in the slow suite.
"""

from __future__ import annotations

import pytest
import torch

from distill.config import ConfigError
from distill.matching import LOCAL, MatchPlan, Student, match_replay, rank_share
from ranks import cfg_for, launch, match_problem, recipe_vs_one_process, rel, run_distiller
from tiny import prepare

# (|b| / g, g) of the single matching steps: one group split 2 + 2, two groups split, and
# groups of 4 split 2 + 2 with DSA
MATCH = ((1, 4), (2, 4), (4, 4))


def split_problem(groups: int, group: int, team):
    student, start, target, images, labels, lr, plan = match_problem(groups * group // 2)
    plan = MatchPlan(plan.steps, group) if groups * group == plan.batch else None
    assert plan is not None
    return (Student.of(student.model, student.dsa, torch.float64, "cpu", team=team), start,
            target, images, labels, lr, plan)


def whole_groups_problem(groups: int, group: int):
    student, start, target, images, labels, lr, plan = match_problem(groups * group // 2)
    return student, start, target, images, labels, lr, MatchPlan(plan.steps, group)


def _split_scenarios(rt, run_dir: str, team_size: int) -> dict:
    team = rt.team(team_size)
    out: dict = {"team": (team.index, team.member, team.count)}
    for groups, group in MATCH:
        res = match_replay(*split_problem(groups, group, team), comm=rt)
        out[f"match_{groups}x{group}"] = (res.loss, res.grad_images, res.grad_lr)
    for group in (4, 16):
        out[f"distill_g{group}"] = run_distiller(run_dir, torch.float64, comm=rt,
                                                 is_main=rt.is_main, bn_group=group,
                                                 group_ranks=team_size)
    student, theta, _, images, labels, _, plan = split_problem(2, 4, team)  # no idle team
    share = rank_share(plan, rt.rank, rt.world_size, team_size)
    before = team.collectives
    rows, _ = share.rows(plan.steps[0])
    student.steps.gradient(theta, images[rows], labels[rows], None, group=share.group_rows,
                           batch=plan.batch)
    middle = team.collectives
    student.steps.replay(theta, images[rows], labels[rows], None, torch.ones_like(theta),
                         group=share.group_rows, batch=plan.batch)
    out["collectives"] = (middle - before, team.collectives - middle)
    return out


def launch_teams(out_dir, run_dir, world: int, team_size: int, timeout: float) -> list[dict]:
    return launch(_split_scenarios, world=world, args=(str(run_dir), team_size), out_dir=out_dir,
                  timeout=timeout)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("split_prepared")
    prepare(cfg_for(root))
    return root


def check(ranks, prepared):
    for groups, group in MATCH:
        ref = match_replay(*whole_groups_problem(groups, group))
        assert ref.grad_images.abs().sum() > 0
        for r in ranks:
            loss, gx, glr = r[f"match_{groups}x{group}"]
            err = max(rel(loss, ref.loss), rel(gx, ref.grad_images), rel(glr, ref.grad_lr))
            assert err <= 1e-10, (groups, group, r["rank"], err)
    for group in (4, 16):
        one, lr_one = run_distiller(prepared, torch.float64, bn_group=group)
        for r in ranks:
            got, lr_got = r[f"distill_g{group}"]
            assert rel(got, one) <= 1e-10, (group, rel(got, one))
            assert abs(float(lr_got - lr_one)) <= 1e-10 * abs(float(lr_one))
    # match_problem's student has two BN layers: per layer, 4 all-reduces of the team per step
    # gradient (2 forward: sum, centred squares; 2 backward) and 8 per replayed step
    assert all(r["collectives"] == (2 * 4, 2 * 8) for r in ranks), [r["collectives"] for r in ranks]


def test_one_group_over_two_ranks_equals_one_process(prepared, tmp_path):
    ranks = launch_teams(tmp_path, prepared, world=2, team_size=2, timeout=300)
    assert [r["team"] for r in ranks] == [(0, 0, 1), (0, 1, 1)]
    check(ranks, prepared)


@pytest.mark.slow
def test_two_teams_of_two_ranks_equal_one_process(prepared, tmp_path):
    """Four ranks: groups divided between two teams, each group spread over a team's two."""
    ranks = launch_teams(tmp_path, prepared, world=4, team_size=2, timeout=900)
    assert [r["team"] for r in ranks] == [(0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2)]
    check(ranks, prepared)


def test_group_ranks_must_divide_the_group_and_the_ranks(tmp_path):
    with pytest.raises(ConfigError, match=r"distill.group_ranks \(3\) must divide the BN group"):
        cfg_for(tmp_path, bn_group=4, group_ranks=3)
    plan = whole_groups_problem(1, 4)[-1]
    with pytest.raises(ValueError, match=r"must divide the BN group size \(4, distill.bn_group or the batch\)"):
        rank_share(plan, 0, 3, 3)
    with pytest.raises(ValueError, match=r"must divide the number of ranks \(3\)"):
        rank_share(plan, 0, 3, 2)
    with pytest.raises(ValueError, match=r"must divide the number of ranks \(1\)"):
        LOCAL.team(2)


def test_rank_share_positions():
    plan = whole_groups_problem(2, 4)[-1]  # |b| = 8, g = 4
    shares = [rank_share(plan, r, 4, 2) for r in range(4)]  # two teams of two
    assert [s.positions.tolist() for s in shares] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    shares = [rank_share(plan, r, 2, 2) for r in range(2)]  # one team: both groups split
    assert [s.positions.tolist() for s in shares] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert all(s.group_rows == 2 for s in shares)
    whole = rank_share(plan, 1, 2, 1)
    assert (whole.lo, whole.hi, whole.positions, whole.group_rows) == (4, 8, None, 4)


def test_accelerate_launch_with_split_groups(prepared, tmp_path):
    """``accelerate launch`` with cpu_2proc.yaml and ``--distill.group_ranks 2``: two real ranks,
    each BN group (g = 10) spread over both; the set matches one process up to float32 noise."""
    log, err = recipe_vs_one_process(prepared, tmp_path, "--distill.group_ranks", "2")
    assert "each BN group over 2 ranks" in log, log[-3000:]
    print(f"\naccelerate launch, group_ranks 2 vs one process (float32, 4 iterations): {err:.2e}")
    assert err < 1e-5
