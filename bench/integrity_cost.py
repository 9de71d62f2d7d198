"""What the checks on every trusted artifact cost (distill/integrity.py), at the size of the
largest artifacts of the shipped configs.

    python bench/integrity_cost.py                       # writes bench/results/integrity_cost.md

Artifacts generated at full size with random values (neither the hash nor the loader cares what
they hold):

* a Tiny ImageNet IPC 100 synthetic set (configs/tiny_ipc100.yaml, the largest artifact of any
  shipped config): 20,000 images of 3×64×64 float32 (``synset/<set>.pt``, 938 MiB);
* a CIFAR-100 IPC 150 synthetic set: 15,000 images of 3×32×32 float32;
* one expert of configs/cifar10_ipc250.yaml: the ConvNet-BN (width 128, depth 3) trajectory of
  101 parameter vectors (100 epochs + the start) and its per-epoch correctness table of 50,000
  samples (``experts/expert_XXXX.pt``, checked against the manifest's sha256).

For each, median of ``--repeats`` runs on a local temporary directory (the page cache warm after
the first):

* loads: ``torch.load`` with ``weights_only=False`` (what the code did before) and with
  ``weights_only=True`` (what it does now), and the verified load the product runs (read,
  sha256, compare with the sidecar, ``weights_only=True`` load);
* saves that replace an existing artifact: the earlier order (sidecar, then file: two atomic
  writes) and the current one (sidecar accepting old and new, file, sidecar: three atomic writes
  and a read of the old sidecar), both with the sha256.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
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

from distill import integrity, storage  # noqa: E402
from distill.estimate import Network, network_facts  # noqa: E402


def synset_state(*, classes: int, ipc: int, size: int) -> dict:
    n = classes * ipc
    return {"images": torch.randn(n, 3, size, size), "labels": torch.arange(n) % classes,
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


def save_before(url: str, state: dict) -> None:
    """The earlier write order: the sidecar, then the file (a crash between the two left a new
    hash beside the old bytes)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    storage.write_text(integrity.sidecar(url), f"{sha}  {os.path.basename(url)}\n")
    storage.write_bytes(url, data)


def load(url: str, weights_only: bool):
    with open(url, "rb") as f:
        data = f.read()
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=weights_only)


def measure(name: str, state: dict, directory: str, repeats: int) -> dict:
    url = os.path.join(directory, f"{name}.pt")
    integrity.torch_save(url, state)  # every timed save replaces an existing artifact
    before_s = median_time(lambda: save_before(url, state), repeats)
    save_s = median_time(lambda: integrity.torch_save(url, state), repeats)
    size = os.path.getsize(url)
    unsafe_s = median_time(lambda: load(url, False), repeats)
    safe_s = median_time(lambda: load(url, True), repeats)
    verified_s = median_time(lambda: integrity.torch_load(url, fix="-"), repeats)
    return {"artifact": name, "bytes": size, "save_before_s": before_s, "save_now_s": save_s,
            "load_weights_only_false_s": unsafe_s, "load_weights_only_true_s": safe_s,
            "load_verified_s": verified_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=os.path.join(HERE, "results", "integrity_cost"))
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        rows.append(measure("Tiny ImageNet IPC 100 synthetic set",
                            synset_state(classes=200, ipc=100, size=64), d, args.repeats))
        rows.append(measure("CIFAR-100 IPC 150 synthetic set",
                            synset_state(classes=100, ipc=150, size=32), d, args.repeats))
        rows.append(measure("CIFAR-10 expert (ConvNet-128, 100 epochs)", expert_state(), d,
                            args.repeats))
    doc = {"command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
           "torch": torch.__version__,
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "load_1min": os.getloadavg()[0], "rows": rows}
    with open(args.out + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    lines = ["# The cost of checked, code-free loads and of the crash-safe write order", "",
             f"`{doc['command']}` ({doc['date']}, {doc['machine']}, torch {doc['torch']}; "
             f"1-minute load {doc['load_1min']:.2f}). Median of {args.repeats} runs on a local "
             "temporary directory. Loads: `torch.load` of the file's bytes with "
             "`weights_only=False` (before) and `True` (now), and the verified load the product "
             "runs (read, sha256, compare with the sidecar, `weights_only=True`). Saves replace "
             "an existing artifact: before, the sidecar then the file; now, a sidecar accepting "
             "the old and the new hash, the file, then the sidecar of the new hash alone "
             "(distill/integrity.py).",
             "", "| artifact | size | save before (s) | save now (s) | load, weights_only=False "
                 "(s) | load, weights_only=True (s) | verified load now (s) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['artifact']} | {r['bytes'] / 2**20:.0f} MiB | {r['save_before_s']:.2f} | "
              f"{r['save_now_s']:.2f} | {r['load_weights_only_false_s']:.2f} | "
              f"{r['load_weights_only_true_s']:.2f} | {r['load_verified_s']:.2f} |"
              for r in rows]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
