#!/usr/bin/env bash
# Which start and which batch make SelMatch beat random selection on Fashion-MNIST at CPU scale
# (configs/fmnist_cpu.yaml: 10,000 training images, ConvNet width 32, 100 distillation
# iterations, 3 seeds x 2 evaluation networks). In parts that each finish in under two hours on
# 2 cores; every part records its table in bench/results/fmnist_starts_<part>.{md,json} when it
# ends (the command, the code version and the wall time with it), so that work survives the end
# of a session. Each part skips what is fresh: the same command resumes after a kill.
#
#   bash bench/fmnist_starts.sh experts  [ROOT]   # 8 experts x 20 epochs, forgetting scores
#   bash bench/fmnist_starts.sh ipc50    [ROOT]   # tune, then random / window / SelMatch from
#   bash bench/fmnist_starts.sh ipc100   [ROOT]   #   the window / SelMatch from the random start
#   bash bench/fmnist_starts.sh batch500 [ROOT]   # IPC 50, the start validation picks, |b| 500
#                                                 #   (every image, one BN group), N 10
#   bash bench/fmnist_starts.sh steps20  [ROOT]   # IPC 50, the same start, |b| 50, N 20
#   bash bench/fmnist_starts.sh ipc300   [ROOT]   # IPC 300 (30%), one seed: random vs both starts
#
# ROOT defaults to runs/fmnist_starts. Parts after `experts` need it; batch500 and steps20 need
# ipc50 (its tuned start and alpha). SelMatch's rows are pinned to a window start
# (--select.init window, the searched beta) and the random start's are the random_partial rows,
# so that both starts are measured whichever one validation picks; which one it picks is in
# the window search (and tune's start) that each table reports.
set -euo pipefail
cd "$(dirname "$0")/.."
part="${1:?part: experts, ipc50, ipc100, batch500, steps20 or ipc300}"
root="${2:-runs/fmnist_starts}"
cfg=configs/fmnist_cpu.yaml
sm() { python -m launch.cli "$@"; }
mkdir -p "$root"
start=$(date +%s)
version="$(git rev-parse --short HEAD)$(git diff --quiet -- distill launch tune configs bench || echo +uncommitted)"
rows_both="[random, window, selmatch_dsa, selmatch, random_partial_dsa, random_partial]"

copy_inputs() {  # run directory: the experts and scores of ROOT/ipc50 (the IPC changes neither)
  mkdir -p "$1"
  for p in experts scores; do [ -e "$1/$p" ] || cp -r "$root/ipc50/$p" "$1/$p"; done
}

picked_rows() {  # the rows of the start validation picked at IPC 50 (tune's start)
  if [ "$(python bench/fmnist_starts.py start "$root/ipc50")" = random ]; then
    echo "[random_partial_dsa, random_partial]"
  else
    echo "[selmatch_dsa, selmatch]"
  fi
}

case "$part" in
  experts)
    sm experts --config "$cfg" --run_dir "$root/ipc50" --workers 2
    sm scores --config "$cfg" --run_dir "$root/ipc50"
    cmd="sm experts --config $cfg --run_dir $root/ipc50 --workers 2 && sm scores ..."
    ;;
  ipc50|ipc100)
    ipc=${part#ipc}; dir="$root/$part"
    [ "$part" = ipc50 ] || copy_inputs "$dir"
    sm tune --config "$cfg" --run_dir "$dir" --select.ipc "$ipc" --no-ray > "$dir/tune.log" 2>&1
    cmd="selmatch run --config $cfg --run_dir $dir --select.ipc $ipc --workers 0 --tuned --select.init window --eval.methods '$rows_both'"
    sm run --config "$cfg" --run_dir "$dir" --select.ipc "$ipc" --workers 0 --tuned \
      --select.init window --eval.methods "$rows_both" > "$dir/run.log" 2>&1
    ;;
  batch500|steps20)
    dir="$root/ipc50_$part"; copy_inputs "$dir"
    if [ "$part" = batch500 ]; then knobs=(--distill.batch_syn null --distill.bn_group null)
    else knobs=(--distill.syn_steps 20); fi
    # the IPC-50 tuned start and alpha, at another |b| or N (tune's choice is stale for them)
    read -r -a tuned <<< "$(python bench/fmnist_starts.py overrides "$root/ipc50")"
    rows=$(picked_rows)
    cmd="selmatch run --config $cfg --run_dir $dir --workers 0 ${tuned[*]} ${knobs[*]} --eval.methods '$rows'"
    sm run --config "$cfg" --run_dir "$dir" --workers 0 "${tuned[@]}" "${knobs[@]}" \
      --eval.methods "$rows" > "$dir/run.log" 2>&1
    ;;
  ipc300)
    dir="$root/ipc300"; copy_inputs "$dir"
    read -r -a tuned <<< "$(python bench/fmnist_starts.py overrides "$root/ipc50" --alpha-only)"
    rows="[random, selmatch_dsa, random_partial_dsa]"
    cmd="selmatch run --config $cfg --run_dir $dir --select.ipc 300 --select.init window --workers 0 --seeds 0 ${tuned[*]} --eval.methods '$rows'"
    sm run --config "$cfg" --run_dir "$dir" --select.ipc 300 --select.init window --workers 0 \
      --seeds 0 "${tuned[@]}" --eval.methods "$rows" > "$dir/run.log" 2>&1
    ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
seconds=$(( $(date +%s) - start ))
echo "$part $seconds s (code $version)" | tee -a "$root/times.txt"
[ "$part" = experts ] || python bench/fmnist_starts.py table "$root" "$part" --seconds "$seconds" \
  --version "$version" --command "$cmd"
