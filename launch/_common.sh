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

# Preemption. The trainer handles SIGTERM and SIGUSR1 itself: it finishes the current step, saves a
# checkpoint and exits 0. torchrun must not get those signals: on SIGTERM it SIGKILLs its workers
# 30 s later and exits 1, and SIGUSR1 kills it at once. So torchrun runs in the background, in a
# session of its own (Ctrl-C, or a signal to this script's process group, reaches only this script)
# and with SIGUSR1 ignored (Slurm signals every process of a job step); this script passes SIGTERM,
# SIGINT and SIGHUP (as SIGTERM) and SIGUSR1 to torchrun's children, the trainer processes, and goes
# on waiting for torchrun, whose exit code (0 after the save) it returns. A signal that comes while
# the trainer processes are still starting (Slurm may send its time-limit warning seconds after the
# job starts) is held back until each of them has installed its handler: before that, SIGUSR1 would
# be ignored (inherited from torchrun) and SIGTERM would kill it unsaved. A second signal, or
# BLTDIST_SHUTDOWN_GRACE seconds (default 600) without an exit, sends SIGTERM to torchrun itself:
# it ends the trainer processes (SIGKILL after 30 s) and exits non-zero, with no checkpoint of the
# step in progress; SIGUSR1 after SIGTERM (or the reverse) is not a second signal but one request.
_shutdown_stage=0   # 0 training, 1 the trainer processes were asked to save and stop, 2 torchrun was stopped
_shutdown_events=0  # signals handled, so that a wait cut short by one is told from torchrun's exit
_torchrun_pid=
_grace_timer=
_forwarded=  # the signal passed to the trainer processes: USR1 or TERM

note() {
    echo "$(basename "$0"): $*" >&2
}

_children_of() {  # the pids of the processes whose parent is $1
    if command -v pgrep >/dev/null; then
        pgrep -P "$1" || true
    else
        cat /proc/"$1"/task/*/children 2>/dev/null || true
    fi
}

_stop_torchrun() {  # _stop_torchrun WHY: the forced stop
    _shutdown_stage=2
    note "$1: stopping torchrun (SIGTERM; it ends the trainer processes, with SIGKILL after 30 s); the step in progress is not saved"
    kill -s TERM "$_torchrun_pid" 2>/dev/null || true
}

_handles_signal() {  # _handles_signal PID SIG: PID has a handler for SIG (or /proc cannot say)
    local caught
    caught=$(awk '$1 == "SigCgt:" {print $2}' /proc/"$1"/status 2>/dev/null) || return 0
    [[ -z $caught ]] || (( 16#$caught >> ($(kill -l "$2") - 1) & 1 ))
}

_deliver_stop_signal() {  # _deliver_stop_signal SIG: SIG to every trainer process once it handles SIG
    local sig=$1 pid pending seen signalled=" "
    while kill -0 "$_torchrun_pid" 2>/dev/null; do
        pending=0 seen=0
        for pid in $(_children_of "$_torchrun_pid"); do
            seen=$((seen + 1))
            [[ $signalled == *" $pid "* ]] && continue
            if _handles_signal "$pid" "$sig"; then
                kill -s "$sig" "$pid" 2>/dev/null || true
                signalled+="$pid "
            else
                pending=$((pending + 1))
            fi
        done
        (( pending == 0 && seen >= ${NPROC_PER_NODE:-1} )) && return 0
        sleep 0.5
    done
}

_on_shutdown_signal() {  # trap of TERM, INT, HUP and USR1 while torchrun runs
    local sig=$1 forward
    _shutdown_events=$((_shutdown_events + 1))
    [[ -n $_torchrun_pid ]] || return 0  # torchrun not started yet: run_torchrun sees the stage
    forward=$sig
    [[ $sig == USR1 ]] || forward=TERM  # the trainer saves on SIGTERM and SIGUSR1 only
    case $_shutdown_stage in
    0)
        _shutdown_stage=1
        _forwarded=$forward
        note "got SIG$sig: asking the trainer processes to finish the step, save a checkpoint and exit" \
            "(SIG$forward to each once it is ready for it); waiting up to" \
            "BLTDIST_SHUTDOWN_GRACE=$BLTDIST_SHUTDOWN_GRACE s; the same signal again stops them without saving"
        # The helpers ignore the signals a whole job step may get, so that these cannot end them.
        ( trap '' INT TERM HUP USR1; _deliver_stop_signal "$forward" ) &
        ( trap '' INT TERM HUP USR1; sleep "$BLTDIST_SHUTDOWN_GRACE" && kill -s ALRM $$ ) &
        _grace_timer=$!
        ;;
    1)
        # Slurm sends SIGTERM to every process of a job it cancels, requeues or preempts, and the batch
        # shell passes it on as SIGUSR1 as well: one request. Only the same signal again insists.
        if [[ $forward != "$_forwarded" ]]; then
            note "got SIG$sig after SIG$_forwarded: the same request, already passed on"
        else
            _stop_torchrun "got a second signal (SIG$sig)"
        fi
        ;;
    *) note "got SIG$sig: already stopping torchrun" ;;
    esac
}

_on_grace_over() {
    _shutdown_events=$((_shutdown_events + 1))
    if (( _shutdown_stage == 1 )); then
        _stop_torchrun "the trainer processes did not exit within BLTDIST_SHUTDOWN_GRACE=$BLTDIST_SHUTDOWN_GRACE s"
    fi
}

_cancel_grace_timer() {
    [[ -n $_grace_timer ]] || return 0
    # The sleep first: its timer then ends without signalling.
    kill -s KILL $(_children_of "$_grace_timer") "$_grace_timer" 2>/dev/null || true
    wait "$_grace_timer" 2>/dev/null || true
    _grace_timer=
}

run_torchrun() {  # run_torchrun ARGS...: torchrun, its stderr also kept to explain a failed rendezvous
    local log status events sig
    BLTDIST_SHUTDOWN_GRACE=${BLTDIST_SHUTDOWN_GRACE:-600}
    require_int BLTDIST_SHUTDOWN_GRACE 1
    log=$(mktemp "${TMPDIR:-/tmp}/bltdist-launch.XXXXXX")
    set +e
    for sig in TERM INT HUP USR1; do
        trap "_on_shutdown_signal $sig" "$sig"
    done
    trap _on_grace_over ALRM
    local setsid=
    command -v setsid >/dev/null && setsid=setsid
    {
        # Not a process group leader (no job control), so setsid execs torchrun without forking:
        # $! is torchrun's pid. The trainer installs its own SIGUSR1 handler over the inherited SIG_IGN.
        ( trap '' USR1; exec $setsid "$PYTHON" -m torch.distributed.run "$@" ) &
        _torchrun_pid=$!
    } 2> >(trap '' INT TERM HUP USR1; exec tee "$log" >&2)
    if (( _shutdown_events > 0 && _shutdown_stage == 0 )); then
        _stop_torchrun "got a signal while torchrun was starting"
    fi
    while :; do
        events=$_shutdown_events
        wait "$_torchrun_pid"
        status=$?
        (( _shutdown_events == events )) && break  # torchrun ended
        kill -0 "$_torchrun_pid" 2>/dev/null && continue  # a signal cut the wait short
        # torchrun ended as a signal arrived: its status, unless this wait already returned it
        wait "$_torchrun_pid" 2>/dev/null
        events=$?
        (( events == 127 )) || status=$events
        break
    done
    trap '' TERM INT HUP USR1 ALRM  # torchrun is gone; nothing left to stop
    _cancel_grace_timer
    wait  # for tee, so the log is complete
    set -e
    if (( status != 0 && _shutdown_stage == 0 )) \
        && grep -q -E "Rendezvous(Timeout|Connection|Closed)Error|DistNetworkError|DistStoreError" "$log"; then
        rm -f "$log"
        fail 3 "the rendezvous at ${RDZV_ENDPOINT:-localhost} did not complete within ${RDZV_TIMEOUT:-its timeout} s:" \
            "check that NNODES=${NNODES:-1} nodes were started, that every node uses the same MASTER_ADDR:MASTER_PORT," \
            "and that node 0 is reachable there from every node (firewall, interface)"
    fi
    rm -f "$log"
    if (( _shutdown_stage == 1 && status == 0 )); then
        note "the trainer processes saved a checkpoint and exited"
    elif (( _shutdown_stage > 0 )); then
        note "torchrun exited with code $status after the stop signal"
    fi
    return "$status"
}
