"""What accumulating batch norm's statistics in float64 costs the compiled matching step: an A/B
in one process, the float32 statistics (before) and the float64 ones (distill/functional.py, after)
compiled side by side and timed on alternating iterations, at bench/matching.py's cpu-fast shape
(ConvNet-BN width 64, depth 3, 500 32×32×3 images, |b| = g = 32, N = 10, DSA, one thread).

    python bench/bn_stats_ab.py          # writes bench/results/bn_stats_ab_cpu.{json,md}

Timing two builds in one run on alternating iterations keeps the machine's drift out of the
ratio (separate records of this machine have differed by 40% for the same code).
"""
import copy
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")  # both compile in this run
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")

import torch  # noqa: E402

import distill.functional as fn  # noqa: E402
from distill.augment import DSA  # noqa: E402
from distill.matching import Student, make_plan, match_replay  # noqa: E402
from distill.models import build_model  # noqa: E402
from distill.params import ParamLayout  # noqa: E402
from matching_probe import expert_like_target  # noqa: E402
from precision_probe import batch_norm_with, float32_statistics  # noqa: E402

ITERATIONS = 16
torch.set_num_threads(1)
after = fn.FunctionalConvNet._norm
before = batch_norm_with(float32_statistics)  # the batch norm as it was

torch.manual_seed(0)
n, size, batch, steps = 500, 32, 32, 10
model = build_model("convnet", in_channels=3, num_classes=10, image_size=size, width=64, depth=3, norm="batch")
start = ParamLayout.of(model).flatten(model).detach()
images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))
labels = torch.arange(n) % 10
target = expert_like_target(model, start, images, labels, "cpu", torch.float32)
dsa = DSA()
students, first = {}, {}
for name, norm in (("before", before), ("after", after)):
    fn.FunctionalConvNet._norm = staticmethod(norm)
    s = Student.of(copy.deepcopy(model), dsa, torch.float32, "cpu", compile="on")
    plan = make_plan(n, batch=batch, steps=steps, group=batch, image_size=(size, size), dsa=dsa, seed=0, iteration=0)
    t0 = time.perf_counter(); match_replay(s, start, target, images, labels, torch.tensor(0.01), plan)
    first[name] = round(time.perf_counter() - t0, 1)
    assert s.steps.name == "compiled", s.steps.name
    print(f"{name}: first call (compiling) {first[name]} s", flush=True)
    students[name] = s
times = {"before": [], "after": []}
for i in range(1, ITERATIONS + 1):
    plan = make_plan(n, batch=batch, steps=steps, group=batch, image_size=(size, size), dsa=dsa, seed=0, iteration=i)
    for name in (("before", "after") if i % 2 else ("after", "before")):
        t0 = time.perf_counter()
        match_replay(students[name], start, target, images, labels, torch.tensor(0.01), plan)
        times[name].append(time.perf_counter() - t0)
ratio = statistics.mean(times["after"]) / statistics.mean(times["before"])
lines = ["# Batch norm's statistics in float64: the compiled step's cost (one process, A/B)", "",
         f"`python bench/bn_stats_ab.py` ({time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
         f"{os.cpu_count()} CPU cores, 1 torch thread, 1-minute load average "
         f"{os.getloadavg()[0]:.2f} at the end)", "",
         "| statistics | s/iteration (mean ± sd) | iterations | first call s (compiling) |",
         "| --- | --- | --- | --- |"]
for name, label in (("before", "float32 (before)"), ("after", "float64 (after)")):
    t = times[name]
    lines.append(f"| {label} | {statistics.mean(t):.3f} ± {statistics.stdev(t):.3f} | {len(t)} | "
                 f"{first[name]} |")
lines += ["", f"after / before: {ratio:.3f}"]
print("\n".join(lines))
out = os.path.join(HERE, "results", "bn_stats_ab_cpu")
with open(out + ".json", "w") as f:
    json.dump({"command": "python bench/bn_stats_ab.py", "torch": torch.__version__,
               "seconds": times, "first_call_s": first, "ratio": ratio}, f, indent=1)
with open(out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
