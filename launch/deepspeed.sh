#!/usr/bin/env bash
# DeepSpeed launcher. One node:  launch/deepspeed.sh configs/x.yaml
# Several nodes (passwordless ssh, same paths everywhere):  HOSTFILE=launch/hostfile.example launch/deepspeed.sh configs/x.yaml
set -euo pipefail
if [ -n "${HOSTFILE:-}" ]; then
  exec deepspeed --no_local_rank --hostfile "$HOSTFILE" --module cl_flat.cli train "$@"
fi
exec deepspeed --no_local_rank --module cl_flat.cli train "$@"
