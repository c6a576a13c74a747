#!/usr/bin/env bash
# Train on several machines: run this once on every node with the same environment except NODE_RANK.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
    cat <<'USAGE'
usage: launch/multi_node.sh CONFIG.yaml [--section.key VALUE ...]

Run once on every node. The nodes meet at a c10d rendezvous hosted by node 0 at
MASTER_ADDR:MASTER_PORT; each starts NPROC_PER_NODE trainer processes. Arguments after the config
are config overrides passed to the trainer unchanged.

environment (required):
  NNODES           number of nodes in the job
  NODE_RANK        this node's index, 0 .. NNODES-1 (0 hosts the rendezvous)
  MASTER_ADDR      address of node 0 that every node can reach (not localhost on a real cluster)
environment (optional):
  MASTER_PORT      rendezvous port on node 0 (default 29500)
  NPROC_PER_NODE   processes per node (default: the number of GPUs torch sees; required on CPU)
  RDZV_TIMEOUT     seconds to wait for all nodes to join, or for node 0 to answer (default 300);
                   after that the script exits with code 3 and says what to check
  RDZV_ID          job id shared by the nodes (default bltdist-MASTER_PORT)
  PYTHON           interpreter with bltdist installed (default: python3)
  BLTDIST_SHUTDOWN_GRACE  seconds to wait for the checkpoint after a stop signal (default 600)

signals: SIGTERM, SIGINT (Ctrl-C), SIGHUP and SIGUSR1 go to this node's trainer processes, not to
torchrun. The ranks of all nodes agree to stop after the current step, save
output_dir/checkpoints/step_N and exit 0, so a signal to one node's script stops every node cleanly.
The same signal again, or BLTDIST_SHUTDOWN_GRACE seconds without an exit, stops torchrun (no checkpoint
of that step) and the script exits non-zero.

exit codes: 0 success (also after a checkpoint on a signal), 2 bad config or environment,
3 rendezvous failed, other: the trainer failed or was stopped.

example (two 8-GPU nodes):
  node0$ NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/multi_node.sh configs/blt_1b.yaml
  node1$ NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/multi_node.sh configs/blt_1b.yaml
USAGE
}

if wants_help "$@"; then usage; exit 0; fi
require_config "$@"
require_int NNODES 1
require_int NODE_RANK 0 $((NNODES - 1))
[[ -n ${MASTER_ADDR:-} ]] || fail 2 "MASTER_ADDR is not set; export the address of node 0 (see --help)"
MASTER_PORT=${MASTER_PORT:-29500}
require_int MASTER_PORT 1 65535
RDZV_TIMEOUT=${RDZV_TIMEOUT:-300}
require_int RDZV_TIMEOUT 1
detect_nproc_per_node
RDZV_ENDPOINT="$MASTER_ADDR:$MASTER_PORT"

# join_timeout bounds the wait for missing nodes, read_timeout the wait for an unreachable node 0;
# without them a wrong NNODES or address waits for the defaults (600 s and 60 s per try).
run_torchrun \
    --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" --node_rank="$NODE_RANK" \
    --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="${RDZV_ID:-bltdist-$MASTER_PORT}" \
    --rdzv_conf="join_timeout=$RDZV_TIMEOUT,read_timeout=$RDZV_TIMEOUT" \
    --max_restarts=0 \
    -m bltdist.train "$@"
