#!/usr/bin/env bash
# The GPU work of one device session, prepared so that it runs in one call per part.
#
#   bash bench/gpu_checks.sh matching   # issue 10: eager / fast replay and the full unroll at the CIFAR-10
#                                       # IPC 250 shape (TF32 on, off), the fast path at |b| 1000 x N 55 and
#                                       # 5000 x 80, and the real distillation loop's s/iteration
#   SMOKE=1 bash bench/gpu_checks.sh matching   # the same on tiny shapes (checks the script on a CPU)
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
    # issue 10, about 5 min of device time: eager replay, fast replay and the full unroll at
    # 125 x 55 with TF32 on and off (grad err vs float64, host syncs), the fast path at
    # 1000 x 55 and 5000 x 80 (g 5000 and g 500), then the real loop on CIFAR-shaped data.
    budget="${BUDGET:-200}"
    bench=(--preset gpu-cifar10)
    ds=()
    if [ "${SMOKE:-0}" = 1 ]; then  # the same path on a CPU, tiny shapes
      bench=(--preset none --configs fast:8x2 replay:8x2 unrolled:8x2 --width 8 --image-size 8 --n-images 64 --iters 1 --threads 1)
      ds=(--smoke --distill.compile on)
    fi
    python3 bench/matching.py "${bench[@]}" --budget "$budget" --out "$OUT/matching_gpu" 2>&1 \
      | grep -v -i "warn" | tee "$OUT/matching.log"
    python3 bench/distill_speed.py --iterations 20 --skip 5 --bench "$OUT/matching_gpu.json" \
      --out "$OUT/distill_speed_gpu" "${ds[@]}" 2>&1 | tail -40 | tee "$OUT/distill_speed.log"
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
