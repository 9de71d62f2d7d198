"""Trajectory store: one file per expert under ``<run_dir>/experts/`` plus a JSON manifest.

The manifest is the source of truth for what is finished: a worker writes its expert file
(atomically), the driver then records the file's size and sha256 in the manifest (atomically). A
job killed at any point therefore leaves either a recorded, verifiable expert or nothing that
counts, and re-running the same command trains only the missing ones. Loading re-checks size and
checksum, so a truncated or overwritten file is named in the error instead of failing deep inside
``torch.load`` or, worse, loading garbage.
"""

from __future__ import annotations

import dataclasses
import subprocess
from functools import lru_cache

import torch

from distill import storage
from distill.config import RunConfig, config_hash
from distill.experts import ExpertResult

MANIFEST = "manifest.json"
_NOT_HASHED = ("num_experts", "num_cpus", "num_gpus")  # adding experts or resources keeps old ones


def expert_config_hash(cfg: RunConfig) -> str:
    """Hash of everything that changes an expert's numbers (not how many experts, nor resources)."""
    trimmed = dataclasses.replace(
        cfg, experts=dataclasses.replace(cfg.experts, **{k: 0 for k in _NOT_HASHED}))
    return config_hash(trimmed, "data", "model", "experts", "seed")


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
        self.hash = expert_config_hash(cfg)

    # -- manifest ----------------------------------------------------------------------------

    def _manifest_url(self) -> str:
        return storage.join(self.dir, MANIFEST)

    def manifest(self) -> dict:
        """The manifest (an empty one for a new store); a mismatching config is an error."""
        url = self._manifest_url()
        if not storage.exists(url):
            return {"config_hash": self.hash, "dataset": self.cfg.data.name,
                    "model": dataclasses.asdict(self.cfg.model), "epochs": self.cfg.experts.epochs,
                    "seed": self.cfg.seed, "experts": {}}
        manifest = storage.read_json(url)
        if manifest.get("config_hash") != self.hash:
            raise ValueError(
                f"{self.dir} holds experts trained with other settings (config hash "
                f"{manifest.get('config_hash')}, now {self.hash}: data, model, experts.* other "
                f"than num_experts/num_cpus/num_gpus, or seed changed). Use another run_dir or "
                f"delete {self.dir} to retrain.")
        return manifest

    def finished_ids(self) -> list[int]:
        """Experts recorded in the manifest whose file exists with the recorded size."""
        done = []
        for key, entry in self.manifest()["experts"].items():
            url = storage.join(self.dir, entry["file"])
            if storage.exists(url) and storage.size(url) == entry["size"]:
                done.append(int(key))
        return sorted(done)

    def missing_ids(self, num_experts: int | None = None) -> list[int]:
        wanted = range(num_experts if num_experts is not None else self.cfg.experts.num_experts)
        done = set(self.finished_ids())
        return [i for i in wanted if i not in done]

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
        storage.write_json(self._manifest_url(), manifest)

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
        state = storage.torch_load(url, expected_size=entry["size"], expected_sha256=entry["sha256"])
        return ExpertResult.from_state(state)

    def load_all(self) -> list[ExpertResult]:
        ids = self.finished_ids()
        if not ids:
            self._require()
            raise FileNotFoundError(f"no finished experts in {self.dir}; run `selmatch experts`")
        return [self.load(i) for i in ids]

    def trajectory(self, expert_id: int) -> torch.Tensor:
        return self.load(expert_id).trajectory
