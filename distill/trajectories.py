"""Trajectory store: one file per expert under ``<run_dir>/experts/`` plus a JSON manifest.

The manifest is the source of truth for what is finished: a worker writes its expert file
(atomically), the driver then records the file's size and sha256 in the manifest (atomically). A
job killed at any point therefore leaves either a recorded, verifiable expert or nothing that
counts, and re-running the same command trains only the missing ones. Loading re-checks size and
checksum, so a truncated or overwritten file is named in the error instead of failing deep inside
``torch.load`` or, worse, loading garbage.

A run uses exactly experts 0 .. experts.num_experts - 1. A missing or damaged one is an error
naming the file (:meth:`ExpertStore.require`), never skipped: a run on fewer experts than
configured would look valid. ``selmatch experts`` checks every recorded file's sha256 and retrains
the damaged ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import subprocess
from collections import OrderedDict
from functools import lru_cache

import torch

from distill import integrity, storage
from distill.config import RunConfig
from distill.experts import ExpertResult
from distill.artifacts import digest, expert_settings

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


@lru_cache(maxsize=1)
def code_version() -> str:
    """git commit of the code that produced an artifact ('unknown' outside a checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=__file__.rsplit("/", 2)[0])
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class ExpertStore:
    """Experts of one run directory."""

    def __init__(self, cfg: RunConfig, run_dir: str | None = None):
        self.cfg = cfg
        self.dir = storage.join(run_dir or cfg.run_dir, "experts")
        # the freshness stamp of one expert (everything that changes its numbers, not how many
        # experts nor resources), stored as the manifest's "config_hash"
        self.hash = expert_settings(cfg)

    # -- manifest ----------------------------------------------------------------------------

    def _manifest_url(self) -> str:
        return storage.join(self.dir, MANIFEST)

    def _empty(self) -> dict:
        return {"config_hash": self.hash, "dataset": self.cfg.data.name,
                "model": dataclasses.asdict(self.cfg.model), "epochs": self.cfg.experts.epochs,
                "seed": self.cfg.seed, "experts": {}}

    def _read_manifest(self, url: str) -> dict:
        """The manifest's JSON, verified (distill/integrity.py: a manifest without its sidecar is
        damaged, since it is what verifies every expert file) and checked for the structure the
        store relies on."""
        fix = ("run `selmatch experts --config F`: it moves the damaged manifest aside and "
               "trains the experts again (their files cannot be verified without it)")
        text = integrity.read_text(url, fix=fix)  # no sidecar: damaged (it verifies every file)
        manifest = integrity.parse_json(url, text, fix=fix)
        experts = manifest.get("experts")
        if not isinstance(experts, dict):
            raise integrity.DamagedArtifactError(url, "no 'experts' mapping", fix)
        for key, entry in experts.items():
            missing = [k for k in ("file", "size", "sha256")
                       if not isinstance(entry, dict) or k not in entry]
            if not key.isdigit() or missing:
                raise integrity.DamagedArtifactError(
                    url, f"expert entry {key!r} lacks {', '.join(missing) or 'a numeric id'}", fix)
        return manifest

    def manifest(self) -> dict:
        """The manifest (an empty one for a new store); a mismatching config is an error, a
        damaged manifest a DamagedArtifactError naming it."""
        url = self._manifest_url()
        if not storage.exists(url):
            return self._empty()
        manifest = self._read_manifest(url)
        if manifest.get("config_hash") != self.hash:
            raise ValueError(
                f"{self.dir} holds experts trained with other settings (config hash "
                f"{manifest.get('config_hash')}, now {self.hash}: data, model, experts.* other "
                f"than num_experts/num_cpus/num_gpus, or seed changed). Use another run_dir or "
                f"delete {self.dir} to retrain.")
        return manifest

    def repair_or_manifest(self) -> dict:
        """:meth:`manifest`, except that a damaged one is moved aside (``manifest.json.damaged``,
        with a warning) and a new, empty one is returned: every expert is then trained again."""
        try:
            return self.manifest()
        except integrity.DamagedArtifactError as err:
            url = self._manifest_url()
            aside = url + ".damaged"
            storage.write_bytes(aside, storage.read_bytes(url))
            integrity.remove(url)
            log.warning("%s is damaged (%s); moved aside to %s: training every expert again",
                        url, err.problem, aside)
            return self._empty()

    def wanted_ids(self) -> list[int]:
        """The experts a run uses: 0 .. experts.num_experts - 1, all of them."""
        return list(range(self.cfg.experts.num_experts))

    def problem(self, expert_id: int, *, deep: bool = True, manifest: dict | None = None) -> str | None:
        """Why expert ``expert_id`` cannot be used (None = it can): not recorded, file missing,
        size or (with ``deep``) sha256 different from the manifest's record."""
        entry = (manifest or self.manifest())["experts"].get(str(expert_id))
        if entry is None:
            return f"expert {expert_id} is not recorded in {self._manifest_url()}"
        url = storage.join(self.dir, entry["file"])
        if not storage.exists(url):
            return f"{url} is recorded in the manifest but missing"
        size = storage.size(url)
        if size != entry["size"]:
            return f"{url}: size {size} bytes, expected {entry['size']} (truncated or overwritten)"
        if deep and storage.sha256(url) != entry["sha256"]:
            return f"{url}: sha256 differs from the manifest's record (corrupt or altered file)"
        return None

    def finished_ids(self, *, deep: bool = False) -> list[int]:
        """Recorded experts whose file is intact (size; with ``deep`` also the sha256)."""
        manifest = self.manifest()
        ids = sorted(int(k) for k in manifest["experts"])
        return [i for i in ids if self.problem(i, deep=deep, manifest=manifest) is None]

    def missing_ids(self, num_experts: int | None = None, *, deep: bool = False) -> list[int]:
        wanted = range(num_experts if num_experts is not None else self.cfg.experts.num_experts)
        done = set(self.finished_ids(deep=deep))
        return [i for i in wanted if i not in done]

    def require(self, *, deep: bool = True) -> list[int]:
        """The ids of :meth:`wanted_ids`, after checking that every one of them is intact.

        Never drops an expert silently: a missing expert raises FileNotFoundError, a truncated or
        corrupt file ValueError naming the file, both saying how to repair it."""
        self._require()
        manifest = self.manifest()
        problems = {i: self.problem(i, deep=deep, manifest=manifest) for i in self.wanted_ids()}
        bad = {i: p for i, p in problems.items() if p is not None}
        if not bad:
            return self.wanted_ids()
        fix = ("run `selmatch experts --config F` to train or retrain them "
               f"(experts.num_experts = {self.cfg.experts.num_experts})")
        lines = "; ".join(bad.values())
        if all("not recorded" in p for p in bad.values()):
            raise FileNotFoundError(f"{len(bad)} of {len(problems)} experts missing in {self.dir}: "
                                    f"{lines}; {fix}")
        raise ValueError(f"{len(bad)} of {len(problems)} experts in {self.dir} cannot be used: "
                         f"{lines}; {fix}")

    def digest(self) -> str:
        """Identity of the experts a run uses (settings and each file's sha256), for the freshness
        stamps of what is computed from them. Reads only the manifest."""
        entries = self.manifest()["experts"]
        return digest({"settings": self.hash,
                       "files": [entries.get(str(i), {}).get("sha256") for i in self.wanted_ids()]})

    # -- write -------------------------------------------------------------------------------

    @staticmethod
    def filename(expert_id: int) -> str:
        return f"expert_{expert_id:04d}.pt"

    def save(self, result: ExpertResult) -> dict:
        """Write one expert file (atomic); returns the manifest entry for :meth:`record`."""
        name = self.filename(result.expert_id)
        url = storage.join(self.dir, name)
        sha = storage.torch_save(url, result.to_state())
        return {"id": result.expert_id, "file": name, "size": storage.size(url), "sha256": sha,
                "test_acc": [round(a, 6) for a in result.test_acc],
                "train_loss": [round(v, 6) for v in result.train_loss],
                "seconds": round(result.seconds, 3)}

    def record(self, entry: dict) -> None:
        """Add a finished expert to the manifest (driver only; atomic rewrite)."""
        manifest = self.manifest()
        manifest["experts"][str(entry["id"])] = {k: v for k, v in entry.items() if k != "id"}
        manifest["code_version"] = code_version()
        integrity.write_json(self._manifest_url(), manifest)

    # -- read --------------------------------------------------------------------------------

    def _require(self) -> dict:
        if not storage.exists(self._manifest_url()):
            raise FileNotFoundError(
                f"no experts in {self.dir}; create them with `selmatch experts --config F`")
        return self.manifest()

    def load(self, expert_id: int) -> ExpertResult:
        """Load and verify one expert (size and sha256 against the manifest)."""
        entry = self._require()["experts"].get(str(expert_id))
        if entry is None:
            raise FileNotFoundError(
                f"expert {expert_id} is not in {self._manifest_url()}; run `selmatch experts "
                f"--config F` to train the missing experts")
        url = storage.join(self.dir, entry["file"])
        if not storage.exists(url):
            raise FileNotFoundError(f"{url} is recorded in the manifest but missing; re-run "
                                    f"`selmatch experts --config F`")
        fix = "run `selmatch experts --config F` to retrain it"
        data = storage.read_bytes(url)
        if len(data) != entry["size"]:
            raise integrity.DamagedArtifactError(
                url, f"size {len(data)} bytes, expected {entry['size']} (truncated or overwritten)",
                fix)
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise integrity.DamagedArtifactError(
                url, "sha256 differs from the manifest's record (corrupt or altered file)", fix)
        state = integrity.torch_from_bytes(url, data, fix=fix)
        try:
            return ExpertResult.from_state(state)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise integrity.DamagedArtifactError(
                url, f"not an expert file ({type(err).__name__}: {err})", fix) from err

    def load_all(self) -> list[ExpertResult]:
        """Every expert of :meth:`wanted_ids`, verified; a missing or damaged one is an error."""
        return [self.load(i) for i in self.require(deep=False)]

    def trajectory(self, expert_id: int) -> torch.Tensor:
        return self.load(expert_id).trajectory


class TrajectoryCache:
    """Expert trajectories loaded on demand, the most recent ``size`` kept in memory."""

    SIZE = 8  # default; distill/preflight.py reports the host memory it takes

    def __init__(self, store: ExpertStore, size: int = SIZE):
        self.store, self.size = store, size
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()

    def __call__(self, expert_id: int) -> torch.Tensor:
        if expert_id in self._cache:
            self._cache.move_to_end(expert_id)
        else:
            self._cache[expert_id] = self.store.trajectory(expert_id)
            if len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return self._cache[expert_id]
