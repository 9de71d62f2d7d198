"""What a command needs from the stages before it, checked all at once before it starts.

    require_stages(cfg, "distill")   # MissingStagesError naming every missing stage, in order

| stage | artifact | made by |
| --- | --- | --- |
| experts | ``experts/manifest.json`` recording experts 0 … ``experts.num_experts`` − 1 | ``selmatch experts`` |
| scores | ``scores/<scores.kind>.npy`` (computed from the experts, or imported from ``scores.file``) | ``selmatch scores`` |
| synsets | ``synset/<set>.pt`` of at least one chosen row | ``selmatch run`` (or ``selmatch distill``) |

A missing stage brings the stages it needs itself (scores computed from experts need the
experts), so one message lists everything to run, in order; the entry point (launch/exits.py)
adds the user's own ``--config``, ``--run_dir`` and overrides to each command. This checks that
the artifacts exist; whether they are intact and fresh is each reader's check.
"""

from __future__ import annotations

from dataclasses import dataclass

from distill import storage
from distill.config import RunConfig
from distill.methods import METHODS, chosen
from distill.scores import scores_exist
from distill.trajectories import ExpertStore

ORDER = ("experts", "scores", "synsets")
MAKES = {"experts": "selmatch experts", "scores": "selmatch scores", "synsets": "selmatch run"}


def _needs(cfg: RunConfig, stage: str) -> tuple[str, ...]:
    """The stages ``stage``'s own command reads."""
    if stage == "scores":
        return () if cfg.scores.file else ("experts",)
    if stage == "synsets":
        return ("experts",) + (() if cfg.select.init == "random" else ("scores",))
    return ()


def command_needs(cfg: RunConfig, command: str) -> tuple[str, ...]:
    """The stages ``selmatch <command>`` reads (``run`` makes everything itself)."""
    if command == "distill":
        return ("experts",) + (() if cfg.select.init == "random" else ("scores",))
    if command in ("window", "tune"):
        return ("experts", "scores") if command == "tune" else ("scores",)
    if command == "evaluate":
        return ("experts", "synsets")  # the experts give the easy/hard split and coverage
    if command == "scores":
        return _needs(cfg, "scores")
    return ()


def why_missing(cfg: RunConfig, stage: str) -> str | None:
    """What is missing of ``stage``'s artifact (None = present)."""
    if stage == "experts":
        store = ExpertStore(cfg)
        if not storage.exists(storage.join(store.dir, "manifest.json")):
            return f"no experts in {store.dir} (experts.num_experts = {cfg.experts.num_experts})"
        recorded = store.manifest()["experts"]
        absent = [i for i in store.wanted_ids() if str(i) not in recorded]
        if absent:
            return (f"{len(absent)} of {cfg.experts.num_experts} experts not yet trained in "
                    f"{store.dir}")
        return None
    if stage == "scores":
        if scores_exist(cfg.run_dir, cfg.scores.kind):
            return None
        return f"no {cfg.scores.kind} scores in {storage.join(cfg.run_dir, 'scores')}"
    if stage == "synsets":
        names = {METHODS[m].synset for m in chosen(cfg)}
        if any(storage.exists(storage.join(cfg.run_dir, "synset", f"{n}.pt")) for n in names):
            return None
        return (f"no synthetic set of the chosen rows in {storage.join(cfg.run_dir, 'synset')} "
                f"({', '.join(sorted(names))})")
    raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(ORDER)}")


@dataclass(frozen=True)
class Missing:
    stage: str
    why: str

    @property
    def command(self) -> str:
        return MAKES[self.stage]


class MissingStagesError(FileNotFoundError):
    """Stages a command needs that have not run; :meth:`render` says what to run."""

    def __init__(self, command: str, missing: list[Missing]):
        self.command, self.missing = command, list(missing)
        super().__init__(self.render(None))

    def render(self, arguments: str | None) -> str:
        """The message, each command completed with ``arguments`` (the user's ``--config F``,
        ``--run_dir R`` and overrides; ``--config F`` when unknown)."""
        args = arguments if arguments else "--config F"
        lines = [f"missing earlier stages ({len(self.missing)}) of selmatch {self.command}:"]
        lines += [f"  - {m.stage}: {m.why}" for m in self.missing]
        commands = list(dict.fromkeys(m.command for m in self.missing))
        if "selmatch run" in commands:  # it makes the other stages too
            lines += ["make them all with:", f"  selmatch run {args}"]
        else:
            lines.append("make them with, in this order:")
            lines += [f"  {c} {args}" for c in commands]
            lines.append(f"(or run the whole pipeline: selmatch run {args})")
        return "\n".join(lines)


def missing_stages(cfg: RunConfig, command: str) -> list[Missing]:
    """Every stage ``command`` needs that is missing, with the stages those need, in order."""
    found: dict[str, str] = {}

    def visit(stage: str) -> None:
        why = why_missing(cfg, stage)
        if why is None or stage in found:
            return
        found[stage] = why
        for dep in _needs(cfg, stage):
            visit(dep)

    for stage in command_needs(cfg, command):
        visit(stage)
    return [Missing(s, found[s]) for s in ORDER if s in found]


def require_stages(cfg: RunConfig, command: str) -> None:
    """Raise :class:`MissingStagesError` unless every stage ``command`` needs has run."""
    missing = missing_stages(cfg, command)
    if missing:
        raise MissingStagesError(command, missing)
