#!/usr/bin/env bash
# The GPU work of one device session, prepared so that it runs in one call per part.
#
#   bash bench/gpu_checks.sh matching   # eager / fast replay and the full unroll at the CIFAR-10
#                                       # IPC 250 shape (TF32 on, off), the fast path at |b| 1000 x N 55 and
#                                       # 5000 x 80, and the real distillation loop's s/iteration
#   SMOKE=1 bash bench/gpu_checks.sh matching   # the same on tiny shapes (checks the script on a CPU)
#   bash bench/gpu_checks.sh fmnist     # bench/fmnist_cpu.sh's comparison at full scale, shortened:
#                                       # Fashion-MNIST 5% and 10% (IPC 300, 600), tune, every row,
#                                       # the uncapped SelMatch row, 2 seeds
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
#   PYTHONPATH=/tmp/block SMOKE=1 bash bench/gpu_checks.sh matching     (and fmnist; both passed 2026-12-03, 3 min 26 s)
# Nothing here needs Ray: experts, tune trials and evaluations run in-process.
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
    # about 5 min of device time: eager replay, fast replay and the full unroll at
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
    # The comparison of bench/fmnist_cpu.sh (configs/fmnist_cpu.yaml: tune, then run, every row,
    # and the uncapped SelMatch row) at the paper's scale where it matters: the full 60,000
    # training images, ConvNet-BN width 128, ResNet-18 evaluation, IPC 300 and 600 (5% and 10%).
    # Budgets cut to fit ~5 minutes of one H200 (each report's command line and config say
    # which; so does $OUT/fmnist_command.txt): experts 3 x 6 epochs (config: 8 x 20), shared by
    # both ratios; selmatch tune with 5-iteration alpha trials; 20 distillation iterations per
    # set and seed (config: 100); 1 evaluation run x 15 epochs per seed and row (config: 2 x 100);
    # 2 seeds (config: 3). No Ray: experts, trials and evaluations run in-process.
    common=(--data.train_per_class null --model.width 128 --eval.model resnet18
            --experts.num_gpus 1 --experts.num_experts 3 --experts.epochs 6
            --distill.max_start_epoch 4 --distill.iterations 20 --distill.checkpoint_every 10
            --distill.log_every 10 --eval.runs 1 --eval.epochs 15 --tune.beta_step 0.2
            --tune.alpha_step 0.25 --tune.alpha_iterations 5 --tune.eval_runs 1)
    ipcs=(300 600); uncapped=(--distill.batch_syn null --distill.bn_group null --distill.syn_steps 20)
    if [ "${SMOKE:-0}" = 1 ]; then
      common+=(--data.train_per_class 40 --model.width 16 --eval.model convnet --experts.epochs 3
               --distill.max_start_epoch 1 --distill.batch_syn 20 --distill.iterations 3
               --distill.syn_steps 3 --eval.epochs 2 --tune.alpha_iterations 1)
      ipcs=(2 4); uncapped=(--distill.batch_syn null --distill.bn_group null --distill.syn_steps 4)
    fi
    base=/tmp/selmatch_fmnist
    rm -rf "$base"
    echo "configs/fmnist_cpu.yaml ${common[*]} (SMOKE=${SMOKE:-0}); IPC ${ipcs[*]}; uncapped: ${uncapped[*]}" \
      > "$OUT/fmnist_command.txt"
    sm() { python3 -m launch.cli "$@" 2>&1 | grep -v -e "it/s" -e "s/it"; }
    start=$(date +%s)
    sm experts --config configs/fmnist_cpu.yaml --run_dir "$base/ipc${ipcs[0]}" --workers 0 --select.ipc "${ipcs[0]}" "${common[@]}" \
      | tail -5 > "$OUT/fmnist_experts.log"
    sm scores --config configs/fmnist_cpu.yaml --run_dir "$base/ipc${ipcs[0]}" --select.ipc "${ipcs[0]}" "${common[@]}" | tail -2
    for run in "${ipcs[@]}" uncapped; do
      ipc=$run; extra=(); dir="$base/ipc$run"; from="$dir"
      if [ "$run" = uncapped ]; then ipc=${ipcs[0]}; extra=("${uncapped[@]}" "--eval.methods=[selmatch_dsa, selmatch]")
        from="$base/ipc${ipcs[0]}"; fi
      if [ "$dir" != "$base/ipc${ipcs[0]}" ]; then  # the experts and scores serve every run
        mkdir -p "$dir" && cp -r "$base/ipc${ipcs[0]}/experts" "$base/ipc${ipcs[0]}/scores" "$dir/"
      fi
      t0=$(date +%s)
      [ "$run" = uncapped ] || sm tune --config configs/fmnist_cpu.yaml --run_dir "$dir" --no-ray \
        --select.ipc "$ipc" "${common[@]}" | tail -8 > "$OUT/fmnist_${run}_tune.log"
      if [ "$from" = "$dir" ]; then tuned=--tuned; else tuned=$(python3 bench/fmnist_starts.py overrides "$from"); fi
      # shellcheck disable=SC2086
      sm run --config configs/fmnist_cpu.yaml --run_dir "$dir" --workers 0 --select.ipc "$ipc" \
        --seeds 0 1 "${common[@]}" $tuned "${extra[@]}" | tail -60 > "$OUT/fmnist_$run.log"
      echo "$run: $(( $(date +%s) - t0 )) s" >> "$OUT/fmnist_times.txt"
      for f in report.md results.json synset/selmatch.png; do
        cp "$dir/$f" "$OUT/fmnist_${run}_$(basename "$f")" 2>/dev/null
      done
    done
    echo "total: $(( $(date +%s) - start )) s" >> "$OUT/fmnist_times.txt"
    cat "$OUT/fmnist_times.txt"
    for run in "${ipcs[@]}" uncapped; do
      sed -n '/^## Conclusion/,/^## Results/p' "$OUT/fmnist_${run}_report.md" 2>/dev/null
    done
    ;;
  *)
    echo "usage: bash bench/gpu_checks.sh matching|fmnist" >&2
    exit 2
    ;;
esac
