# Shell helpers shared by the benchmark scripts; source it, with a `log`
# function defined.

# terminate PID NAME: SIGTERM, wait up to 60 s, then SIGKILL; sets
# terminated_rc to its exit status. (Not in $(...): a subshell cannot wait
# for the caller's children.)
terminate() {
    local pid=$1 name=$2 i
    terminated_rc=0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 600; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name (pid $pid) still running 60 s after SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || terminated_rc=$?
}
