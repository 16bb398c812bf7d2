#!/bin/bash
# Runs the study's remaining runs, WORKERS at a time (default 2), one thread each: every worker takes the
# first line of the file QUEUE ("method seed [resume|per_task|joint]"; the lines it takes are removed) until it
# is empty or a file STOP exists beside QUEUE (each worker then ends after its current run). Run it from the
# root of the checkout whose code the study uses (README.md: the commit every run so far used); that
# checkout's cl_flat is put first on PYTHONPATH, so an installed cl-flat runs its code:
#   path/to/results/studies/real-cpu/run_queue.sh QUEUE [WORKERS]
# Runs are written to results/studies/real-cpu/<run.name>/ of that checkout, logs to logs/ beside QUEUE;
# collect.sh copies the finished ones into runs/. rwp runs with flatness.scope=base (the study's RWP).
# A run cut short is continued by a line "method seed resume" at the queue's head.
set -u
[ -f "${1:-}" ] || { echo "usage: run_queue.sh QUEUE [WORKERS] (QUEUE: a file of lines \"method seed [kind]\")" >&2; exit 2; }
QUEUE=$(realpath "$1"); WORKERS=${2:-2}; DIR=$(dirname "$QUEUE")
[ -f configs/studies/real-cpu/base.yaml ] || { echo "run_queue.sh: run it from a checkout's root" >&2; exit 2; }
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$DIR/logs"
worker() {
  export OMP_NUM_THREADS=1 TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch-extensions}-worker$1
  while [ ! -e "$DIR/STOP" ]; do
    line=$(flock "$QUEUE.lock" bash -c 'head -1 "$0"; sed -i 1d "$0"' "$QUEUE")
    [ -z "$line" ] && break
    read -r method seed kind <<< "$line"
    args=(--set run.seed="$seed" --set flatness.method="$method")
    [ "$method" = rwp ] && args+=(--set flatness.scope=base)
    case "$kind" in resume) args+=(--resume);; per_task|joint) args+=(--reference "$kind");; esac
    echo "$(date -u +%FT%T) worker $1 start: $line" >> "$DIR/logs/queue.log"
    cl-flat train configs/studies/real-cpu/base.yaml "${args[@]}" >> "$DIR/logs/$method-s$seed${kind:+-$kind}.log" 2>&1
    status=$?
    echo "$(date -u +%FT%T) worker $1 end (exit $status): $line" >> "$DIR/logs/queue.log"
  done
}
for w in $(seq "$WORKERS"); do worker "$w" & sleep 2; done
wait
