#!/usr/bin/env bash
# cl-flat under torchrun on one node, N processes (CPU: gloo, GPUs: nccl, one GPU per process):
#   launch/torchrun.sh N CONFIG [cl-flat train args...]
#   launch/torchrun.sh 2 configs/quickstart.yaml --set run.name=quickstart-2ranks
#
# Environment (optional):
#   PYTHON     the interpreter that has cl_flat and torch (default python3); torchrun starts every rank
#              with it, so neither `torchrun` nor `cl-flat` need be on PATH
#   DRY_RUN=1  print the command and stop
# Several nodes: launch/slurm.sbatch (torchrun per node under SLURM) or launch/deepspeed.sh.
set -euo pipefail

if [ $# -lt 2 ]; then
  echo "usage: $0 NPROC CONFIG [cl-flat train args...]" >&2
  exit 2
fi
nproc=$1
shift
PYTHON=${PYTHON:-python3}
# --standalone: a private rendezvous on a free local port, so two jobs on one machine never collide
cmd=("$PYTHON" -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node "$nproc"
     -m cl_flat.cli train "$@")

printf '+'
printf ' %q' "${cmd[@]}"
printf '\n'
if [ "${DRY_RUN:-0}" = 1 ]; then
  exit 0
fi
exec "${cmd[@]}"
