"""Is an artifact fresh for a config, and if not why; what is a command missing. One answer for
``selmatch run``, every stand-alone command, ``selmatch tune`` and ``accelerate launch
distill/main.py``.

    check = Freshness(cfg)                       # caches digests for one command
    check.status(Ref("scores", "forgetting"))    # Status(fresh=False, why="made from other experts …")
    check.require("distill")                     # MissingStagesError naming every missing or stale input

An artifact is fresh when it is present and intact, every artifact it reads is fresh, and the
stamp stored beside it equals what the config would make now (:func:`distill.artifacts.made_of`:
its fields, the digests of its inputs, what it took from them, its kind, role and version). A
stale input makes everything downstream stale, with the reason carried along ("its input
experts: 2 of 3 experts not yet trained"). Reading an artifact checks its role and stamp
together: a set copied over another one names the other role.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import json

from distill import integrity, storage
from distill.artifacts import KINDS, ORDER, Ref, digest, made_of, reads, set_of
from distill.config import RunConfig
from distill.config_io import rep_dir, repetition
from distill.methods import FIXED, METHODS, chosen, distill_config, method_name
from distill.selection import Start, needs_search, resolve_start
from distill.synset import load_synset, read_synset_state
from distill.trajectories import ExpertStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Status:
    fresh: bool
    why: str = ""          # what is missing, damaged or changed ("" when fresh)
    missing: bool = False
    damaged: bool = False


FRESH = Status(True)


def url_of(cfg: RunConfig, ref: Ref) -> str:
    """Where ``ref`` of run ``cfg`` lives (a repetition's artifact: in its directory)."""
    kind = KINDS[ref.kind]
    seed = cfg.seed if ref.seed is None else ref.seed
    base = rep_dir(cfg, seed) if kind.per_seed else cfg.run_dir
    return storage.join(base, kind.path.format(name=ref.name))


def explain(stored: dict | None, wanted: dict, limit: int = 4) -> str:
    """What differs between what made an artifact (``stored``, a made_of) and what the config
    asks for now, in words: ``distill.alpha 0.5 → 0.3; other scores forgetting``."""
    if not stored:
        return "its settings are not recorded (made by an older version)"
    if stored.get("artifact") != wanted["artifact"] or stored.get("name") != wanted["name"]:
        return (f"it is the {stored.get('artifact')} {stored.get('name')!r} "
                f"({stored.get('role')}), not the {wanted['artifact']} {wanted['name']!r}")
    parts = []
    if stored.get("version") != wanted["version"]:
        parts.append(f"made by version {stored.get('version')} of its stage, now "
                     f"{wanted['version']}")
    old, new = stored.get("fields", {}), wanted["fields"]
    parts += [f"{k} {old.get(k)!r} → {v!r}" for k, v in new.items() if old.get(k) != v]
    parts += [f"{k} {v!r} → (not used)" for k, v in old.items() if k not in new]
    for key, what in (("inputs", "made from other {}"), ("extra", "another {}")):
        a, b = stored.get(key, {}), wanted[key]
        parts += [what.format(k) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if not parts:
        return "made by another version of the code"
    more = f" (and {len(parts) - limit} more)" if len(parts) > limit else ""
    return "; ".join(parts[:limit]) + more


class MissingStagesError(FileNotFoundError):
    """Inputs a command needs that are missing or stale; :meth:`render` says what to run."""

    def __init__(self, command: str, problems: list[tuple[Ref, Status]]):
        self.command, self.problems = command, list(problems)
        super().__init__(self.render(None))

    def render(self, arguments: str | None) -> str:
        """The message, each command completed with ``arguments`` (the user's ``--config F``,
        ``--run_dir R`` and overrides; ``--config F`` when unknown)."""
        args = arguments if arguments else "--config F"
        what = "missing" if all(s.missing for _, s in self.problems) else "missing or stale"
        lines = [f"{what} earlier stages ({len(self.problems)}) of selmatch {self.command}:"]
        lines += [f"  - {ref}: {status.why}" for ref, status in self.problems]
        commands = list(dict.fromkeys(KINDS[r.kind].made_by for r, _ in self.problems))
        if "selmatch run" in commands:  # it makes the other stages too
            lines += ["make them all with:", f"  selmatch run {args}"]
        else:
            lines.append("make them with, in this order:")
            lines += [f"  {c} {args}" for c in commands]
            lines.append(f"(or run the whole pipeline: selmatch run {args})")
        return "\n".join(lines)


class Freshness:
    """The freshness of ``cfg``'s artifacts, computed once per artifact and kept until
    :meth:`forget` (call it after a stage writes). ``ds``: the dataset, so that a set of
    another shape reads as damaged (and is remade) instead of as fresh."""

    def __init__(self, cfg: RunConfig, ds=None):
        self.cfg, self.ds = cfg, ds
        self._status: dict[Ref, Status] = {}
        self._digest: dict[Ref, str] = {}
        self._window: dict | None = None

    def forget(self) -> None:
        self._status.clear()
        self._digest.clear()
        self._window = None

    def rep(self, ref: Ref) -> RunConfig:
        return repetition(self.cfg, ref.seed) if ref.seed is not None else self.cfg

    def norm(self, ref: Ref) -> Ref:
        """``ref`` with the seed a repetition's artifact has (the run seed when None), so that
        one artifact has one cache entry."""
        if KINDS[ref.kind].per_seed and ref.seed is None:
            return Ref(ref.kind, ref.name, self.cfg.seed)
        return ref

    # -- what a stage takes from the window search ---------------------------------------

    def window(self) -> dict | None:
        """The window search's results (verified), None when it has not run."""
        if self._window is None:
            url = url_of(self.cfg, Ref("window"))
            if not storage.exists(url):
                return None
            self._window = integrity.read_json(url, fix="run `selmatch window --config F` "
                                                        "(or `selmatch run`) to search again")
        return self._window

    def start(self, init: str, beta: float | None) -> Start:
        """The start of (select.init, select.beta): the window search's decision where it
        decides (ValueError naming the missing search otherwise); ``tune`` when the config took
        its values from tune/selected.yaml."""
        source = "tune" if self.cfg.tuned else "config"
        decision = self.window() if needs_search(init, beta) else None
        return resolve_start(init, beta, decision, source=source)

    def start_of(self, ref: Ref, cfg: RunConfig | None = None) -> Start:
        """Where a selection row's or a set's images start (``cfg``: default its repetition's
        config; a set's row fixes what it fixes)."""
        c = cfg or self.rep(ref)
        if ref.kind == "selection":
            init = METHODS[ref.name].init
            if init == "window":
                return Start("window", float(self.window()["best_beta"]), "window search")
            if init in ("random", "topk"):
                return Start(init, None, "the row")
        elif "select.init" in FIXED[ref.name]:
            return Start(FIXED[ref.name]["select.init"], None, "the row")
        else:
            c = distill_config(c, ref.name)
        return self.start(c.select.init, c.select.beta)

    def extra(self, ref: Ref, cfg: RunConfig | None = None) -> dict:
        """What ``ref`` (of config ``cfg``, default its repetition's) takes from the artifacts
        it reads beyond their digests: a window row its β, a set its start."""
        if ref.kind == "scores":  # an imported file: its content
            file = self.cfg.scores.file if ref.name == self.cfg.scores.kind else \
                self.cfg.scores.topk_file
            return {"file": storage.sha256(file)[:16]} if file else {}
        if ref.kind == "alpha_trials":  # the start the β search chose (tune's summary)
            url = storage.join(self.cfg.run_dir, "tune", "summary.json")
            if storage.exists(url):
                chosen = integrity.read_json(url, fix="run `selmatch tune` again")["start"]
                return {"start": Start(chosen["init"], chosen["beta"], "tune").to_dict()}
            return {}
        if ref.kind == "selection" and METHODS[ref.name].init in ("window", "start") or \
                ref.kind in ("set", "init", "checkpoint"):
            return {"start": self.start_of(ref, cfg).to_dict()}
        return {}

    # -- stamps --------------------------------------------------------------------------

    def digest_of(self, ref: Ref) -> str:
        """What a consumer records of input ``ref``: the identity of its content."""
        ref = self.norm(ref)
        if ref not in self._digest:
            self._digest[ref] = self._compute_digest(ref)
        return self._digest[ref]

    def _compute_digest(self, ref: Ref) -> str:
        if ref.kind == "experts":
            return ExpertStore(self.cfg).digest()
        if ref.kind == "window":
            w = self.window()
            return digest({"best_beta": w["best_beta"], "start": w.get("start")})
        url = url_of(self.cfg, ref)
        if ref.kind == "beta_trials" or ref.kind == "alpha_trials":
            return storage.sha256(url)[:16]
        recorded = integrity.recorded(url)
        if recorded is None:
            raise integrity.DamagedArtifactError(url, "no checksum beside it",
                                                 f"run `{KINDS[ref.kind].made_by}` again")
        return recorded[:16]

    def wanted(self, ref: Ref, *, cfg: RunConfig | None = None, more: dict | None = None) -> dict:
        """What ``ref`` would be made of now (its inputs must exist): with ``cfg``, made with
        that config (an α trial's) from this run's inputs, ``more`` added to its extra."""
        c = cfg or self.rep(ref)
        inputs = {str(up): self.digest_of(up) for up in reads(c, ref)}
        return made_of(c, ref, inputs=inputs, extra={**self.extra(ref, c), **(more or {})})

    def stamp(self, ref: Ref) -> str:
        return digest(self.wanted(ref))

    # -- status --------------------------------------------------------------------------

    def status(self, ref: Ref) -> Status:
        ref = self.norm(ref)
        if ref not in self._status:
            self._status[ref] = self._compute_status(ref)
        return self._status[ref]

    def _compute_status(self, ref: Ref) -> Status:
        if ref.kind == "experts":
            return self._experts_status()
        url = url_of(self.cfg, ref)
        try:
            stored = self._stored(ref)
        except integrity.DamagedArtifactError as err:
            return Status(False, str(err), damaged=True)
        if stored is None:
            return Status(False, f"missing: {url} (made by `{KINDS[ref.kind].made_by}`)",
                          missing=True)
        for up in reads(self.cfg, ref):
            s = self.status(up)
            if not s.fresh:
                return Status(False, f"its input {up} is {'missing' if s.missing else 'stale'}"
                                     f" ({s.why})")
        want = self.wanted(ref)
        if stored.get("stamp") == digest(want):
            return FRESH
        return Status(False, f"{url} ({explain(stored.get('made_of'), want)})")

    def _experts_status(self) -> Status:
        store = ExpertStore(self.cfg)
        try:
            if not storage.exists(url_of(self.cfg, Ref("experts"))):
                return Status(False, f"missing: no experts in {store.dir} (experts.num_experts "
                                     f"= {self.cfg.experts.num_experts})", missing=True)
            manifest = store.manifest()
        except (ValueError, integrity.DamagedArtifactError) as err:  # other settings, damaged
            return Status(False, str(err))
        absent = [i for i in store.wanted_ids() if str(i) not in manifest["experts"]]
        if absent:
            return Status(False, f"{len(absent)} of {self.cfg.experts.num_experts} experts not "
                                 f"yet trained in {store.dir}", missing=True)
        return FRESH

    def _stored(self, ref: Ref) -> dict | None:
        """``{"stamp", "made_of"}`` stored with ``ref`` (None: absent); DamagedArtifactError
        when it cannot be read."""
        url = url_of(self.cfg, ref)
        if not storage.exists(url):
            return None
        fix = f"run `{KINDS[ref.kind].made_by}` to make it again"
        if ref.kind in ("selection", "set", "init"):
            if self.ds is None:
                state = read_synset_state(url)
            else:  # of this dataset's shape, or damaged (and remade by its stage)
                run_dir, name = url.rsplit("/synset/", 1)
                state = load_synset(run_dir, name.removesuffix(".pt"),
                                    image_shape=self.ds.image_shape,
                                    num_classes=self.ds.num_classes)[1]
            return state.get("meta", {})
        if ref.kind == "checkpoint":
            return integrity.torch_load(url, fix=fix)
        if ref.kind == "scores":
            url = url.removesuffix(".npy") + ".json"
        if ref.kind == "report":
            url = storage.join(self.cfg.run_dir, "results.json")
        if ref.kind == "tuned":
            url = storage.join(self.cfg.run_dir, "tune", "summary.json")
        if ref.kind in ("beta_trials", "alpha_trials"):  # the file holds one search's trials
            lines = integrity.read_text(url, fix=fix).splitlines()
            last = json.loads(lines[-1]) if lines else {}
            return {"stamp": last.get("settings"), "made_of": last.get("made_of")}
        if not storage.exists(url):
            return None
        return integrity.read_json(url, fix=fix)

    # -- what a command needs ------------------------------------------------------------

    def problems(self, refs: list[Ref]) -> list[tuple[Ref, Status]]:
        """Every artifact of ``refs`` and everything it reads that is not fresh, in stage order,
        the deepest cause first."""
        out: dict[Ref, Status] = {}

        def visit(ref: Ref) -> None:
            ref = self.norm(ref)
            for up in reads(self.cfg, ref):
                visit(up)
            s = self.status(ref)
            if not s.fresh:
                out[ref] = s

        for ref in refs:
            visit(ref)
        return sorted(out.items(), key=lambda kv: (ORDER.index(kv[0].kind), kv[0]))

    def require(self, command: str, refs: list[Ref] | None = None) -> None:
        """MissingStagesError unless every input ``selmatch <command>`` reads is fresh."""
        problems = self.problems(needs(self.cfg, command) if refs is None else refs)
        if problems:
            raise MissingStagesError(command, problems)


def needs(cfg: RunConfig, command: str) -> list[Ref]:
    """The artifacts ``selmatch <command>`` reads (``run`` makes everything itself;
    ``evaluate`` reads the sets present: :func:`present_sets`)."""
    if command == "scores":
        return reads(cfg, Ref("scores", cfg.scores.kind))
    if command == "window":
        return reads(cfg, Ref("window"))
    if command == "tune":
        return [Ref("experts"), Ref("scores", cfg.scores.kind)]
    if command == "distill":
        return reads(cfg, Ref("set", method_name(cfg)))
    if command == "evaluate":
        return [Ref("experts")]
    raise ValueError(f"unknown command {command!r}")


def present_sets(cfg: RunConfig) -> list[Ref]:
    """The sets of the chosen rows that exist in ``cfg``'s run directory (each once)."""
    refs = list(dict.fromkeys(set_of(row, cfg.seed) for row in chosen(cfg)))
    return [r for r in refs if storage.exists(url_of(cfg, r))]

