#!/usr/bin/env bash
# One node, N processes (CPU: gloo, GPU: nccl):  launch/torchrun.sh 2 configs/quickstart.yaml [--set k=v ...]
set -euo pipefail
nproc=$1; shift
exec torchrun --no-python --standalone --nproc_per_node "$nproc" cl-flat train "$@"
