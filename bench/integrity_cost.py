"""What the content-hash check of every trusted artifact costs (distill/integrity.py), at the size
of the largest artifacts of the paper's Table 5 configs.

    python bench/integrity_cost.py                       # writes bench/results/integrity_cost.md

Two artifacts, generated at full size with random values (the hash does not care what they hold):

* a CIFAR-100 IPC 150 synthetic set: 15,000 images of 3×32×32 float32 (``synset/<set>.pt``);
* one expert of configs/cifar10_ipc250.yaml: the ConvNet-BN (width 128, depth 3) trajectory of
  101 parameter vectors (100 epochs + the start) and its per-epoch correctness table of 50,000
  samples (``experts/expert_XXXX.pt``, checked against the manifest's sha256).

For each: the time of ``torch.load`` alone, of the verified load (read, sha256, compare, load) and
of the checked save (sha256 + sidecar + file), median of ``--repeats`` runs on a local temporary
directory (the page cache warm after the first). The overhead is the verified load minus the
plain one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from distill import integrity  # noqa: E402
from distill.estimate import Network, network_facts  # noqa: E402


def synset_state() -> dict:
    n = 150 * 100
    return {"images": torch.randn(n, 3, 32, 32), "labels": torch.arange(n) % 100,
            "is_distilled": torch.zeros(n, dtype=torch.bool), "source_index": torch.arange(n),
            "syn_lr": 0.01, "method": "selmatch", "meta": {}}


def expert_state() -> dict:
    params, _ = network_facts(Network(name="convnet", in_channels=3, num_classes=10,
                                      image_size=32, width=128, depth=3, norm="batch"))
    return {"expert_id": 0, "trajectory": torch.randn(101, params),
            "correct": torch.zeros(100, 50_000, dtype=torch.bool), "el2n": torch.rand(50_000),
            "layout": {}, "test_acc": [0.5] * 100, "train_loss": [1.0] * 100, "seconds": 0.0}


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(name: str, state: dict, directory: str, repeats: int) -> dict:
    url = os.path.join(directory, f"{name}.pt")
    save_s = median_time(lambda: integrity.torch_save(url, state), repeats)
    size = os.path.getsize(url)
    plain_s = median_time(lambda: torch.load(io.BytesIO(open(url, "rb").read()),
                                             map_location="cpu", weights_only=False), repeats)
    verified_s = median_time(lambda: integrity.torch_load(url, fix="-"), repeats)
    return {"artifact": name, "bytes": size, "save_checked_s": save_s, "load_plain_s": plain_s,
            "load_verified_s": verified_s, "overhead_s": verified_s - plain_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=os.path.join(HERE, "results", "integrity_cost"))
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        rows.append(measure("CIFAR-100 IPC 150 synthetic set", synset_state(), d, args.repeats))
        rows.append(measure("CIFAR-10 expert (ConvNet-128, 100 epochs)", expert_state(), d,
                            args.repeats))
    doc = {"command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
           "torch": torch.__version__,
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "load_1min": os.getloadavg()[0], "rows": rows}
    with open(args.out + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    lines = ["# The cost of checking every artifact's hash", "",
             f"`{doc['command']}` ({doc['date']}, {doc['machine']}, torch {doc['torch']}; "
             f"1-minute load {doc['load_1min']:.2f}). Median of {args.repeats} runs on a local "
             "temporary directory; the verified load reads the file, hashes it (sha256), compares "
             "with its sidecar and then loads it; the checked save writes the sidecar and the file.",
             "", "| artifact | size | checked save (s) | plain load (s) | verified load (s) | "
                 "overhead of the check (s) |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['artifact']} | {r['bytes'] / 2**20:.0f} MiB | {r['save_checked_s']:.2f} | "
              f"{r['load_plain_s']:.2f} | {r['load_verified_s']:.2f} | {r['overhead_s']:.2f} |"
              for r in rows]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
