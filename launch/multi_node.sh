#!/usr/bin/env bash
# Many nodes: run this on every node with the same MASTER_ADDR/MASTER_PORT and its own NODE_RANK.
#   MASTER_ADDR=node0 MASTER_PORT=29500 NNODES=2 NODE_RANK=0 NPROC_PER_NODE=8 \
#     launch/multi_node.sh CONFIG.yaml [--resume] [section.key=value ...]
# Rendezvous is torchrun's c10d one at MASTER_ADDR:MASTER_PORT (node 0 hosts it), which lets the
# nodes meet again after a failure: a failed or killed worker on any node restarts every node's
# workers, up to MAX_RESTARTS times (default 1), and the restarted run resumes from the newest
# intact checkpoint by itself (docs/reliability.md). The run directory (checkpoint.run_dir) must
# be on a file system every node sees.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: MASTER_ADDR=... MASTER_PORT=... NNODES=... NODE_RANK=... $0 CONFIG.yaml [args ...]" >&2
  exit 2
fi
: "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}"
: "${MASTER_PORT:=29500}"
: "${NNODES:?set NNODES to the number of nodes}"
: "${NODE_RANK:?set NODE_RANK to the index of this node (0 .. NNODES-1)}"
: "${NPROC_PER_NODE:=$(nvidia-smi -L 2>/dev/null | wc -l)}"
config=$1
shift
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-megatron-dta}" \
  --max-restarts "${MAX_RESTARTS:-1}" -m megatron_dta train --config "$config" "$@"
