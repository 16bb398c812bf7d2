#!/bin/bash
# Copies every finished run (metrics.json written) of SRC (results/studies/real-cpu/ of the checkout
# run_queue.sh ran in; default: this folder) into runs/ beside this script — config.yaml, metrics.json,
# acc_matrix.csv or reference.csv, train_log.jsonl, landscape/sharpness.json and 1-D landscapes; never
# adapters or logs — and rebuilds the report from runs/.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(realpath "${1:-$HERE}")
for run in "$SRC"/real-cpu-*/; do
  name=$(basename "$run")
  [ -f "$run/metrics.json" ] || { echo "unfinished, left out: $name"; continue; }
  mkdir -p "$HERE/runs/$name"
  for file in config.yaml metrics.json acc_matrix.csv reference.csv train_log.jsonl; do
    [ -f "$run/$file" ] && cp "$run/$file" "$HERE/runs/$name/"
  done
  if [ -f "$run/landscape/sharpness.json" ]; then
    mkdir -p "$HERE/runs/$name/landscape"
    cp "$run"/landscape/sharpness.json "$run"/landscape/*_1d.csv "$HERE/runs/$name/landscape/" 2>/dev/null || true
  fi
done
cd "$HERE" && cl-flat report 'runs/*' --out . --baseline flatness.method=none
