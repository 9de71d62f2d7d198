"""The Ray cluster recipe of launch/ray/README.md, exercised: a head and a worker node started with
``ray start`` on this machine, ``selmatch experts`` and ``selmatch tune`` run against it with
``--ray-address``, tasks seen on both nodes, the cluster stopped through its own processes.

Each node gets its own HOME (so the head's token is not simply read from a shared
~/.ray/auth_token) and every port is chosen free; ``ray start --block`` keeps each node's
processes children of one process that this test terminates, never ``ray stop`` (which would stop
every Ray on the machine).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

from distill import storage
from distill.metrics import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (this test's unique temporary path)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


class LocalCluster:
    """Head + workers via ``ray start --block``, each in its own session, stopped by SIGTERM."""

    def __init__(self, root):
        self.root = str(root)
        self.token = secrets.token_hex(32)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[subprocess.Popen] = []

    def _env(self, home: str, token: str | None, via: str = "env") -> dict:
        """Environment of a node or driver with its own HOME and, as launch/ray/README.md says,
        RAY_AUTH_MODE=token plus the token in RAY_AUTH_TOKEN or in $HOME/.ray/auth_token (the
        file alone is not enough: without the mode a worker connects with no token)."""
        os.makedirs(home, exist_ok=True)
        env = {**os.environ, "HOME": home, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": REPO}
        for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
            env.pop(key, None)
        if token is not None and via == "env":
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
        elif token is not None:
            env["RAY_AUTH_MODE"] = "token"
            os.makedirs(os.path.join(home, ".ray"), exist_ok=True)
            with open(os.path.join(home, ".ray", "auth_token"), "w") as f:
                f.write(token)
        return env

    def _start(self, name: str, args: list[str], token: str | None,
               via: str = "env") -> subprocess.Popen:
        log = open(os.path.join(self.root, f"{name}.log"), "w")
        common = ["--block", "--num-cpus=1", "--object-store-memory=100000000",
                  "--node-ip-address=127.0.0.1", f"--dashboard-agent-listen-port={free_port()}"]
        proc = subprocess.Popen([RAY, "start", *args, *common],
                                env=self._env(os.path.join(self.root, f"home_{name}"), token, via),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes.append(proc)
        return proc

    def log(self, name: str) -> str:
        with open(os.path.join(self.root, f"{name}.log")) as f:
            return f.read()

    def wait_started(self, name: str, proc: subprocess.Popen, timeout: float = 180) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if "block forever" in self.log(name):
                return
            if proc.poll() is not None:
                raise RuntimeError(f"ray start ({name}) exited {proc.returncode}:\n"
                                   f"{self.log(name)[-3000:]}")
            time.sleep(1)
        raise TimeoutError(f"ray start ({name}) did not come up:\n{self.log(name)[-3000:]}")

    def start_head(self) -> None:
        proc = self._start("head", ["--head", f"--port={self.port}", "--include-dashboard=false",
                                    f"--temp-dir={self.root}/ray",
                                    f"--ray-client-server-port={free_port()}",
                                    '--resources={"head_node": 1}'], self.token)
        self.wait_started("head", proc)

    def start_worker(self, name: str, token: str | None, via: str = "env") -> subprocess.Popen:
        return self._start(name, [f"--address={self.address}",
                                  '--resources={"worker_node": 1}'], token, via)

    def driver_env(self) -> dict:
        return self._env(os.path.join(self.root, "home_driver"), self.token)

    def stop(self) -> None:
        for proc in reversed(self.nodes):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.nodes:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        end = time.time() + 60
        while processes_mentioning(self.root) and time.time() < end:
            time.sleep(1)


def selmatch(args: list[str], env: dict) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "launch.cli", *args], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


@pytest.mark.slow
def test_two_node_cluster_runs_experts_and_tune(tmp_path):
    root = tempfile.mkdtemp(prefix="selmatch-rc-", dir="/tmp")  # Ray's socket paths: < 108 bytes
    run_dir = tmp_path / "run"
    cfg = {
        "run_dir": str(run_dir), "seed": 1,
        "data": {"name": "digits", "train_per_class": 30},
        "model": {"name": "convnet", "width": 8, "depth": 1},
        "experts": {"num_experts": 2, "epochs": 3, "batch_size": 32, "lr": 0.05,
                    "el2n_epoch": 1, "num_cpus": 1},
        "select": {"ipc": 4, "beta": 0.2},
        "distill": {"alpha": 0.5, "syn_steps": 2, "expert_epochs": 1, "max_start_epoch": 2,
                    "batch_syn": 8, "lr_images": 100.0},
        "eval": {"model": "convnet", "runs": 1, "epochs": 2, "batch_size": 32},
        "tune": {"beta_step": 0.25, "beta_epoch_fraction": 0.5, "alpha_step": 0.5,
                 "alpha_iterations": 2, "max_concurrent": 2, "num_cpus": 1},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cluster = LocalCluster(root)
    try:
        cluster.start_head()
        # Ray 2.60 turns token authentication on: a node without the head's token is refused
        refused = cluster.start_worker("no_token", token=None)
        refused.wait(timeout=180)
        assert refused.returncode != 0 and "InvalidAuthToken" in cluster.log("no_token")
        # the head's token copied to the worker's ~/.ray/auth_token (+ RAY_AUTH_MODE=token); the
        # head and the driver get it from RAY_AUTH_MODE=token + RAY_AUTH_TOKEN
        worker = cluster.start_worker("worker", token=cluster.token, via="file")
        cluster.wait_started("worker", worker)

        env = cluster.driver_env()
        selmatch(["experts", "--config", str(path), "--ray-address", cluster.address], env)
        experts = storage.read_json(f"{run_dir}/experts/manifest.json")["experts"]
        assert sorted(experts) == ["0", "1"]
        assert len({e["node"] for e in experts.values()}) == 2  # one expert on each node

        selmatch(["scores", "--config", str(path)], env)
        selmatch(["tune", "--config", str(path), "--ray-address", cluster.address], env)
        trials = (read_jsonl(f"{run_dir}/tune/beta/trials.jsonl")
                  + read_jsonl(f"{run_dir}/tune/alpha/trials.jsonl"))
        assert trials and all(t["status"] == "ok" for t in trials)
        grid = [t for t in trials if t.get("reference") is None]  # the random reference point
        assert len(grid) < len(trials)                            # is scored in the driver
        assert len({t["node"] for t in grid}) == 2  # the grid's trials ran on both nodes
        assert storage.exists(f"{run_dir}/tune/selected.yaml")
    finally:
        cluster.stop()
        leftover = processes_mentioning(root)
        shutil.rmtree(root, ignore_errors=True)
    assert leftover == []  # nothing of this cluster is left running
