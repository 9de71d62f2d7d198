"""Two ways to write the compiled replay step, timed against each other (why student.py keeps one).

    python bench/fast_path_variants.py                 # CPU, one thread: 32 rows, ConvNet-64, 32×32×3
    python bench/fast_path_variants.py --device cuda   # one GPU: 125 rows, ConvNet-128

The replay step needs H·λ, ∂(g·λ)/∂x and g·λ for g = ∇θ ℓ. *Reverse over reverse*:
``grad`` over (θ, x) of ⟨``grad`` ℓ, λ⟩ (what distill/student.py uses). *Forward over reverse*:
``jvp`` of θ ↦ (∇θ ℓ, ∇x ℓ) in the direction (λ, 0), whose tangent is (H·λ, ∂(g·λ)/∂x). Both
are compiled with Inductor (full graph, static shapes) and timed per call after warm-up; the
results are checked against each other. Writes bench/results/fast_path_variants_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from distill.functional import functional_convnet  # noqa: E402
from distill.models import build_model  # noqa: E402
from distill.params import ParamLayout  # noqa: E402
from distill.student import _kernels  # noqa: E402


def forward_over_reverse(net):
    def loss(theta, x, y, groups, batch):
        return F.cross_entropy(net.forward(theta, x, groups), y, reduction="sum") / batch

    def replay(theta, x, y, lam, groups, batch):
        def grads(th):
            return torch.func.grad(loss, argnums=(0, 1))(th, x, y, groups, batch)

        (g, _), (h_lam, grad_x) = torch.func.jvp(grads, (theta,), (lam,))
        return h_lam, grad_x, (g * lam).sum()

    return replay


def timed(fn, args, device, iters):
    for _ in range(2):
        fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, (time.perf_counter() - t0) / iters, (time.process_time() - c0) / iters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    rows = args.rows or (125 if device.type == "cuda" else 32)
    width = args.width or (128 if device.type == "cuda" else 64)
    if device.type == "cpu":
        torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("convnet", in_channels=3, num_classes=10, image_size=32, width=width)
    net = functional_convnet(model)
    theta = ParamLayout.of(model).flatten(model).detach().to(device)
    x = torch.randn(rows, 3, 32, 32, device=device)
    y = torch.arange(rows, device=device) % 10
    lam = torch.randn_like(theta) * 1e-3
    inputs = (theta, x, y, lam, 1, rows)
    variants = {"reverse over reverse": _kernels(net)[1],
                "forward over reverse": forward_over_reverse(net)}
    results, outs = [], []
    for name, fn in variants.items():
        t0 = time.perf_counter()
        compiled = torch.compile(fn, fullgraph=True, dynamic=False)
        compiled(*inputs)
        compile_s = time.perf_counter() - t0
        out, wall, cpu = timed(compiled, inputs, device, args.iters)
        outs.append(out)
        results.append({"variant": name, "compile_s": compile_s, "wall_ms": 1e3 * wall,
                        "cpu_ms": 1e3 * cpu})
        print(results[-1], flush=True)
    diff = max(float((a - b).norm() / b.norm()) for a, b in zip(*outs))
    slug = "cpu" if device.type == "cpu" else "gpu"
    out = args.out or os.path.join(HERE, "results", f"fast_path_variants_{slug}")
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.machine()} CPU, 1 torch thread")
    command = " ".join(["python", os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    doc = {"command": command, "machine": machine, "torch": torch.__version__, "date": when,
           "rows": rows, "width": width, "results": results, "max_relative_difference": diff,
           "load_average": list(os.getloadavg())}
    with open(out + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    ratio = results[1]["cpu_ms"] / results[0]["cpu_ms"]
    lines = [f"# Compiled replay step, two formulations: {machine}, torch {torch.__version__}, "
             f"{when}", "", f"`{command}`", "",
             f"{rows} rows, ConvNet-BN width {width}, 32×32×3, float32, one call = H·λ, "
             f"∂(g·λ)/∂x and g·λ; {args.iters} timed calls after 2 warm-up calls. Load average "
             f"at the end: {doc['load_average']}.", "",
             "| variant | compile s | wall ms/call | CPU ms/call |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['variant']} | {r['compile_s']:.1f} | {r['wall_ms']:.1f} | {r['cpu_ms']:.1f} |"
              for r in results]
    lines += ["", f"Forward over reverse / reverse over reverse (CPU time): {ratio:.2f}. The two "
              f"agree to {diff:.1e} relative (float32)."]
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
