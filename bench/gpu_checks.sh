#!/usr/bin/env bash
# The GPU work of one device session, prepared so that it runs in one call per part.
#
#   bash bench/gpu_checks.sh matching   # matching step at the CIFAR-10 IPC 250 shape, |b| 1000 x N 55,
#                                       # |b| 5000 x N 80 (replay) and the full unroll where it fits
#   bash bench/gpu_checks.sh fmnist     # shortened Fashion-MNIST 5% pipeline: random, window, MTT, SelMatch
#   SMOKE=1 bash bench/gpu_checks.sh fmnist   # the same on a tiny subset (checks the script on a CPU)
#
# The GPU host has torch, accelerate, numpy, matplotlib, but neither Ray, kornia nor DeepSpeed and
# no internet. Before the call, on the development machine:
#   echo /.whl/ >> .git/info/exclude; echo /.data/ >> .git/info/exclude   (.data is git-ignored already)
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl kornia==0.9.0 kornia_rs==0.2.0
#   mkdir -p .data/fashion_mnist && cp /usr/share/datasets/fashion-mnist/*.gz .data/fashion_mnist/
# then call the device tool with carry [".whl", ".data"] and this script; results land in $OUT.
# Nothing here needs Ray: experts are trained in-process (--workers 0).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/selmatch_gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi") > "$OUT/device.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))" >> "$OUT/device.txt" 2>&1

case "${1:-}" in
  matching)
    python3 bench/matching.py --preset gpu-cifar10 --out "$OUT/matching_gpu" 2>&1 | tee "$OUT/matching.log"
    ;;
  fmnist)
    run_dir=/tmp/selmatch_fmnist
    rm -rf "$run_dir"
    extra=()
    if [ "${SMOKE:-0}" = 1 ]; then
      extra=(--data.train_per_class 40 --model.width 16 --select.ipc 10 --select.beta 0.2
             --experts.num_experts 2 --experts.epochs 3 --distill.max_start_epoch 1
             --distill.batch_syn 20 --distill.iterations 3 --distill.syn_steps 3
             --eval.model convnet --eval.epochs 2 --eval.runs 1)
    fi
    # 4 experts x 12 epochs instead of 10 x 30; 300 distillation iterations instead of 2,000;
    # 2 evaluation runs of 150 epochs instead of 3 of 1,000: a shortened run, say so with its numbers.
    python3 -m launch.cli run --config configs/fmnist_ipc300.yaml --workers 0 --run_dir "$run_dir" \
      --experts.num_experts 4 --experts.epochs 12 --distill.max_start_epoch 8 \
      --distill.iterations 300 --distill.checkpoint_every 100 --eval.runs 2 --eval.epochs 150 \
      --tune.beta_step 0.2 "${extra[@]}" 2>&1 | grep -v -e "it/s" -e "s/it" | tail -80 > "$OUT/fmnist.log"
    cp "$run_dir/report.md" "$run_dir/results.json" "$OUT/" 2>/dev/null
    cp "$run_dir/synset/selmatch.png" "$OUT/fmnist_selmatch.png" 2>/dev/null
    tail -20 "$OUT/fmnist.log"
    ;;
  *)
    echo "usage: bash bench/gpu_checks.sh matching|fmnist" >&2
    exit 2
    ;;
esac
