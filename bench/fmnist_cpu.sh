#!/usr/bin/env bash
# The Fashion-MNIST comparison at CPU scale: configs/fmnist_cpu.yaml at IPC 50 and 100 (5% and
# 10% of its 10,000 training images), every row of the paper's comparison, 3 seeds x 2 evaluation
# networks, alpha and beta chosen by `selmatch tune` on the validation split, and the uncapped
# SelMatch row (one BN group over the whole set, a longer N) beside the capped one.
#
#   bash bench/fmnist_cpu.sh [ROOT]      # default runs/fmnist_cpu; about 2 hours on 2 cores
#
# Steps (each skips what is fresh, so the same command resumes after a kill):
#   1. experts (8 x 20 epochs, Ray) and forgetting scores, once, in ROOT/ipc50; ROOT/ipc100 gets
#      a copy (experts depend on the data, model, expert settings and seed, not on the IPC);
#   2. per IPC: `selmatch tune` (beta, then alpha, on the validation split), then `selmatch run`
#      at the tuned values; the IPCs (and step 3) run side by side, one evaluation at a time each
#      (in-process: --no-ray, --workers 0);
#   3. the uncapped row at IPC 50: `selmatch run` in ROOT/ipc50_uncapped on a copy of the experts
#      and scores, at the IPC-50 tuned values, with --distill.batch_syn null (every image of the
#      set in each student step), --distill.bn_group null (one BN group) and a longer N, one seed;
#   4. python bench/fmnist_report.py ROOT: the recorded table (bench/results/fmnist_cpu.md).
set -euo pipefail
cd "$(dirname "$0")/.."
root="${1:-runs/fmnist_cpu}"
cfg=configs/fmnist_cpu.yaml
sm() { python -m launch.cli "$@"; }
# experts trained before (e.g. by the pilot, same settings) may be brought along:
if [ -n "${EXPERTS_FROM:-}" ] && [ ! -e "$root/ipc50/experts" ]; then
  mkdir -p "$root/ipc50" && cp -r "$EXPERTS_FROM/experts" "$root/ipc50/experts"
fi
uncapped_steps=${UNCAPPED_STEPS:-20}
start=$(date +%s)
mkdir -p "$root"
echo "== $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD)$(git diff --quiet -- distill launch tune configs bench || echo +uncommitted code)" | tee "$root/times.txt"

sm experts --config "$cfg" --run_dir "$root/ipc50" --workers 2
sm scores --config "$cfg" --run_dir "$root/ipc50"
for d in ipc100 ipc50_uncapped; do
  mkdir -p "$root/$d"
  for part in experts scores; do
    [ -e "$root/$d/$part" ] || cp -r "$root/ipc50/$part" "$root/$d/$part"
  done
done
echo "experts+scores $(( $(date +%s) - start )) s" | tee -a "$root/times.txt"

selected() {  # the tuned overrides of a run directory: its own with --tuned, another's spelled out
  if [ "$1" = "$2" ]; then echo --tuned; else python bench/fmnist_starts.py overrides "$1"; fi
}

tune_ipc() {  # IPC, run directory
  local t0; t0=$(date +%s)
  sm tune --config "$cfg" --run_dir "$2" --select.ipc "$1" --no-ray > "$2/tune.log" 2>&1
  echo "ipc$1 tune $(( $(date +%s) - t0 )) s" >> "$root/times.txt"
}

run_ipc() {  # IPC, run directory, tuned values from, extra overrides...
  local ipc=$1 dir=$2 from=$3 t0; t0=$(date +%s); shift 3
  # shellcheck disable=SC2046
  sm run --config "$cfg" --run_dir "$dir" --select.ipc "$ipc" --workers 0 $(selected "$from" "$dir") "$@" \
    > "$dir/run.log" 2>&1
  echo "$(basename "$dir") run $(( $(date +%s) - t0 )) s" >> "$root/times.txt"
}

tune_ipc 50 "$root/ipc50" &
t50=$!
tune_ipc 100 "$root/ipc100" &
t100=$!
wait $t50
run_ipc 50 "$root/ipc50" "$root/ipc50" &
r50=$!
# the uncapped row: every image of the set in each student step, one BN group, a longer N
# (one seed: at 24 s per iteration on 2 shared cores a seed takes 40 minutes)
run_ipc 50 "$root/ipc50_uncapped" "$root/ipc50" --distill.batch_syn null --distill.bn_group null \
  --distill.syn_steps "$uncapped_steps" --eval.methods "[selmatch_dsa, selmatch]" --seeds 0 &
ru=$!
wait $t100
run_ipc 100 "$root/ipc100" "$root/ipc100" &
r100=$!
wait $r50 $ru $r100
echo "total $(( $(date +%s) - start )) s" | tee -a "$root/times.txt"
python bench/fmnist_report.py "$root"
