#!/usr/bin/env bash
# cl-flat under the DeepSpeed launcher:  launch/deepspeed.sh CONFIG [cl-flat train args...]
#
#   One node, every GPU:             launch/deepspeed.sh configs/x.yaml
#   Several nodes over ssh:          HOSTFILE=launch/hostfile.example launch/deepspeed.sh configs/x.yaml
#                                    (run once, on the first host; needs passwordless ssh + pdsh and
#                                    the same paths on every node)
#   Several nodes, no ssh:           on node k (0 = the hostfile's first line):
#                                    HOSTFILE=hosts NO_SSH=1 NODE_RANK=k MASTER_ADDR=<node 0> launch/deepspeed.sh configs/x.yaml
#
# Environment (all optional unless stated):
#   PYTHON       the interpreter that has cl_flat and deepspeed (default python3); the launcher and every
#                rank run with it, so `deepspeed` need not be on PATH and no other venv can slip in
#   HOSTFILE     MPI-style "host slots=N" lines; the world is the sum of the slots
#   NO_SSH=1     this node starts only its own ranks (DeepSpeed's --no_ssh); needs HOSTFILE, NODE_RANK
#                (under srun: found from $SLURMD_NODENAME in HOSTFILE) and MASTER_ADDR
#   MASTER_ADDR  address of node 0 (without NO_SSH, DeepSpeed finds it by ssh-ing to the first host)
#   MASTER_PORT  rendezvous port on node 0 (default 29500, DeepSpeed's)
#   NUM_GPUS     ranks per node, the first N slots (DeepSpeed's --num_gpus)
#   INCLUDE      DeepSpeed's --include, e.g. "node-001:0,1@node-002"
#   DRY_RUN=1    print the command and stop
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: [HOSTFILE=... [NO_SSH=1 NODE_RANK=k MASTER_ADDR=host]] $0 CONFIG [cl-flat train args...]" >&2
  exit 2
fi
PYTHON=${PYTHON:-python3}
# `python -m deepspeed.launcher.runner` is what the `deepspeed` script runs; calling it through $PYTHON
# keeps the launcher and its ranks (it starts them with its own sys.executable) in one environment
cmd=("$PYTHON" -m deepspeed.launcher.runner)

if [ -n "${HOSTFILE:-}" ]; then
  # DeepSpeed only warns about a missing hostfile and then trains on this node alone: stop instead
  if [ ! -f "$HOSTFILE" ]; then
    echo "HOSTFILE=$HOSTFILE: no such file" >&2
    exit 2
  fi
  cmd+=(--hostfile "$HOSTFILE")
fi

if [ "${NO_SSH:-0}" = 1 ]; then
  if [ -z "${NODE_RANK:-}" ] && [ -n "${SLURMD_NODENAME:-}" ] && [ -f "${HOSTFILE:-}" ]; then
    # under srun (launch/slurm_deepspeed.sbatch): this node's line in the hostfile, counted the way
    # DeepSpeed numbers the nodes (comments and blank lines skipped)
    NODE_RANK=$(awk -v host="$SLURMD_NODENAME" '!/^[[:space:]]*(#|$)/ { if ($1 == host) { print n + 0; exit } n++ }' "$HOSTFILE")
  fi
  missing=()
  [ -n "${HOSTFILE:-}" ] || missing+=(HOSTFILE)        # the world (hosts, slots) comes only from it
  [ -n "${NODE_RANK:-}" ] || missing+=(NODE_RANK)      # which hostfile line this node is
  [ -n "${MASTER_ADDR:-}" ] || missing+=(MASTER_ADDR)  # else DeepSpeed would ssh to node 0 to ask for it
  if [ ${#missing[@]} -gt 0 ]; then
    echo "NO_SSH=1 needs ${missing[*]} (each node runs this script with its own NODE_RANK)" >&2
    exit 2
  fi
  cmd+=(--no_ssh --node_rank "$NODE_RANK")
fi
if [ -n "${MASTER_ADDR:-}" ]; then
  cmd+=(--master_addr "$MASTER_ADDR")
fi
# always explicit, so the printed command says where the ranks meet
cmd+=(--master_port "${MASTER_PORT:-29500}")
if [ -n "${NUM_GPUS:-}" ]; then
  cmd+=(--num_gpus "$NUM_GPUS")
fi
if [ -n "${INCLUDE:-}" ]; then
  cmd+=(--include "$INCLUDE")
fi
# --no_local_rank: cl-flat reads LOCAL_RANK from the environment and has no --local_rank option
cmd+=(--no_local_rank --module cl_flat.cli train "$@")

printf '+'
printf ' %q' "${cmd[@]}"
printf '\n'
if [ "${DRY_RUN:-0}" = 1 ]; then
  exit 0
fi
exec "${cmd[@]}"
