"""One configuration of bench/matching.py, measured in this process: time, memory, gradient error.

A *spec* is a flat dict (method, |b|, N, g, shape, dtype, precision, device, ...); :func:`measure`
returns it with the measurements added. Kept apart from the grid and the output so that a CPU run
can measure every configuration in a fresh interpreter (``bench/matching.py --one SPEC``).
"""

from __future__ import annotations

import gc
import resource
import sys
import time
import warnings

import os

import torch

from distill.augment import DSA
from distill.matching import MatchPlan, Student, make_plan, match_replay

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
import helpers  # noqa: E402
from helpers import match_unrolled  # noqa: E402  (the reference algorithm; not product API)
from distill.models import build_model
from distill.params import ParamLayout
from distill.student import set_precision

METHODS = {"replay": match_replay, "fast": match_replay, "unrolled": match_unrolled}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
GIB = 2.0 ** 30


# --------------------------------------------------------------------------------------------
# Memory probes
# --------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss() -> int:
    """Resident bytes now (0 where /proc is missing)."""
    kib = _status_kib("VmRSS")
    return 0 if kib is None else kib * 1024


def lifetime_peak_rss() -> int:
    """ru_maxrss in bytes (KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: write 5 to clear_refs); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def peak_rss_since_reset() -> int:
    kib = _status_kib("VmHWM")
    return lifetime_peak_rss() if kib is None else kib * 1024


def is_oom(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    msg = str(err).lower()
    return "out of memory" in msg or "can't allocate memory" in msg


# --------------------------------------------------------------------------------------------
# The problem
# --------------------------------------------------------------------------------------------


def build_problem(spec: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Student, start/target θ, images, labels and lr; deterministic in spec['seed'].

    The images are drawn in float64 and cast; the float64 reference of a float32 row upcasts the
    float32 row's own inputs, so both start from the same numbers."""
    torch.manual_seed(spec["seed"])
    model = build_model("convnet", in_channels=spec["channels"], num_classes=spec["classes"],
                        image_size=spec["image_size"], width=spec["width"], depth=spec["depth"],
                        norm="batch")
    start = ParamLayout.of(model).flatten(model).detach().to(device, dtype)
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    n, size = spec["n_images"], spec["image_size"]
    images = torch.randn(n, spec["channels"], size, size, generator=gen,
                         dtype=torch.float64).to(device, dtype)
    labels = torch.arange(n, device=device) % spec["classes"]
    if spec.get("target", "expert") == "offset":
        tgen = torch.Generator().manual_seed(spec["seed"] + 2)
        target = start + (0.01 * torch.randn(start.numel(), generator=tgen,
                                             dtype=torch.float64)).to(device, dtype)
    else:
        target = expert_like_target(model, start, images, labels, device, dtype)
    probe = torch.randn(images.numel(), generator=gen, dtype=torch.float64).to(device, dtype)
    dsa = DSA() if spec["dsa"] else None
    fast = spec["method"] == "fast"
    student = Student.of(model.to(device), dsa, dtype, device, compile="on" if fast else "off",
                         cuda_graphs=spec.get("cuda_graphs", True),
                         groups_per_call=spec.get("groups_per_call"))
    lr = torch.tensor(0.01, device=device, dtype=dtype)
    return {"student": student, "start": start, "target": target, "images": images,
            "labels": labels, "lr": lr, "probe": probe, "model": model}


_TARGETS: dict[tuple, torch.Tensor] = {}


def expert_like_target(model, start, images, labels, device, dtype, *, steps: int = 20,
                       batch: int = 64, lr: float = 0.05) -> torch.Tensor:
    """θ after ``steps`` plain SGD steps on the images from ``start``: like θ*_{t+M}, the target
    lies along gradient directions (a random target makes the matching gradient a sum of large
    cancelling terms, whose float32 error then says more about the target than the code).

    Computed once per shape in float64 on the CPU and cast: the same target on every device and
    dtype, and no float32 kernels of the measured device warmed up before the memory baseline
    (distill/estimate.py's runtime constant counts what the first step loads)."""
    key = (tuple(start.shape), tuple(images.shape), float(start.double().sum()),
           float(images.double().sum()))
    if key not in _TARGETS:
        _TARGETS[key] = helpers.expert_like_target(model, start, images, labels, steps=steps,
                                                   batch=batch, lr=lr)
    return _TARGETS[key].to(device, dtype)


def plan_for(spec: dict, iteration: int, dsa: DSA | None, device: torch.device) -> MatchPlan:
    plan = make_plan(spec["n_images"], batch=spec["batch"], steps=spec["steps"],
                     group=spec["group"], image_size=(spec["image_size"],) * 2, dsa=dsa,
                     seed=spec["seed"], iteration=iteration)
    return plan.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _call(spec: dict, p: dict, plan: MatchPlan):
    return METHODS[spec["method"]](p["student"], p["start"], p["target"], p["images"],
                                   p["labels"], p["lr"], plan)


def _count_host_syncs(fn):
    """(fn(), number of CUDA host synchronisations it made), by torch's sync debug mode."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return out, sum("synchroniz" in str(w.message).lower() for w in caught)


def _timed_steps(spec: dict, p: dict, device: torch.device, mem: dict) -> dict:
    times, cpu_times, plan_s, checks = [], [], [], []
    first_s, kept = None, {}
    for i in range(spec["warmup"] + spec["iters"]):
        t0 = time.perf_counter()
        plan = plan_for(spec, i, p["student"].dsa, device)
        plan_s.append(time.perf_counter() - t0)
        # the memory baseline: right before the first iteration (what distill/estimate.py's
        # coefficients were fitted on), or for the compiled path after warm-up, so that the
        # compiler's own memory is not counted as the step's
        if i == (spec["warmup"] if spec["method"] == "fast" else 0):
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                mem["before"] = torch.cuda.memory_allocated(device)
            else:
                mem["before"] = current_rss()
                mem["rss_probe"] = "VmHWM reset" if reset_peak_rss() else "ru_maxrss (lifetime)"
        _sync(device)
        last = i == spec["warmup"] + spec["iters"] - 1
        c0, t0 = time.process_time(), time.perf_counter()
        if last and device.type == "cuda":  # count the host waits of one whole matching call
            res, mem["host_syncs"] = _count_host_syncs(lambda: _call(spec, p, plan))
        else:
            res = _call(spec, p, plan)
        _sync(device)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        if i == 0:
            first_s = seconds  # includes compilation for the fast path
        if i >= spec["warmup"]:
            times.append(seconds)
            cpu_times.append(cpu_seconds)
        if i >= spec["warmup"] and spec.get("reference"):  # compared with float64 afterwards
            kept[i] = res.grad_images.detach().double().cpu()
        gi = res.grad_images.reshape(-1).double()
        checks.append({"loss": float(res.loss), "grad_lr": float(res.grad_lr),
                       "grad_images_norm": float(gi.norm()),
                       "grad_images_probe": float(gi @ p["probe"].double())})
        del res, gi, plan
    mean = sum(times) / len(times)
    sd = (sum((t - mean) ** 2 for t in times) / max(len(times) - 1, 1)) ** 0.5
    steps = p["student"].steps
    return {"s_per_iter": mean, "s_std": sd, "times": times, "first_s": first_s,
            "cpu_s_per_iter": sum(cpu_times) / len(cpu_times),
            "plan_s": sum(plan_s) / len(plan_s), "checks": checks,
            "image_steps_per_s": spec["batch"] * spec["steps"] / mean,
            "path": steps.name, "fallback": getattr(steps, "failed", None),
            "compile_s": getattr(steps, "compile_seconds", None), "_kept": kept,
            "host_syncs": mem.get("host_syncs")}


_REFERENCES: dict[tuple, torch.Tensor] = {}  # float64 image gradients, shared by rows of a shape


def reference_errors(spec: dict, p: dict, kept: dict[int, torch.Tensor],
                     device: torch.device) -> list[float]:
    """Relative error of each kept image gradient against the eager replay of the same plan in
    float64, from the same (upcast) inputs. References are cached per shape and iteration, so
    the rows of one shape (methods, precisions) in one process share them."""
    model = p["model"].to(torch.float64)
    student = Student.of(model, p["student"].dsa, torch.float64, device, compile="off")
    up = {k: p[k].to(torch.float64) for k in ("start", "target", "images", "lr")}
    errors = []
    for i, got in sorted(kept.items()):
        key = tuple(spec.get(k) for k in ("batch", "steps", "group", "n_images", "width", "depth",
                                          "image_size", "channels", "classes", "dsa", "seed",
                                          "target")) + (i,)
        if key not in _REFERENCES:
            plan = plan_for(spec, i, student.dsa, device)
            _REFERENCES[key] = match_replay(student, up["start"], up["target"], up["images"],
                                            p["labels"], up["lr"], plan).grad_images.cpu()
        ref = _REFERENCES[key]
        errors.append(float((got - ref).norm() / ref.norm().clamp_min(1e-300)))
    return errors


def measure(spec: dict) -> dict:
    """Time and memory of one configuration in this process; OOM becomes a record."""
    device, dtype = torch.device(spec["device"]), DTYPES[spec["dtype"]]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    spec["precision"] = set_precision(spec.get("precision", "fp32"), device)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)  # an OOM while building reads this config's peak
    record = {**spec, "status": "ok"}
    mem: dict = {}
    problem = None
    try:
        problem = build_problem(spec, device, dtype)
        record.update(_timed_steps(spec, problem, device, mem))
    except (RuntimeError, MemoryError) as err:
        if not is_oom(err):
            raise
        record.update(status="OOM", error=str(err).splitlines()[0][:300])
    kept = record.pop("_kept", None)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        record["reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    else:
        peak = peak_rss_since_reset()
        record["rss_probe"] = mem.get("rss_probe")
        record["lifetime_peak_rss_gib"] = lifetime_peak_rss() / GIB
    record["peak_gib"] = peak / GIB
    if "before" in mem:
        record["before_gib"] = mem["before"] / GIB
        record["delta_gib"] = (peak - mem["before"]) / GIB
    if kept:
        try:
            errors = reference_errors(spec, problem, kept, device)
            record["grad_errs"] = errors
            record["grad_err"] = sorted(errors)[len(errors) // 2]  # median over timed iterations
        except (RuntimeError, MemoryError) as err:
            if not is_oom(err):
                raise
            record["note"] = "float64 reference: OOM"
    problem = None  # noqa: F841 (drop the tensors before the next configuration)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record
