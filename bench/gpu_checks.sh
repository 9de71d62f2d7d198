#!/usr/bin/env bash
# The GPU work of one device session, prepared so that it runs in one call per part.
#
#   bash bench/gpu_checks.sh matching   # issue 10: eager / fast replay and the full unroll at the CIFAR-10
#                                       # IPC 250 shape (TF32 on, off), the fast path at |b| 1000 x N 55 and
#                                       # 5000 x 80, and the real distillation loop's s/iteration
#   SMOKE=1 bash bench/gpu_checks.sh matching   # the same on tiny shapes (checks the script on a CPU)
#   bash bench/gpu_checks.sh fmnist     # shortened Fashion-MNIST 5% and 10% (IPC 300, 600): the paper's
#                                       # rows (Table 1 baselines, Table 3 ablation, init alone), 2 seeds
#   SMOKE=1 bash bench/gpu_checks.sh fmnist   # the same on a tiny subset (checks the script on a CPU)
#
# The GPU host has torch, accelerate, numpy, matplotlib, but neither Ray, kornia nor DeepSpeed and
# no internet. Before the call, on the development machine:
#   echo /.whl/ >> .git/info/exclude; echo /.data/ >> .git/info/exclude   (.data is git-ignored already)
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl kornia==0.9.0 kornia_rs==0.2.0
#   mkdir -p .data/fashion_mnist && cp /usr/share/datasets/fashion-mnist/*.gz .data/fashion_mnist/
# then call the device tool with carry [".whl", ".data"] and this script; results land in $OUT.
# To check on a CPU that nothing imports what the GPU image lacks (Ray, scikit-learn, TensorBoard,
# DeepSpeed), shadow them with stubs that raise ImportError and run the smoke modes:
#   mkdir -p /tmp/block; for m in ray sklearn tensorboard tensorboardX deepspeed; do mkdir -p /tmp/block/$m;
#     echo "raise ImportError('$m: not on the GPU image')" > /tmp/block/$m/__init__.py; done
#   PYTHONPATH=/tmp/block SMOKE=1 bash bench/gpu_checks.sh matching     (passed 2026-11-30)
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
    # One call, both ratios, every row of the paper's comparison, 2 repetition seeds, budgets cut to
    # fit ~5 minutes of one H200 (each report's command line and config say which; so does
    # $OUT/fmnist_command.txt):
    #   experts 3 x 6 epochs (config: 10 x 30), trained once and shared by both ratios, T+ = 4;
    #   distillation 20 iterations (config: 2,000) for each of SelMatch, MTT, select-init + full
    #   update, per seed; evaluation ConvNet-BN, 1 run x 15 epochs per seed and row (config:
    #   ResNet-18, 3 runs, the 25%-budget epoch rule); window search with beta step 0.2.
    # Estimate from DESIGN.md 4's anchors (expert epoch ~1 s at 50k images; replay step ~13 ms at
    # |b| 125; ConvNet step ~3-5 ms): experts ~25 s, 12 distillations x ~6 s, 32 evaluation runs
    # (360 or 705 steps each) ~90 s, window searches ~5 s, start-up,
    # CUDA init and ~15 dataset decodes ~50 s: about 4 minutes.
    common=(--workers 0 --seeds 0 1 --experts.num_gpus 1 --experts.num_experts 3
            --experts.epochs 6 --distill.max_start_epoch 4 --distill.iterations 20
            --distill.checkpoint_every 10 --distill.log_every 10 --eval.model convnet
            --eval.runs 1 --eval.epochs 15 --tune.beta_step 0.2)
    smoke300=(); smoke600=()
    if [ "${SMOKE:-0}" = 1 ]; then
      common+=(--data.train_per_class 40 --model.width 16 --experts.epochs 3
               --distill.max_start_epoch 1 --distill.batch_syn 20 --distill.iterations 3
               --distill.syn_steps 3 --eval.epochs 2)
      smoke300=(--select.ipc 10 --select.beta 0.2); smoke600=(--select.ipc 20 --select.beta 0.2)
    fi
    base=/tmp/selmatch_fmnist
    rm -rf "$base"
    echo "selmatch run --config configs/fmnist_ipc{300,600}.yaml ${common[*]} (SMOKE=${SMOKE:-0})" \
      > "$OUT/fmnist_command.txt"
    start=$(date +%s)
    for ipc in 300 600; do
      run_dir="$base/ipc$ipc"
      if [ "$ipc" = 600 ]; then  # the experts and scores of IPC 300 serve IPC 600 (same settings)
        mkdir -p "$run_dir" && cp -r "$base/ipc300/experts" "$base/ipc300/scores" "$run_dir/" 2>/dev/null
        extra=("${smoke600[@]}")
      else
        extra=("${smoke300[@]}")
      fi
      t0=$(date +%s)
      python3 -m launch.cli run --config "configs/fmnist_ipc$ipc.yaml" --run_dir "$run_dir" \
        "${common[@]}" "${extra[@]}" 2>&1 | grep -v -e "it/s" -e "s/it" | tail -60 > "$OUT/fmnist_ipc$ipc.log"
      echo "ipc $ipc: $(( $(date +%s) - t0 )) s" >> "$OUT/fmnist_times.txt"
      cp "$run_dir/report.md" "$OUT/fmnist_ipc${ipc}_report.md" 2>/dev/null
      cp "$run_dir/results.json" "$OUT/fmnist_ipc${ipc}_results.json" 2>/dev/null
      cp "$run_dir/synset/selmatch.png" "$OUT/fmnist_ipc${ipc}_selmatch.png" 2>/dev/null
    done
    echo "total: $(( $(date +%s) - start )) s" >> "$OUT/fmnist_times.txt"
    cat "$OUT/fmnist_times.txt"
    for ipc in 300 600; do sed -n '/^## Results/,/^Accuracy:/p' "$OUT/fmnist_ipc${ipc}_report.md" 2>/dev/null; done
    ;;
  *)
    echo "usage: bash bench/gpu_checks.sh matching|fmnist" >&2
    exit 2
    ;;
esac
