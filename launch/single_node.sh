#!/usr/bin/env bash
# One node, N processes (GPUs, or CPU processes with gloo):
#   launch/single_node.sh CONFIG.yaml [NPROC] [--resume] [section.key=value ...]
# NPROC defaults to the number of visible GPUs (1 without GPUs). World size = tp x dp.
# A failed or killed worker restarts the whole group up to MAX_RESTARTS times (default 1); the
# restarted run resumes from the newest intact checkpoint by itself (docs/reliability.md).
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 CONFIG.yaml [NPROC] [--resume] [section.key=value ...]" >&2
  exit 2
fi
config=$1
shift
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then
  nproc=$1
  shift
else
  nproc=$(nvidia-smi -L 2>/dev/null | wc -l)
  (( nproc > 0 )) || nproc=1
fi
exec torchrun --standalone --nproc-per-node "$nproc" --max-restarts "${MAX_RESTARTS:-1}" \
  -m megatron_dta train --config "$config" "$@"
