#!/usr/bin/env bash
# Train on one machine: torchrun --standalone with one process per GPU.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
    cat <<'USAGE'
usage: launch/single_node.sh CONFIG.yaml [--section.key VALUE ...]

Trains with one process per GPU of this machine (torchrun --standalone). Arguments after the
config are config overrides passed to the trainer unchanged.

environment:
  NPROC_PER_NODE   processes to start (default: the number of GPUs torch sees; required on CPU)
  PYTHON           interpreter with bltdist installed (default: python3)
  OMP_NUM_THREADS  CPU threads per process (default 1 on CPU-only runs is sensible)
  BLTDIST_SHUTDOWN_GRACE  seconds to wait for the checkpoint after a stop signal (default 600)

signals: SIGTERM, SIGINT (Ctrl-C), SIGHUP and SIGUSR1 go to the trainer processes, not to
torchrun: they finish the current step, save output_dir/checkpoints/step_N and exit 0, and so does
this script. The same signal again, or BLTDIST_SHUTDOWN_GRACE seconds without an exit, stops torchrun
(no checkpoint of that step) and the script exits non-zero.

exit codes: 0 success (also after a checkpoint on a signal), 2 bad config or environment,
other: the trainer failed or was stopped.

example:
  launch/single_node.sh configs/blt_1b.yaml --output_dir runs/blt_1b
  NPROC_PER_NODE=2 launch/single_node.sh configs/tiny_static.yaml    # CPU, gloo
USAGE
}

if wants_help "$@"; then usage; exit 0; fi
require_config "$@"
detect_nproc_per_node
run_torchrun --standalone --nnodes=1 --nproc_per_node="$NPROC_PER_NODE" -m bltdist.train "$@"
