#!/bin/bash
# usage: run.sh OLD NEW — OLD, NEW: git worktrees at 534d8ec (the reference table's code) and at the code under
# test; PYTHON: a python with cl-flat's dependencies (default: python). Three alternations of
# pairs_534d8ec.py in OLD and pairs.py in NEW (6 in-process none/one_pass pairs each), appended to results.txt.
HERE=$(cd "$(dirname "$0")" && pwd)
OLD=$(cd "$1" && pwd) NEW=$(cd "$2" && pwd) PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=2 WANDB_MODE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONWARNINGS=ignore
for i in 1 2 3; do
  echo "old $i $(cd "$OLD" && PYTHONPATH="$OLD" "$PYTHON" "$HERE"/pairs_534d8ec.py 6 2>&1 | grep RESULT)" >> "$HERE"/results.txt
  echo "new $i $(cd "$NEW" && PYTHONPATH="$NEW" "$PYTHON" "$HERE"/pairs.py 6 2>&1 | grep RESULT)" >> "$HERE"/results.txt
done
