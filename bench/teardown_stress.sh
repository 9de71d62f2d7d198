#!/usr/bin/env bash
# The documented 2-rank CPU recipe, RUNS times in a row beside BUSY busy-loop processes, counting
# the runs that did not end cleanly (exit status other than 0, "terminate called" at shutdown, or
# Runtime.close's warning that a process group outlived destroy_process_group). docs/design.md §11;
# figures in bench/results/teardown_stress.md.
#
#   bash bench/teardown_stress.sh [RUNS] [BUSY]        # default 40 runs, 2 busy loops (~10 min)
#
# Needs the project installed (README); works in a temporary directory it removes at the end.
set -u
RUNS=${1:-40}
BUSY=${2:-2}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
ACCELERATE=$(dirname "$(command -v "$PY")")/accelerate
WORK=$(mktemp -d)
# the quickstart shrunk to seconds (tests/ranks.py TINY)
TINY=(--seed 5 --data.train_per_class 30 --model.width 8 --model.depth 1
      --experts.num_experts 2 --experts.epochs 3 --experts.el2n_epoch 1 --experts.lr 0.05
      --experts.batch_size 32 --distill.max_start_epoch 2 --distill.expert_epochs 1
      --distill.syn_steps 3 --distill.batch_syn 20 --distill.bn_group 10 --distill.iterations 4
      --distill.checkpoint_every 2 --distill.log_every 2)
busy=()
cleanup() { [ ${#busy[@]} -gt 0 ] && kill "${busy[@]}" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

cd "$REPO"
"$PY" -m launch.cli experts --config configs/quickstart.yaml --run_dir "$WORK/base" --workers 0 \
    "${TINY[@]}" > "$WORK/prepare.log" 2>&1 &&
"$PY" -m launch.cli scores --config configs/quickstart.yaml --run_dir "$WORK/base" \
    "${TINY[@]}" >> "$WORK/prepare.log" 2>&1 || { cat "$WORK/prepare.log"; exit 1; }

for _ in $(seq "$BUSY"); do "$PY" -c "while True: pass" & busy+=($!); done
failed=0
start=$(date +%s)
for i in $(seq "$RUNS"); do
  run="$WORK/run$i"
  mkdir -p "$run" && cp -r "$WORK/base/experts" "$WORK/base/scores" "$run/"
  GLOO_SOCKET_IFNAME=lo OMP_NUM_THREADS=1 timeout 600 "$ACCELERATE" launch \
      --config_file launch/accelerate/cpu_2proc.yaml --main_process_port 0 distill/main.py \
      --config configs/quickstart.yaml --run_dir "$run" "${TINY[@]}" > "$run.log" 2>&1
  rc=$?
  why=""
  [ $rc -ne 0 ] && why="exit $rc"
  grep -q "terminate called" "$run.log" && why="$why, terminate called"
  grep -q "still referenced after destroy_process_group" "$run.log" && why="$why, group outlived close"
  if [ -n "$why" ]; then
    failed=$((failed + 1))
    echo "run $i: FAILED ($why); last lines:"; grep -v "distill selmatch" "$run.log" | tail -5
  else
    echo "run $i: ok"
  fi
  rm -rf "$run"
done
echo "teardown stress: $failed of $RUNS runs failed ($BUSY busy loops, $(( $(date +%s) - start )) s, torch $("$PY" -c 'import torch; print(torch.__version__)'), commit $(git rev-parse --short HEAD 2>/dev/null))"
[ "$failed" -eq 0 ]
