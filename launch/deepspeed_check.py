"""Exercise DeepSpeed ZeRO for real on CPU: an expert-style training loop on 2 gloo ranks.

    .venv/bin/python launch/deepspeed_check.py                 # -> bench/results/deepspeed_cpu.md
    .venv/bin/python launch/deepspeed_check.py --all --steps 8 # every variant, not just the first
                                                               # one that works

What it does, per attempt (highest ZeRO stage first): spawn 2 processes, ``DS_ACCELERATOR=cpu``,
``deepspeed.init_distributed("gloo")``, ``deepspeed.initialize`` a ConvNet-BN on digits with a
client ``torch.optim.SGD`` and launch/deepspeed/zero2.json (stage and batch sizes filled in),
then train ``--steps`` data-parallel steps (global batch 64 = 2 x 32). Each rank also runs a plain
PyTorch loop on the same shards (gradients averaged over shards, as data parallelism does) and
reports the largest parameter difference, so "it ran" also means "it computed the right thing".
Attempts: ZeRO-2 as shipped, ZeRO-2 without ``overlap_comm`` (side streams are a CUDA notion),
ZeRO-1, ZeRO-0; the first that works ends the search unless ``--all``. Every attempt is recorded,
failures with their error line.

First, one process builds (or loads from ``~/.cache/torch_extensions``) DeepSpeed's
``deepspeed_shm_comm`` op: on the CPU accelerator ``init_distributed`` JIT-compiles it, which took
~4 minutes on a busy 2-core machine. Left to the ranks, both compile at once behind a file lock,
and a rank killed by a timeout leaves a stale ``lock`` file that makes every later build wait.

This covers the ordinary training loops only. The matching step never goes through the DeepSpeed
engine: it needs double backward, which the engine and its activation checkpointing do not support
(docs/design.md §11); distillation uses torch.distributed collectives through distill/runtime.py.
"""

from __future__ import annotations

if __name__ == "__main__":  # run as a script: the repository root on sys.path
    import os
    import sys

    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import copy
import datetime
import json
import os
import platform
import socket
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
ZERO_CONFIG = REPO / "launch" / "deepspeed" / "zero2.json"
WORLD, MICRO, LR = 2, 32, 0.05

# (label, stage, overrides of zero_optimization)
ATTEMPTS = [
    ("zero2", 2, {}),
    ("zero2-no-overlap", 2, {"overlap_comm": False}),
    ("zero1", 1, {}),
    ("zero0", 0, {}),
]


def ds_config(stage: int, zero_overrides: dict) -> dict:
    """launch/deepspeed/zero2.json with the "auto" values Accelerate would fill in."""
    conf = json.loads(ZERO_CONFIG.read_text())
    conf.update(train_batch_size=WORLD * MICRO, train_micro_batch_size_per_gpu=MICRO,
                gradient_accumulation_steps=1, gradient_clipping=0.0)
    conf["bf16"] = {"enabled": False}
    conf["zero_optimization"] = {**conf["zero_optimization"], "stage": stage, **zero_overrides}
    return conf


def _one_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()
    return text[0][:400] if text else type(err).__name__


def _rank(rank: int, port: int, label: str, stage: int, zero_overrides: dict, steps: int,
          out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    out: dict = {"rank": rank, "label": label, "stage": stage, "ok": False, "phase": "import"}
    t0 = time.perf_counter()
    try:
        import deepspeed
        import torch.distributed as dist

        from distill.data import load_dataset
        from distill.models import build_model

        out["phase"] = "init_distributed"
        deepspeed.init_distributed(dist_backend="gloo")
        out["world_size"] = dist.get_world_size()
        out["backend"] = dist.get_backend()
        from deepspeed.accelerator import get_accelerator

        out["accelerator"] = get_accelerator().device_name()

        ds = load_dataset("digits")
        torch.manual_seed(0)
        model = build_model("convnet", in_channels=1, num_classes=10, image_size=8, width=16,
                            depth=2, norm="batch")
        ref = copy.deepcopy(model)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=LR)

        out["phase"] = "initialize"
        conf = ds_config(stage, zero_overrides)
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), config=conf)
        out["zero_stage_engine"] = int(engine.zero_optimization_stage())

        out["phase"] = "train"
        theta0 = torch.cat([p.detach().flatten() for p in ref.parameters()])
        losses, diffs = [], []
        for step in range(steps):
            gen = torch.Generator().manual_seed(1000 + step)
            batch = torch.randperm(len(ds.y_train), generator=gen)[:WORLD * MICRO]
            shards = batch.view(WORLD, MICRO)
            x, y = ds.x_train[shards[rank]], ds.y_train[shards[rank]]
            loss = F.cross_entropy(engine(x), y)
            engine.backward(loss)
            engine.step()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            losses.append(float(mean_loss) / WORLD)

            ref_opt.zero_grad()
            for r in range(WORLD):  # data parallel = mean over shards, per-shard BN statistics
                (F.cross_entropy(ref(ds.x_train[shards[r]]), ds.y_train[shards[r]]) / WORLD).backward()
            ref_opt.step()
            got = torch.cat([p.detach().flatten() for p in engine.module.parameters()])
            want = torch.cat([p.detach().flatten() for p in ref.parameters()])
            diffs.append(float((got - want).abs().max()))
        out.update(losses=losses, max_param_diff=diffs,
                   max_param_change=float((want - theta0).abs().max()))  # diff 0 is not vacuous
        params = torch.cat([p.detach().flatten() for p in engine.module.parameters()])
        both = [torch.zeros_like(params) for _ in range(WORLD)]
        dist.all_gather(both, params)
        out["ranks_identical"] = all(torch.equal(both[0], t) for t in both[1:])
        out["ok"] = True
    except BaseException as err:  # recorded, not raised: the report says what failed and why
        out["error"] = _one_line(err)
        out["traceback"] = traceback.format_exc()
    finally:
        out["seconds"] = round(time.perf_counter() - t0, 2)
        torch.save(out, Path(out_dir) / f"{label}_rank{rank}.pt")
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best-effort teardown after a failure
            pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_attempt(label: str, stage: int, zero_overrides: dict, steps: int, out_dir: Path,
                timeout: float) -> list[dict]:
    """Both ranks' records; a rank that hung (waiting for a failed peer) is killed and says so."""
    ctx = mp.start_processes(_rank, args=(_free_port(), label, stage, zero_overrides, steps,
                                          str(out_dir)),
                             nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not all(p.exitcode is not None for p in ctx.processes):
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    records = []
    for r, proc in enumerate(ctx.processes):
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        path = out_dir / f"{label}_rank{r}.pt"
        if path.exists():
            records.append(torch.load(path, weights_only=False))
        else:
            records.append({"rank": r, "label": label, "stage": stage, "ok": False,
                            "error": f"no result (exit code {proc.exitcode}; killed after "
                                     f"{timeout:.0f} s if None or negative)"})
    return records


def prebuild_shm_op(timeout: float) -> dict:
    """Build DeepSpeed's CPU shared-memory comm op once, in one process, before the ranks start."""
    import subprocess
    import sys

    code = ("from deepspeed.comm.torch import build_shm_op\n"
            "m = build_shm_op()\nprint('SHM_OP', getattr(m, '__file__', m))")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    except subprocess.TimeoutExpired:
        return {"ok": False, "seconds": round(time.perf_counter() - t0, 1),
                "detail": f"not built within {timeout:.0f} s"}
    found = [line for line in proc.stdout.splitlines() if line.startswith("SHM_OP")]
    tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
    return {"ok": proc.returncode == 0, "seconds": round(time.perf_counter() - t0, 1),
            "detail": found[0][7:] if found else tail[:300]}


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cpus": os.cpu_count()}
    for name in ("deepspeed", "accelerate"):
        try:
            out[name] = __import__(name).__version__
        except Exception as err:  # noqa: BLE001
            out[name] = f"unavailable ({_one_line(err)})"
    return out


def report(attempts: list[list[dict]], steps: int, versions: dict, shm: dict) -> str:
    lines = [
        "# DeepSpeed on CPU: 2 gloo ranks, expert-style ConvNet loop",
        "",
        f"Written by `launch/deepspeed_check.py` on {datetime.date.today()} "
        f"({versions['cpus']} CPU cores; python {versions['python']}, torch {versions['torch']}, "
        f"deepspeed {versions['deepspeed']}, accelerate {versions['accelerate']}).",
        "",
        f"Each attempt: `deepspeed.initialize` with launch/deepspeed/zero2.json (stage and batch "
        f"sizes filled in), client `torch.optim.SGD` (lr {LR}), ConvNet-BN width 16 depth 2 on "
        f"digits, {steps} steps of global batch {WORLD * MICRO} = {WORLD} ranks x {MICRO}. "
        f"\"max param diff\" compares with a plain PyTorch loop doing the same data-parallel "
        f"step (mean of per-shard gradients) after each step.",
        "",
        f"DeepSpeed's CPU shared-memory comm op (`deepspeed_shm_comm`, JIT-compiled on first "
        f"use by `init_distributed`): {'available' if shm['ok'] else 'NOT built'} after "
        f"{shm['seconds']} s in one process ({shm['detail']}). The first build on this machine "
        f"took 3 min 42 s under load; later runs load the cached build.",
        "",
        "| attempt | ZeRO stage (engine) | world size | backend | ran | loss per step (mean over "
        "ranks) | max param diff vs plain loop | max param change over the run | ranks identical | seconds | error |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for records in attempts:
        r0 = records[0]
        ok = all(r.get("ok") for r in records)
        errors = "; ".join(f"rank {r['rank']}: `{r['error']}`" for r in records if r.get("error"))
        losses = ", ".join(f"{v:.4f}" for v in r0.get("losses", [])) or "-"
        diff = f"{max(r0['max_param_diff']):.2e}" if r0.get("max_param_diff") else "-"
        change = f"{r0['max_param_change']:.2e}" if "max_param_change" in r0 else "-"
        lines.append(
            f"| {r0['label']} | {r0['stage']} ({r0.get('zero_stage_engine', '-')}) | "
            f"{r0.get('world_size', '-')} | {r0.get('backend', '-')} | {'yes' if ok else 'no'} | "
            f"{losses} | {diff} | {change} | {r0.get('ranks_identical', '-')} | "
            f"{max(r.get('seconds', 0) for r in records)} | {errors.replace('|', '/') or '-'} |")
    worked = [rs[0] for rs in attempts if all(r.get("ok") for r in rs)]
    lines += ["", "**Result:** " + (
        f"the highest stage that ran is ZeRO-{max(r['stage'] for r in worked)} "
        f"({', '.join(r['label'] for r in worked)})." if worked else "no attempt ran.")]
    failed = [r for rs in attempts for r in rs if r.get("traceback")]
    if failed:
        lines += ["", "## Tracebacks (last lines)", ""]
        for r in failed:
            tail = "\n".join(r["traceback"].strip().splitlines()[-8:])
            lines += [f"{r['label']}, rank {r['rank']}, phase {r.get('phase')}:", "", "```",
                      tail, "```", ""]
    lines += [
        "",
        "Scope: this is the loop shape of experts and evaluation networks (forward, backward, "
        "optimizer step). The matching step of distillation never goes through the DeepSpeed "
        "engine: it needs double backward, which neither the engine nor DeepSpeed's activation "
        "checkpointing supports (docs/design.md §11). Accelerate's DeepSpeed plugin is ignored with "
        "`cpu=True` (docs/design.md §11), which is why this check calls DeepSpeed directly.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="training steps per attempt")
    parser.add_argument("--all", action="store_true", help="run every attempt, not just until one works")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per attempt")
    parser.add_argument("--build-timeout", type=float, default=1200.0,
                        help="seconds for the one-time build of DeepSpeed's CPU comm op")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "deepspeed_cpu.md"))
    args = parser.parse_args(argv)

    import tempfile

    shm = prebuild_shm_op(args.build_timeout)
    print(f"deepspeed_shm_comm: {'ok' if shm['ok'] else 'FAILED'} in {shm['seconds']} s "
          f"({shm['detail']})", flush=True)
    attempts = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, stage, overrides in ATTEMPTS:
            records = run_attempt(label, stage, overrides, args.steps, Path(tmp), args.timeout)
            attempts.append(records)
            ok = all(r.get("ok") for r in records)
            print(f"{label}: {'ran' if ok else 'FAILED'}"
                  + ("" if ok else " - " + "; ".join(str(r.get("error")) for r in records)),
                  flush=True)
            if ok and not args.all:
                break
    text = report(attempts, args.steps, _versions(), shm)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0 if any(all(r.get("ok") for r in rs) for rs in attempts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
