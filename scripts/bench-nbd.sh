#!/usr/bin/env bash
# Benchmarks three NBD servers with fio's nbd engine, one after the other, on
# the same disk directory: `hlfs serve`, qemu-nbd on a raw file, and nbdkit's
# file plugin on a raw file. Prints the machine, a table, and the ratio of
# hlfs to the best of the other two for each workload against the targets.
#
# Usage:
#   scripts/bench-nbd.sh [--dir DIR] [--size SIZE] [--runtime SECONDS]
#                        [--only hlfs|qemu-nbd|nbdkit[,...]] [--json-out FILE]
#                        [--keep] [--ramp SECONDS] [--precondition-timeout SECONDS]
#                        [--qemu-cache MODE] [--nbdkit-cache default|none]
#
#   --dir DIR            where images, volume and sockets go (default /var/tmp/hlfs-bench-nbd);
#                        each run works in a fresh DIR/run.XXXXXX that is removed at exit
#   --size SIZE          export size, 1024-based suffixes (default 4G)
#   --runtime SECONDS    measured time per workload (default 20), after --ramp (default 2)
#   --only LIST          run a subset; repeatable or comma-separated (default: all three)
#   --json-out FILE      also write every number as JSON to FILE
#   --keep               keep the run directory: images, volume, fio JSON, server logs
#   --precondition-timeout S  bound for the initial full sequential write (default 1200)
#   --qemu-cache MODE    qemu-nbd --cache (default none, with --aio=native)
#   --nbdkit-cache MODE  nbdkit file plugin cache= (default none)
#
# Examples:
#   scripts/bench-nbd.sh                                    # everything, 4 GiB, 20 s per workload
#   scripts/bench-nbd.sh --size 1G --runtime 5 --only qemu-nbd,nbdkit
#   scripts/bench-nbd.sh --json-out nbd.json > nbd.md       # Markdown on stdout, progress on stderr
#
# Workloads (fio ioengine=nbd, uri=nbd+unix:///NAME?socket=SOCK, the whole
# export, time_based, group_reporting), after one sequential 1 MiB QD 8 write
# of the whole export per server (so reads hit allocated data):
#   randwrite        4 KiB random writes, QD 32, 1 job
#   randread         4 KiB random reads, QD 32, 1 job
#   seqwrite         1 MiB sequential writes, QD 8
#   seqread          1 MiB sequential reads, QD 8
#   randwrite-fsync  4 KiB random writes, fsync=1 (NBD FLUSH after each), 8 jobs x QD 1
# For each: IOPS, MB/s, p50/p99 completion latency, the server process's
# CPU seconds (utime+stime from /proc/PID/stat, all threads) over the fio run
# (also per GiB moved and per 100K I/Os), and its peak RSS during the
# workload (VmHWM, reset before each). scripts/bench-nbd-repeat.sh runs the
# whole benchmark several times and reports each ratio's median and spread.
#
# Servers listen on unix sockets in the run directory only. Every step is
# bounded by `timeout`; the EXIT trap stops every server this script started
# (SIGTERM, then SIGKILL after 60 s) and removes the run directory unless --keep.
# The hlfs leg is skipped, loudly, if `hlfs serve` does not exist yet.
#
# Exit status: 0 if every selected leg ran cleanly (a skipped hlfs leg is a
# warning unless hlfs was the only one selected); 1 otherwise; 2 on bad usage.
#
# Environment: CARGO (default cargo); HLFS_BENCH_SKIP_BUILD=1 to reuse an
# existing target/release/hlfs; HLFS_CREATE_ARGS / HLFS_SERVE_ARGS: extra
# words for `hlfs create` / `hlfs serve` (e.g. HLFS_SERVE_ARGS="--map-budget 1G").
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
invocation="scripts/bench-nbd.sh${*:+ $*}"

usage() { sed -n '2,/^set -euo pipefail/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2; }
die() { echo "bench-nbd: $*" >&2; exit 2; }
log() { echo "bench-nbd: $*" >&2; }
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"
loud() {
    {
        echo "######################################################################"
        echo "### bench-nbd: $*"
        echo "######################################################################"
    } >&2
}

dir=/var/tmp/hlfs-bench-nbd
size_arg=4G
runtime=20
ramp=2
only=()
json_out=
keep=0
precond_timeout=1200
qemu_cache=none
nbdkit_cache=none

while (($#)); do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --dir) dir=${2:?--dir needs a value}; shift 2 ;;
        --dir=*) dir=${1#*=}; shift ;;
        --size) size_arg=${2:?--size needs a value}; shift 2 ;;
        --size=*) size_arg=${1#*=}; shift ;;
        --runtime) runtime=${2:?--runtime needs a value}; shift 2 ;;
        --runtime=*) runtime=${1#*=}; shift ;;
        --ramp) ramp=${2:?--ramp needs a value}; shift 2 ;;
        --ramp=*) ramp=${1#*=}; shift ;;
        --only) IFS=, read -r -a o <<<"${2:?--only needs a value}"; only+=("${o[@]}"); shift 2 ;;
        --only=*) IFS=, read -r -a o <<<"${1#*=}"; only+=("${o[@]}"); shift ;;
        --json-out) json_out=${2:?--json-out needs a value}; shift 2 ;;
        --json-out=*) json_out=${1#*=}; shift ;;
        --keep) keep=1; shift ;;
        --precondition-timeout) precond_timeout=${2:?}; shift 2 ;;
        --precondition-timeout=*) precond_timeout=${1#*=}; shift ;;
        --qemu-cache) qemu_cache=${2:?}; shift 2 ;;
        --qemu-cache=*) qemu_cache=${1#*=}; shift ;;
        --nbdkit-cache) nbdkit_cache=${2:?}; shift 2 ;;
        --nbdkit-cache=*) nbdkit_cache=${1#*=}; shift ;;
        *) usage; die "unknown argument: $1" ;;
    esac
done

[[ $runtime =~ ^[1-9][0-9]*$ ]] || die "--runtime must be a positive integer (seconds)"
[[ $ramp =~ ^[0-9]+$ ]] || die "--ramp must be an integer (seconds)"
[[ $precond_timeout =~ ^[1-9][0-9]*$ ]] || die "--precondition-timeout must be a positive integer"
case $nbdkit_cache in default | none) ;; *) die "--nbdkit-cache must be default or none" ;; esac
case $qemu_cache in none | writeback | writethrough | directsync | unsafe) ;; *) die "bad --qemu-cache $qemu_cache" ;; esac
size=$(numfmt --from=iec "${size_arg%B}" 2>/dev/null) || die "--size $size_arg is not a size (use e.g. 1G, 4G, 512M)"
((size >= 16 * 1024 * 1024 && size % 4096 == 0)) || die "--size must be at least 16M and a multiple of 4K"
size_human=$(numfmt --to=iec-i --suffix=B "$size")

servers=(hlfs qemu-nbd nbdkit)
if ((${#only[@]})); then
    for s in "${only[@]}"; do
        case $s in hlfs | qemu-nbd | nbdkit) ;; *) die "--only: unknown server '$s' (hlfs, qemu-nbd, nbdkit)" ;; esac
    done
    sel=()
    for s in "${servers[@]}"; do
        for o in "${only[@]}"; do [[ $s == "$o" ]] && { sel+=("$s"); break; }; done
    done
    servers=("${sel[@]}")
fi

for tool in fio nbdinfo python3 timeout numfmt getconf; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install -y fio libnbd-bin nbdkit qemu-utils)"
done
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine"
for s in "${servers[@]}"; do
    case $s in
        qemu-nbd) command -v qemu-nbd >/dev/null || die "qemu-nbd not found (apt-get install -y qemu-utils)" ;;
        nbdkit) command -v nbdkit >/dev/null || die "nbdkit not found (apt-get install -y nbdkit)" ;;
    esac
done

clk_tck=$(getconf CLK_TCK)
pdeath=()
# If this script is SIGKILLed, its servers get SIGTERM from the kernel.
if command -v setpriv >/dev/null && setpriv --pdeathsig TERM true 2>/dev/null; then pdeath=(setpriv --pdeathsig TERM); fi

# ---------------------------------------------------------------- build hlfs
hlfs=$repo/target/release/hlfs
hlfs_state=unselected
hlfs_note=
if [[ " ${servers[*]} " == *" hlfs "* ]]; then
    hlfs_state=ok
    if [[ ${HLFS_BENCH_SKIP_BUILD:-0} != 1 ]]; then
        log "building: ${CARGO:-cargo} build --release -p hlfs"
        if ! (cd "$repo" && timeout 1800 "${CARGO:-cargo}" build --release -p hlfs >&2); then
            hlfs_state=skipped
            hlfs_note="cargo build --release -p hlfs failed"
        fi
    fi
    if [[ $hlfs_state == ok && ! -x $hlfs ]]; then
        hlfs_state=skipped
        hlfs_note="$hlfs not found"
    fi
    if [[ $hlfs_state == ok ]] && ! timeout 30 "$hlfs" serve --help >/dev/null 2>&1; then
        hlfs_state=skipped
        hlfs_note="'hlfs serve' is not available in $hlfs (not implemented yet?)"
    fi
    if [[ $hlfs_state != ok ]]; then
        loud "SKIPPING THE HLFS LEG: $hlfs_note"
    fi
fi

# ---------------------------------------------------------------- run dir, cleanup
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
run=$(mktemp -d "$dir/run.XXXXXX")
res=$run/results
mkdir -p "$res"
: >"$res/servers.tsv"
: >"$res/runs.tsv"
if ((${#run} + 20 > 107)); then
    rmdir "$res" "$run"
    die "--dir path too long for unix sockets (sun_path is 108 bytes): $run"
fi

server_pid=
server_name=
fio_pid=
stop_server() {
    # stop_server -> sets server_rc; SIGTERM, wait up to 60 s, then SIGKILL.
    server_rc=
    [[ -n $server_pid ]] || return 0
    local pid=$server_pid
    server_pid=
    terminate "$pid" "$server_name"
    server_rc=$terminated_rc
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n $fio_pid ]]; then
        kill -TERM "$fio_pid" 2>/dev/null || true
        wait "$fio_pid" 2>/dev/null || true
    fi
    stop_server || true
    if ((keep)); then
        log "kept $run (images, volume, fio JSON in results/, server logs)"
    else
        rm -rf -- "$run"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# ---------------------------------------------------------------- machine note
commit=$(cd "$repo" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
if ! (cd "$repo" && git diff --quiet HEAD 2>/dev/null); then commit="$commit (modified)"; fi
cpu_model=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//' || true)
cpu_model=${cpu_model:-unknown}
mem=$(free -g | awk '/^Mem:/ {print $2 " GiB"}')
fs=$(df -T "$run" | awk 'NR == 2 {print $2 " on " $1}')
hlfs_version=-
if [[ $hlfs_state == ok ]]; then hlfs_version=$(timeout 10 "$hlfs" --version 2>&1 | head -1 || true); fi
{
    echo "date:     $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host:     $(uname -n) ($(uname -srm))"
    echo "cpus:     $(nproc) ($cpu_model)"
    echo "commit:   $commit"
    echo "memory (free -g):"
    free -g | sed 's/^/  /'
    echo "disk of $dir (df -hT):"
    df -hT "$run" | sed 's/^/  /'
    echo "fio:      $(fio --version 2>&1 | head -1)"
    echo "qemu-nbd: $(qemu-nbd --version 2>/dev/null | head -1 || echo missing)"
    echo "nbdkit:   $(nbdkit --version 2>/dev/null | head -1 || echo missing)"
    echo "nbdinfo:  $(nbdinfo --version 2>/dev/null | head -1 || echo missing)"
    echo "hlfs:     $hlfs_version"
    echo "run:      $invocation"
    echo "export:   $size_human ($size bytes), ${runtime}s per workload after ${ramp}s ramp, servers: ${servers[*]}"
} >"$res/machine.txt"
{
    echo "== machine =="
    cat "$res/machine.txt"
} >&2

avail=$(df -B1 --output=avail "$run" | tail -1 | tr -d ' ')
if ((avail < 3 * size)); then
    log "warning: only $(numfmt --to=iec-i --suffix=B "$avail") free in $dir; a leg needs the export size plus whatever its log grows to"
fi

P_DATE=$(date -u +%Y-%m-%d) P_INVOCATION=$invocation P_COMMIT=$commit P_CPUS=$(nproc) \
    P_CPU_MODEL=$cpu_model P_MEM=$mem P_KERNEL=$(uname -r) P_DIR=$dir P_FS=$fs P_SIZE=$size \
    P_SIZE_HUMAN=$size_human P_RUNTIME=$runtime P_RAMP=$ramp P_QEMU_CACHE=$qemu_cache \
    P_NBDKIT_CACHE=$nbdkit_cache P_SERVERS="${servers[*]}" python3 - "$res/params.json" <<'EOF'
import json, os, sys
e = os.environ
json.dump({
    "date": e["P_DATE"], "invocation": e["P_INVOCATION"], "commit": e["P_COMMIT"],
    "cpus": int(e["P_CPUS"]), "cpu_model": e["P_CPU_MODEL"], "mem": e["P_MEM"],
    "kernel": e["P_KERNEL"], "dir": e["P_DIR"], "fs": e["P_FS"],
    "size_bytes": int(e["P_SIZE"]), "size_human": e["P_SIZE_HUMAN"],
    "runtime": int(e["P_RUNTIME"]), "ramp": int(e["P_RAMP"]),
    "qemu_cache": e["P_QEMU_CACHE"], "nbdkit_cache": e["P_NBDKIT_CACHE"],
    "servers": e["P_SERVERS"].split(),
}, open(sys.argv[1], "w"), indent=2)
EOF

# ---------------------------------------------------------------- helpers
cpu_ticks() { # utime+stime of PID (all threads), in clock ticks
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
    stat=${stat##*) } # drop "pid (comm) ", comm may contain spaces
    # shellcheck disable=SC2086
    set -- $stat
    echo $((${12} + ${13}))
}
rss_hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status" 2>/dev/null || true; }
# Resets PID's peak RSS to its RSS now (Linux: 5 > clear_refs), so each
# workload reports its own peak; if refused, the peak counts from the start.
reset_rss_peak() { echo 5 >"/proc/$1/clear_refs" 2>/dev/null || log "cannot reset the peak RSS of pid $1: peaks are since the server started"; }
now() { date +%s.%N; }

wait_ready() { # wait_ready URI LOG: until nbdinfo answers, the server dies, or 30 s
    local uri=$1 logf=$2 i
    for ((i = 0; i < 60; i++)); do
        if ! kill -0 "$server_pid" 2>/dev/null; then
            log "$server_name exited before answering; its log:"
            sed 's/^/  | /' "$logf" >&2 || true
            return 1
        fi
        if timeout 5 nbdinfo --size "$uri" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    log "$server_name did not answer nbdinfo on $uri within 30 s; its log:"
    sed 's/^/  | /' "$logf" >&2 || true
    return 1
}

failures=0
run_fio() { # run_fio SERVER WORKLOAD URI DATA_PATH LIMIT_S FIO_ARGS...
    local srv=$1 wl=$2 uri=$3 data=$4 limit=$5
    shift 5
    local out=$srv.$wl.json status=ok c0 c1 t0 t1 cpu wall rss disk
    log "$srv: $wl ($*)"
    reset_rss_peak "$server_pid"
    c0=$(cpu_ticks "$server_pid")
    t0=$(now)
    # In the background so that a signal to this script is handled at once.
    timeout -k 10 "$limit" fio --output-format=json --output="$res/$out" \
        --name="$wl" --ioengine=nbd --uri="$uri" --group_reporting "$@" \
        >"$res/$srv.$wl.fio.log" 2>&1 &
    fio_pid=$!
    local fio_rc=0
    wait "$fio_pid" || fio_rc=$?
    fio_pid=
    if ((fio_rc != 0)); then
        status=failed
        log "$srv: fio $wl failed or timed out after ${limit}s:"
        sed 's/^/  | /' "$res/$srv.$wl.fio.log" >&2 || true
        failures=$((failures + 1))
    fi
    t1=$(now)
    c1=$(cpu_ticks "$server_pid")
    if ! kill -0 "$server_pid" 2>/dev/null; then
        log "$srv: SERVER DIED during $wl"
        status=server-died
        failures=$((failures + 1))
    fi
    cpu=$(awk -v a="$c0" -v b="$c1" -v t="$clk_tck" 'BEGIN {printf "%.2f", (b - a) / t}')
    wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}')
    rss=$(rss_hwm_kib "$server_pid")
    disk=$(du -sk "$data" 2>/dev/null | cut -f1 || true)
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$srv" "$wl" "$status" "$cpu" "$wall" "$rss" "$disk" "$out" >>"$res/runs.tsv"
    [[ $status == ok ]]
}

run_workloads() { # run_workloads SERVER URI DATA_PATH
    local srv=$1 uri=$2 data=$3
    local timed=(--time_based --runtime="$runtime" --ramp_time="$ramp")
    local limit=$((runtime + ramp + 60))
    run_fio "$srv" precondition "$uri" "$data" "$precond_timeout" --rw=write --bs=1M --iodepth=8 || return 1
    run_fio "$srv" randwrite "$uri" "$data" "$limit" --rw=randwrite --bs=4k --iodepth=32 --numjobs=1 "${timed[@]}" || true
    run_fio "$srv" randread "$uri" "$data" "$limit" --rw=randread --bs=4k --iodepth=32 --numjobs=1 "${timed[@]}" || true
    run_fio "$srv" seqwrite "$uri" "$data" "$limit" --rw=write --bs=1M --iodepth=8 "${timed[@]}" || true
    run_fio "$srv" seqread "$uri" "$data" "$limit" --rw=read --bs=1M --iodepth=8 "${timed[@]}" || true
    run_fio "$srv" randwrite-fsync "$uri" "$data" "$limit" --rw=randwrite --bs=4k --iodepth=1 --numjobs=8 --fsync=1 "${timed[@]}" || true
}

leg() { # leg SERVER: start it, check the export, run the workloads, stop it, clean up
    local srv=$1 sock=$run/$1.sock name data logf=$res/$1.server.log cmd=()
    case $srv in
        hlfs)
            data=$run/vm.hlfs
            name=vm.hlfs
            # shellcheck disable=SC2206
            local cargs=(${HLFS_CREATE_ARGS:-}) sargs=(${HLFS_SERVE_ARGS:-})
            if ! timeout 120 "$hlfs" create "$data" --size "$size" "${cargs[@]}" >"$res/hlfs.create.log" 2>&1; then
                log "hlfs create failed:"
                sed 's/^/  | /' "$res/hlfs.create.log" >&2
                printf 'hlfs\tfailed\thlfs create failed\t\n' >>"$res/servers.tsv"
                failures=$((failures + 1))
                return 0
            fi
            cmd=("$hlfs" serve "$data" --socket "$sock" "${sargs[@]}")
            ;;
        qemu-nbd)
            data=$run/qemu-nbd.raw
            name=qemu-nbd
            truncate -s "$size" "$data"
            local aio=threads
            [[ $qemu_cache == none || $qemu_cache == directsync ]] && aio=native
            cmd=(qemu-nbd -f raw --cache="$qemu_cache" --aio="$aio" --discard=unmap -t --shared=16
                -k "$sock" -x "$name" "$data")
            ;;
        nbdkit)
            data=$run/nbdkit.raw
            name=nbdkit
            truncate -s "$size" "$data"
            cmd=(nbdkit --foreground --exit-with-parent -U "$sock" -e "$name" file "file=$data" "cache=$nbdkit_cache")
            ;;
    esac
    local uri="nbd+unix:///$name?socket=$sock"
    echo >&2
    log "== $srv: ${cmd[*]}"
    server_name=$srv
    "${pdeath[@]}" "${cmd[@]}" >"$logf" 2>&1 &
    server_pid=$!
    local srv_status=ok note=
    if wait_ready "$uri" "$logf"; then
        local got
        got=$(timeout 10 nbdinfo --size "$uri" 2>/dev/null || echo '?')
        if [[ $got != "$size" ]]; then
            log "$srv: export size is $got, expected $size"
            srv_status=failed
            note="export size $got, expected $size"
            failures=$((failures + 1))
        else
            log "$srv: answering on $uri (pid $server_pid, $got bytes)"
            run_workloads "$srv" "$uri" "$data" || { srv_status=failed; note="precondition failed"; }
        fi
    else
        srv_status=failed
        note="did not start"
        failures=$((failures + 1))
    fi
    stop_server
    if [[ $server_rc != 0 && $srv_status == ok ]]; then
        # 143 = killed by our SIGTERM, normal for qemu-nbd/nbdkit; hlfs must drain and exit 0.
        if [[ $srv == hlfs || $server_rc != 143 ]]; then
            log "$srv: exited with status $server_rc after SIGTERM; its log:"
            sed 's/^/  | /' "$logf" >&2 || true
            srv_status=bad-exit
            note="exit status $server_rc after SIGTERM"
            failures=$((failures + 1))
        fi
    fi
    if [[ -s $logf ]]; then
        log "$srv: server output (first 20 lines):"
        head -20 "$logf" | sed 's/^/  | /' >&2
    fi
    log "$srv: data used $(du -sh "$data" 2>/dev/null | cut -f1) at the end"
    local shown=${cmd[*]}
    shown=${shown//"$run/"/}
    shown=${shown//"$repo/"/}
    printf '%s\t%s\t%s\t%s\n' "$srv" "$srv_status" "$note" "$shown" >>"$res/servers.tsv"
    rm -f -- "$sock"
    ((keep)) || rm -rf -- "$data"
    # Let write-back from this leg finish before the next one starts.
    timeout 300 sync -f "$run" 2>/dev/null || true
    sleep 2
}

# ---------------------------------------------------------------- the legs
for s in "${servers[@]}"; do
    if [[ $s == hlfs && $hlfs_state != ok ]]; then
        printf 'hlfs\tskipped\t%s\t%s\n' "$hlfs_note" "target/release/hlfs serve vm.hlfs --socket hlfs.sock" >>"$res/servers.tsv"
        continue
    fi
    leg "$s"
done

echo >&2
report=(python3 "$repo/scripts/bench_nbd_report.py" "$res")
[[ -n $json_out ]] && report+=(--json-out "$json_out")
"${report[@]}"

if [[ $hlfs_state == skipped ]]; then
    loud "THE HLFS LEG WAS SKIPPED: $hlfs_note"
    if ((${#servers[@]} == 1)); then exit 1; fi
fi
if ((failures)); then
    log "$failures failure(s); see above"
    exit 1
fi
