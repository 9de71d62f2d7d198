"""One harness for every multi-rank test: gloo ranks on CPU, the problem they solve, and the
documented ``accelerate launch`` recipe.

    ranks = launch(body, world=2, args=(run_dir, ...), out_dir=tmp_path, timeout=300)

Each rank is a *spawned* process (a fork after torch's thread pools are up can hang, and
``accelerate.debug_launcher`` forks on a fixed port) that sets up its process group through
``Runtime.create``, i.e. through Accelerate exactly as under ``accelerate launch``, runs
``body(rt, *args) -> dict`` (a module-level function of the test file, so it pickles), saves the
dict to ``out_dir/rank<r>.pt`` (with the traceback under "error" when it raised) and tears the
group down: a barrier first only when it got to the end (``Runtime.close``).

The rendezvous store is hosted by this (parent) process on a port the OS assigns, and the ranks
join it as clients, which is what torchrun and ``accelerate launch`` do with their agent's store.
Two defects of an earlier harness made it flaky under load: a port picked by closing a probe
socket could be taken by another process before rank 0 bound it (seconds later, after spawning
and importing torch), and the store lived in rank 0, so rank 0 exiting first took it away from
rank 1. ``--main_process_port 0`` gives the accelerate recipe the same OS-assigned port.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distill.config_io import load_config
from distill.data import load_configured
from distill.distiller import Distiller, initial_set
from launch.distillation import run_distill
from distill.matching import LOCAL
from distill.synset import load_synset
from helpers import matching_problem, rel  # noqa: F401 (rel: used by the rank tests)
from distill.trajectories import ExpertStore
from tiny import tiny_config

REPO = Path(__file__).resolve().parents[1]
GROUP = 2  # g of match_problem


# --------------------------------------------------------------------------------------------
# Launching ranks
# --------------------------------------------------------------------------------------------


def rank_env(rank: int, world: int, port: int) -> None:
    """What torchrun/accelerate would set, for a CPU rank with one intra-op thread that joins
    the store of the parent process."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      ACCELERATE_USE_CPU="true", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
                      TORCHELASTIC_USE_AGENT_STORE="True")  # the parent hosts the store
    torch.set_num_threads(1)  # 2 ranks on 2 cores


def _rank_entry(rank: int, world: int, port: int, out_dir: str, body, args: tuple) -> None:
    rank_env(rank, world, port)
    from distill.runtime import Runtime

    out: dict = {"rank": rank}
    rt = Runtime.create(cpu=True)
    ok = False
    try:
        out["world_size"] = rt.world_size
        out.update(body(rt, *args))
        ok = True
    except BaseException:
        out["error"] = traceback.format_exc()
        raise
    finally:
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
        rt.close(ok=ok)


def launch(body, *, world: int, args: tuple, out_dir: Path, timeout: float) -> list[dict]:
    """Spawn ``world`` ranks running ``body`` around a store this process hosts on an
    OS-assigned port (held until every rank has exited); returns each rank's dict, checked for
    errors. ``timeout`` only catches a hang: a loaded 2-core machine takes ~45 s for
    test_distributed's launch (3 busy processes beside it), an idle one ~15 s."""
    store = dist.TCPStore("127.0.0.1", 0, world_size=world + 1, is_master=True,
                          wait_for_workers=False)
    ctx = mp.start_processes(_rank_entry, args=(world, store.port, str(out_dir), body, args),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world}-rank run did not finish in {timeout:.0f} s")
    finally:
        for proc in ctx.processes:  # a hung rank (e.g. waiting in a collective) is killed
            if proc.is_alive():
                proc.terminate()
        del store
    ranks = [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for r in ranks:
        assert "error" not in r, r["error"]
    return ranks


# --------------------------------------------------------------------------------------------
# The problems, built identically in every process
# --------------------------------------------------------------------------------------------


def match_problem(groups: int, dtype=torch.float64):
    """A matching step with |b| = groups * GROUP: DSA on, 3 inner steps, depth-2 ConvNet-BN."""
    return matching_problem(n=16, batch=groups * GROUP, group=GROUP, plan_seed=1, iteration=7,
                            dtype=dtype)


def cfg_for(run_dir, **distill):
    """tests/tiny.py's problem with 4 BN groups per step (2 per rank)."""
    return tiny_config(run_dir, distill={"iterations": 5, "batch_syn": 16, "bn_group": 4,
                                         "log_every": 100, **distill})


def run_distiller(run_dir, dtype, comm=LOCAL, is_main=True, perturb_at=None,
                  backend="inductor", **distill_cfg):
    """Run the Distiller directly; ``perturb_at``: nudge this rank's images after that step;
    ``backend``: the compiled path's torch.compile backend."""
    cfg = cfg_for(run_dir, **distill_cfg)
    ds = load_configured(cfg.data)
    synset = initial_set(cfg, ds).to("cpu", dtype)
    distiller = Distiller(cfg, ds, synset, ExpertStore(cfg), comm=comm, is_main=is_main,
                          backend=backend)
    if perturb_at is not None:
        real_step = distiller.step

        def step(iteration):
            record = real_step(iteration)
            if iteration == perturb_at:
                with torch.no_grad():
                    synset.distilled[0, 0, 0, 0] += 1e-6
            return record

        distiller.step = step
    distiller.run(progress=False)
    return synset.images().detach().clone(), synset.syn_lr.detach().clone()


# --------------------------------------------------------------------------------------------
# The documented launch recipe, for real
# --------------------------------------------------------------------------------------------

# the quickstart shrunk to cfg_for's data, model, experts and seed, so `prepared` serves it too
TINY = ["--seed", "5", "--data.train_per_class", "30", "--model.width", "8", "--model.depth", "1",
        "--experts.num_experts", "2", "--experts.epochs", "3", "--experts.el2n_epoch", "1",
        "--experts.lr", "0.05", "--experts.batch_size", "32",
        "--distill.max_start_epoch", "2", "--distill.expert_epochs", "1",
        "--distill.syn_steps", "3", "--distill.batch_syn", "20", "--distill.bn_group", "10",
        "--distill.iterations", "4", "--distill.checkpoint_every", "2", "--distill.log_every", "2",
        "--select.beta", "0.2", "--select.init", "window"]  # a pinned start: no window search


def run_recipe(run_dir: Path, *extra: str, timeout: float = 600.0) -> str:
    """``accelerate launch --config_file launch/accelerate/cpu_2proc.yaml distill/main.py`` on the
    quickstart shrunk by TINY (plus ``extra`` overrides) as a subprocess; returns its output after
    checking that it exited 0 and that no rank aborted at shutdown."""
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", "launch/accelerate/cpu_2proc.yaml",
           "--main_process_port", "0",  # the launcher's store binds a port the OS assigns
           "distill/main.py", "--config", "configs/quickstart.yaml", "--run_dir", str(run_dir),
           *TINY, *extra]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "terminate called" not in log and "Traceback" not in log, log[-3000:]
    # no rank's process group outlived Runtime.close (it would be torn down at interpreter exit)
    assert "still referenced after destroy_process_group" not in log, log[-3000:]
    return log


def recipe_vs_one_process(prepared: Path, tmp_path: Path, *extra: str) -> tuple[str, float]:
    """The recipe on two ranks (with ``extra``: how the ranks share the work, which must not
    change the result) and TINY in one process, each in a run directory holding ``prepared``'s
    experts and scores; returns the recipe's log and the relative difference of the two
    distilled sets (after checking that the ranks did distill)."""
    import shutil

    for run in ("one", "two"):
        for part in ("experts", "scores"):
            shutil.copytree(prepared / part, tmp_path / run / part)
    log = run_recipe(tmp_path / "two", *extra)
    assert "rank 0 of world size 2 on cpu" in log, log[-3000:]
    two, _ = load_synset(str(tmp_path / "two"), "selmatch")
    cfg = load_config(str(REPO / "configs/quickstart.yaml"),
                      [*TINY, "--run_dir", str(tmp_path / "one")])
    run_distill(cfg, progress=False)
    one, _ = load_synset(str(tmp_path / "one"), "selmatch")
    init, _ = load_synset(str(tmp_path / "two"), "selmatch_init")
    assert rel(two.images(), init.images()) > 1e-4  # the ranks did distill
    return log, rel(two.images(), one.images())
