# Shared by the launch scripts (sourced, not run). Exit codes: 2 = bad input (config, environment),
# 3 = the nodes did not meet at the rendezvous within RDZV_TIMEOUT seconds, else torchrun's.

PYTHON=${PYTHON:-python3}

fail() {  # fail CODE MESSAGE...
    local code=$1
    shift
    echo "$(basename "$0"): error: $*" >&2
    exit "$code"
}

wants_help() {
    local arg
    for arg in "$@"; do
        [[ $arg == -h || $arg == --help ]] && return 0
    done
    return 1
}

require_config() {  # require_config "$@": the first argument must be a readable YAML file
    [[ $# -ge 1 && $1 != -* ]] || fail 2 "missing config: give a config file first, e.g. $(basename "$0") configs/tiny_static.yaml [--key VALUE ...] (--help for more)"
    [[ -f $1 && -r $1 ]] || fail 2 "config $1 does not exist or is not readable; give the path of a YAML config such as configs/tiny_static.yaml"
}

require_int() {  # require_int NAME MIN [MAX]: $NAME must be set to an integer in [MIN, MAX]
    local name=$1 min=$2 max=${3:-} value=${!1:-}
    [[ -n $value ]] || fail 2 "$name is not set; export $name (see --help)"
    [[ $value =~ ^[0-9]+$ ]] || fail 2 "$name must be a whole number, got '$value'"
    (( value >= min )) || fail 2 "$name must be >= $min, got $value"
    [[ -z $max ]] || (( value <= max )) || fail 2 "$name must be <= $max, got $value"
}

detect_nproc_per_node() {  # NPROC_PER_NODE from the environment, else the number of visible GPUs
    if [[ -n ${NPROC_PER_NODE:-} ]]; then
        require_int NPROC_PER_NODE 1
        return
    fi
    local gpus
    gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null) \
        || fail 2 "cannot run $PYTHON with torch to count GPUs; activate the environment bltdist is installed in, or set PYTHON"
    (( gpus > 0 )) || fail 2 "no GPU visible to torch; set NPROC_PER_NODE to the number of processes per node (on CPU they use gloo)"
    NPROC_PER_NODE=$gpus
}

run_torchrun() {  # run_torchrun ARGS...: torchrun, its stderr also kept to explain a failed rendezvous
    local log status
    log=$(mktemp "${TMPDIR:-/tmp}/bltdist-launch.XXXXXX")
    set +e
    "$PYTHON" -m torch.distributed.run "$@" 2> >(tee "$log" >&2)
    status=$?
    wait  # for tee, so the log is complete
    set -e
    if (( status != 0 )) && grep -q -E "Rendezvous(Timeout|Connection|Closed)Error|DistNetworkError|DistStoreError" "$log"; then
        rm -f "$log"
        fail 3 "the rendezvous at ${RDZV_ENDPOINT:-localhost} did not complete within ${RDZV_TIMEOUT:-its timeout} s:" \
            "check that NNODES=${NNODES:-1} nodes were started, that every node uses the same MASTER_ADDR:MASTER_PORT," \
            "and that node 0 is reachable there from every node (firewall, interface)"
    fi
    rm -f "$log"
    return "$status"
}
