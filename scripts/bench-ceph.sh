#!/usr/bin/env bash
# Benchmarks HLFS on a Ceph cluster, through its RADOS gateway (s3://) and
# directly on RADOS (rados://, librados), against Ceph RBD on the same
# throwaway single-node cluster, in one run on one machine, with fio.
#
# Usage:
#   scripts/bench-ceph.sh [--size SIZE] [--runtime SECONDS] [--out DIR] [--hlfs PATH]
#                         [--only rbd|hlfs|rados] [--rbd-cache default|writeback|none]
#                         [--state-dir DIR] [--rgw-port PORT] [--mon-port PORT]
#                         [--osd-size SIZE] [--settle SECONDS] [--precondition-timeout SECONDS]
#
#   --size SIZE          size of the RBD image and of the HLFS volume (default 2G; 1024-based)
#   --runtime SECONDS    measured time per workload, time_based (default 20; no ramp)
#   --out DIR            where fio JSON, logs and the report go (default: a new
#                        /var/tmp/hlfs-bench-ceph.XXXXXX, printed); kept at exit
#   --hlfs PATH          a prebuilt hlfs binary (built with --features rados for the rados
#                        leg); otherwise `cargo build --release -p hlfs --features rados`
#                        runs first and ${CARGO_TARGET_DIR:-target}/release/hlfs is used
#   --only LEG           run only one leg: rbd, hlfs (s3://) or rados (rados://); no ratios then
#   --rbd-cache MODE     librbd cache for fio's rbd engine: default (librbd's own:
#                        rbd_cache=true, writethrough until the first flush, so the
#                        flush-free workloads run writethrough), writeback
#                        (rbd_cache_writethrough_until_flush=false), none (rbd_cache=false)
#   --state-dir DIR      the bench cluster's state dir (default /var/tmp/hlfs-ceph-bench)
#   --rgw-port PORT      its radosgw port (default 7580)
#   --mon-port PORT      its monitor msgr2 port (default 3400; msgr1 is PORT+3489 = 6889)
#   --osd-size SIZE      sparse OSD file (default 40G; HLFS has no segment cleaning
#                        yet, so every HLFS write is new space in the bucket)
#   --settle SECONDS     after each fio run, wait at most this long for the Ceph daemons
#                        and hlfs serve to go idle, counting their CPU meanwhile (default 60)
#   --precondition-timeout SECONDS  bound for each full sequential write (default 1200)
#
# The cluster is separate from the default one of scripts/ceph-up.sh (state
# dir /var/tmp/hlfs-ceph, ports 7480/3300/6789), so both can run at once. Env
# HLFS_CEPH_BENCH_DIR, HLFS_CEPH_BENCH_RGW_PORT, HLFS_CEPH_BENCH_MON_PORT set
# the defaults (flags win); HLFS_CEPH_DIR etc. are ignored on purpose. A lock
# file (STATE_DIR.lock) keeps two runs apart; an existing state dir with live
# daemons is refused, a dead one is removed with ceph-down.sh.
#
# Steps:
#  1. scripts/ceph-up.sh brings up mon, mgr, one file-backed OSD and radosgw on
#     127.0.0.1. An RBD pool `hlfsbench` (size 1, `rbd pool init`) and an image
#     `img` of SIZE are made. fio must have the rbd engine (`fio --enghelp=rbd`).
#  2. Per HLFS leg, a volume of SIZE (`hlfs create`): s3://BUCKET/bench-PID/vm on the
#     gateway, or rados://hlfsrados/bench-PID/vm in a pool of size 1; served by
#     `hlfs serve VOL --socket SOCK` with its local journal in a fresh temp dir
#     (HLFS_CACHE_DIR, and --cache-dir if this hlfs has it). The NBD URI is the
#     first line hlfs serve prints.
#  3. Per leg, fio with direct=1, numjobs=1, group_reporting, JSON output; RBD
#     with ioengine=rbd clientname=admin pool=hlfsbench rbdname=img (librbd finds
#     the cluster through CEPH_CONF), HLFS with ioengine=nbd uri=URI:
#       precondition     1 MiB sequential writes over the whole device, QD 8 (so reads hit data)
#       randwrite        4 KiB random writes, QD 32
#       randread         4 KiB random reads, QD 32 (HLFS: after the whole volume was written:
#                        the "warm cache" read)
#       seqwrite         1 MiB sequential writes, QD 8
#       seqread          1 MiB sequential reads, QD 8
#       seqread-cold     after the workloads, one pass over the whole device (not
#                        time_based: a second pass would read a warm cache), cold: for
#                        HLFS a new hlfs serve with its read cache emptied, so every byte
#                        comes from the store (RBD: a new fio process, librbd's cache is
#                        per process)
#       randwrite-fsync  4 KiB random writes, fsync=1 (a flush after each), 1 job x QD 1
#     every workload but the precondition and the cold read time_based for RUNTIME seconds. The RBD
#     leg runs first; its image is removed before the HLFS legs start; the
#     rados leg runs last and its pool is deleted after it.
#  4. For each run: IOPS, MB/s, p99 latency (fio JSON), CPU seconds of the Ceph
#     daemons (utime+stime from /proc/PID/stat of the pids in STATE_DIR/run/*.pid,
#     over the fio run plus the settle tail, so HLFS's background uploads count),
#     of hlfs serve (HLFS legs), of fio (cutime+cstime of this shell around the run:
#     on the RBD leg it contains librbd, the client side of RBD), and Ceph CPU per I/O = Ceph CPU s / fio's
#     total I/Os of the run.
#  5. scripts/bench_ceph_report.py prints the Markdown report (tables, targets,
#     the command line, the date) on stdout and writes it to OUT/report.md, with
#     every number in OUT/report.json. Targets (HLFS / RBD): rand-write 4 KiB
#     QD 32 >= 3x IOPS with less Ceph CPU per I/O; rand-write + fsync >= 3x with
#     less Ceph CPU per I/O; seq write, seq read, rand read (warm) >= 1x.
#
# The EXIT trap stops hlfs serve (SIGTERM, SIGKILL after 60 s) and fio, copies
# the tails of the Ceph logs to OUT/ceph-logs if the run failed, tears the bench
# cluster down with scripts/ceph-down.sh --state-dir STATE_DIR (its own only),
# and removes the temp dir /var/tmp/hlfs-bench-ceph-work.XXXXXX (socket, HLFS
# journal and read cache: several GiB, up to hlfs's --cache-size); OUT stays.
#
# Env HLFS_CREATE_ARGS / HLFS_SERVE_ARGS: extra words for `hlfs create` /
# `hlfs serve` (e.g. HLFS_SERVE_ARGS="--durability remote"); they show in the report.
#
# Needs root (Ceph daemons), ceph + radosgw (scripts/ceph-up.sh --install), fio
# with the rbd engine, nbdinfo (libnbd-bin), python3, flock.
# Exit status: 0 if every run worked (targets missed are not failures), 1 if a
# run or a step failed, 2 on bad usage.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
invocation="scripts/bench-ceph.sh${*:+ $*}"

usage() { sed -n '2,/^set -euo pipefail/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2; }
die() { echo "bench-ceph: ERROR: $*" >&2; exit 1; }
bad_usage() { echo "bench-ceph: $*" >&2; exit 2; }
T_START=$(date +%s)
log() { echo "bench-ceph: [$(($(date +%s) - T_START))s] $*" >&2; }
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

size_arg=2G
runtime=20
out=
hlfs=
only=
rbd_cache=default
state_dir=${HLFS_CEPH_BENCH_DIR:-/var/tmp/hlfs-ceph-bench}
rgw_port=${HLFS_CEPH_BENCH_RGW_PORT:-7580}
mon_port=${HLFS_CEPH_BENCH_MON_PORT:-3400}
osd_size=40G
settle_max=60
precond_timeout=1200

need() { [[ $# -ge 2 && -n $2 ]] || bad_usage "$1 needs a value"; }
while (($#)); do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --size) need "$@"; size_arg=$2; shift 2 ;;
        --runtime) need "$@"; runtime=$2; shift 2 ;;
        --out) need "$@"; out=$2; shift 2 ;;
        --hlfs) need "$@"; hlfs=$2; shift 2 ;;
        --only) need "$@"; only=$2; shift 2 ;;
        --rbd-cache) need "$@"; rbd_cache=$2; shift 2 ;;
        --state-dir) need "$@"; state_dir=$2; shift 2 ;;
        --rgw-port) need "$@"; rgw_port=$2; shift 2 ;;
        --mon-port) need "$@"; mon_port=$2; shift 2 ;;
        --osd-size) need "$@"; osd_size=$2; shift 2 ;;
        --settle) need "$@"; settle_max=$2; shift 2 ;;
        --precondition-timeout) need "$@"; precond_timeout=$2; shift 2 ;;
        *) usage; bad_usage "unknown argument: $1" ;;
    esac
done

[[ $runtime =~ ^[1-9][0-9]*$ ]] || bad_usage "--runtime must be a positive integer (seconds)"
[[ $settle_max =~ ^[0-9]+$ ]] || bad_usage "--settle must be an integer (seconds)"
[[ $precond_timeout =~ ^[1-9][0-9]*$ ]] || bad_usage "--precondition-timeout must be a positive integer"
[[ $rgw_port =~ ^[0-9]+$ && $mon_port =~ ^[0-9]+$ ]] || bad_usage "ports must be numbers"
case $only in '' | rbd | hlfs | rados) ;; *) bad_usage "--only must be rbd, hlfs or rados" ;; esac
case $rbd_cache in default | writeback | none) ;; *) bad_usage "--rbd-cache must be default, writeback or none" ;; esac
case $state_dir in /*) ;; *) bad_usage "--state-dir must be an absolute path" ;; esac
[[ $state_dir != /var/tmp/hlfs-ceph && $rgw_port != 7480 && $mon_port != 3300 ]] ||
    bad_usage "refusing the default cluster's state dir/ports (/var/tmp/hlfs-ceph, 7480, 3300): they belong to scripts/ceph-up.sh users"
size=$(numfmt --from=iec "${size_arg%B}" 2>/dev/null) || bad_usage "--size $size_arg is not a size (e.g. 1G, 2G, 512M)"
((size >= 64 << 20 && size % (1 << 20) == 0)) || bad_usage "--size must be at least 64M and a whole number of MiB"
numfmt --from=iec "${osd_size%B}" >/dev/null 2>&1 || bad_usage "--osd-size $osd_size is not a size"
size_human=$(numfmt --to=iec-i --suffix=B "$size")
legs=(rbd hlfs rados)
[[ -z $only ]] || legs=("$only")

# ---------------------------------------------------------------- prerequisites
[[ $(id -u) == 0 ]] || die "must run as root (scripts/ceph-up.sh starts Ceph daemons)"
for tool in fio python3 timeout numfmt getconf flock nbdinfo; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install -y fio libnbd-bin python3 util-linux coreutils)"
done
for tool in ceph rbd; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install -y ceph radosgw, or scripts/ceph-up.sh --install)"
done
if ! fio --enghelp=rbd >/dev/null 2>&1; then
    die "this fio ($(fio --version 2>&1)) has no rbd engine (\`fio --enghelp=rbd\` fails).
  Debian/Ubuntu's fio package is built with it: apt-get install -y fio librbd1.
  From source: apt-get install -y librbd-dev librados-dev, then in fio's tree
  ./configure (it must report 'Rados Block Device engine  yes'), make, make install."
fi
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine (needs fio >= 3.21 built with libnbd: apt-get install -y fio)"

clk_tck=$(getconf CLK_TCK)
pdeath=()
if command -v setpriv >/dev/null && setpriv --pdeathsig TERM true 2>/dev/null; then pdeath=(setpriv --pdeathsig TERM); fi

# ---------------------------------------------------------------- hlfs binary
if [[ -n $hlfs ]]; then
    [[ -x $hlfs ]] || die "--hlfs $hlfs is not an executable"
    hlfs=$(cd "$(dirname "$hlfs")" && pwd)/$(basename "$hlfs")
elif [[ " ${legs[*]} " == *" hlfs "* || " ${legs[*]} " == *" rados "* ]]; then
    log "building: cargo build --release -p hlfs --features rados"
    (cd "$repo" && timeout 1800 "${CARGO:-cargo}" build --release -p hlfs --features rados >&2) ||
        die "cargo build --release -p hlfs --features rados failed (librados-dev installed?)"
    target=${CARGO_TARGET_DIR:-$repo/target}
    [[ $target == /* ]] || target=$repo/$target
    hlfs=$target/release/hlfs
    [[ -x $hlfs ]] || die "$hlfs not found after the build"
fi
if [[ -n $hlfs ]]; then
    timeout 30 "$hlfs" serve --help >/dev/null 2>&1 || die "'$hlfs serve --help' fails: this hlfs cannot serve NBD"
fi

# ---------------------------------------------------------------- out dir, temp dir, lock
if [[ -n $out ]]; then
    mkdir -p "$out" || die "cannot create --out $out"
    out=$(cd "$out" && pwd)
else
    out=$(mktemp -d /var/tmp/hlfs-bench-ceph.XXXXXX)
fi
work=$(mktemp -d /var/tmp/hlfs-bench-ceph-work.XXXXXX)
log "results go to $out (kept); scratch in $work (removed at exit)"
: >"$out/runs.tsv"
: >"$out/legs.tsv"

exec 9>"$state_dir.lock"
flock -n 9 || die "another bench-ceph run holds $state_dir.lock"

cluster_started=0
serve_pid=
fio_pid=
ok=0
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if [[ -n $fio_pid ]]; then
        kill -TERM "$fio_pid" 2>/dev/null
        wait "$fio_pid" 2>/dev/null
    fi
    stop_serve
    if ((cluster_started)); then
        if ((!ok)) && [[ -d $state_dir/log ]]; then
            mkdir -p "$out/ceph-logs"
            for f in "$state_dir"/log/*; do
                [[ -f $f ]] && tail -n 300 "$f" >"$out/ceph-logs/$(basename "$f")"
            done
            log "the tails of the Ceph logs are in $out/ceph-logs"
        fi
        log "tearing down the bench cluster in $state_dir"
        HLFS_CEPH_DIR=$state_dir "$repo/scripts/ceph-down.sh" --state-dir "$state_dir" >&2 ||
            log "WARNING: ceph-down.sh --state-dir $state_dir failed; run it by hand"
    fi
    rm -rf -- "$work"

    log "finished in $(($(date +%s) - T_START)) s (exit $rc); results in $out"
    exit "$rc"
}
stop_serve() { # SIGTERM hlfs serve, SIGKILL after 60 s; sets serve_rc
    serve_rc=
    [[ -n $serve_pid ]] || return 0
    local pid=$serve_pid
    serve_pid=
    terminate "$pid" "hlfs serve"
    serve_rc=$terminated_rc
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# ---------------------------------------------------------------- the cluster
if [[ -e $state_dir ]]; then
    live=
    for f in "$state_dir"/run/*.pid; do
        [[ -s $f ]] || continue
        p=$(cat "$f")
        if kill -0 "$p" 2>/dev/null && tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -qF -- "$state_dir/ceph.conf"; then live+=" $p"; fi
    done
    [[ -z $live ]] || die "Ceph daemons (pids$live) already run from $state_dir; stop them with:
  scripts/ceph-down.sh --state-dir $state_dir"
    log "removing the stale state dir $state_dir (no daemon alive)"
    HLFS_CEPH_DIR=$state_dir "$repo/scripts/ceph-down.sh" --state-dir "$state_dir" >&2
fi
log "bringing up the bench cluster: state $state_dir, radosgw 127.0.0.1:$rgw_port, mon $mon_port/$((mon_port + 3489))"
cluster_started=1
HLFS_CEPH_DIR=$state_dir HLFS_CEPH_RGW_PORT=$rgw_port HLFS_CEPH_MON_PORT=$mon_port HLFS_CEPH_OSD_SIZE=$osd_size \
    HLFS_CEPH_BUCKET=hlfs-bench HLFS_CEPH_INSTALL=0 \
    timeout 600 "$repo/scripts/ceph-up.sh" --state-dir "$state_dir" --port "$rgw_port" --bucket hlfs-bench >/dev/null ||
    die "scripts/ceph-up.sh failed (see above)"
# shellcheck disable=SC1091
set -a; . "$state_dir/s3.env"; set +a
conf=$state_dir/ceph.conf
[[ $CEPH_CONF == "$conf" ]] || die "s3.env names CEPH_CONF=$CEPH_CONF, expected $conf"
CEPH=(timeout 120 ceph -c "$conf" --connect-timeout 15)
RBD=(timeout 300 rbd -c "$conf")

pool=hlfsbench
image=img
if [[ " ${legs[*]} " == *" rbd "* ]]; then
    log "creating RBD pool $pool (size 1) and image $image of $size_human"
    "${CEPH[@]}" osd pool create "$pool" 8 8 >&2
    "${CEPH[@]}" osd pool set "$pool" size 1 --yes-i-really-mean-it >&2
    "${RBD[@]}" pool init "$pool" >&2
    "${RBD[@]}" create "$pool/$image" --size "$((size >> 20))M" >&2
fi

# fio's rbd engine reads the config named by CEPH_CONF (rados_conf_read_file(NULL));
# the keyring is named in its [global]. --rbd-cache adds a [client] section to a copy.
fio_conf=$conf
if [[ $rbd_cache != default ]]; then
    fio_conf=$work/fio-ceph.conf
    cp "$conf" "$fio_conf"
    case $rbd_cache in
        writeback) printf '\n[client]\nrbd_cache = true\nrbd_cache_writethrough_until_flush = false\n' >>"$fio_conf" ;;
        none) printf '\n[client]\nrbd_cache = false\n' >>"$fio_conf" ;;
    esac
fi

# ---------------------------------------------------------------- CPU accounting
daemon_pids=()
daemon_names=()
for f in "$state_dir"/run/*.pid; do
    [[ -s $f ]] || continue
    daemon_pids+=("$(cat "$f")")
    daemon_names+=("$(basename "$f" .pid)")
done
((${#daemon_pids[@]} >= 4)) || die "expected 4 pid files in $state_dir/run (mon, mgr, osd, rgw), found ${#daemon_pids[@]}"
log "Ceph daemons: $(for i in "${!daemon_pids[@]}"; do printf '%s=%s ' "${daemon_names[$i]}" "${daemon_pids[$i]}"; done)"

ticks() { # utime+stime of PID (all threads), in clock ticks; 0 if gone
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
    stat=${stat##*) } # drop "pid (comm) ", comm may contain spaces
    # shellcheck disable=SC2086
    set -- $stat
    echo $((${12} + ${13}))
}
child_ticks() { # cutime+cstime of this shell: the CPU of the children it has reaped (fio)
    local stat
    stat=$(cat "/proc/$$/stat")
    stat=${stat##*) }
    # shellcheck disable=SC2086
    set -- $stat
    echo $((${14} + ${15}))
}
ceph_ticks() { # one line: ticks of every daemon, in daemon_names order
    local p line=
    for p in "${daemon_pids[@]}"; do line+="$(ticks "$p") "; done
    echo "$line"
}
sum() { local s=0 x; for x in "$@"; do s=$((s + x)); done; echo "$s"; }
check_daemons() {
    local i
    for i in "${!daemon_pids[@]}"; do
        kill -0 "${daemon_pids[$i]}" 2>/dev/null || { log "Ceph daemon ${daemon_names[$i]} (pid ${daemon_pids[$i]}) DIED"; return 1; }
    done
}

# Idle baseline: what the daemons burn with nothing to do (mgr, mon ticks).
sleep 3
read -r -a b0 <<<"$(ceph_ticks)"
sleep 5
read -r -a b1 <<<"$(ceph_ticks)"
idle_cores=$(awk -v a="$(sum "${b0[@]}")" -v b="$(sum "${b1[@]}")" -v t="$clk_tck" 'BEGIN {printf "%.3f", (b - a) / t / 5}')
log "Ceph daemons idle: $idle_cores cores"

# settle: after fio, wait (at most settle_max s) until Ceph + hlfs serve burn
# less than idle + 0.05 cores over a second. Prints the seconds waited.
settle() {
    local waited=0 a b
    while ((waited < settle_max)); do
        a=$(($(sum $(ceph_ticks)) + $([[ -n $serve_pid ]] && ticks "$serve_pid" || echo 0)))
        sleep 1
        waited=$((waited + 1))
        b=$(($(sum $(ceph_ticks)) + $([[ -n $serve_pid ]] && ticks "$serve_pid" || echo 0)))
        if awk -v a="$a" -v b="$b" -v t="$clk_tck" -v i="$idle_cores" 'BEGIN {exit !((b - a) / t <= i + 0.05)}'; then
            break
        fi
    done
    echo "$waited"
}

# ---------------------------------------------------------------- machine note
commit=$(cd "$repo" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
if ! (cd "$repo" && git diff --quiet HEAD 2>/dev/null); then commit="$commit (modified)"; fi
cpu_model=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//' || true)
hlfs_version=-
[[ -z $hlfs ]] || hlfs_version=$(timeout 10 "$hlfs" --version 2>&1 | head -1 || true)
{
    echo "date:     $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host:     $(uname -n) ($(uname -srm))"
    echo "cpus:     $(nproc) (${cpu_model:-unknown})"
    echo "commit:   $commit"
    echo "memory:   $(free -g | awk '/^Mem:/ {print $2 " GiB"}')"
    echo "disk:     $(df -hT "$state_dir" | awk 'NR == 2 {print $2 " on " $1 ", " $5 " free of " $3}') ($state_dir)"
    echo "load:     $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "fio:      $(fio --version 2>&1 | head -1)"
    echo "ceph:     $(ceph --version 2>&1 | head -1)"
    echo "hlfs:     $hlfs_version ($hlfs)"
    echo "run:      $invocation"
} >"$out/machine.txt"
sed 's/^/  /' "$out/machine.txt" >&2

P_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ) P_INVOCATION=$invocation P_COMMIT=$commit P_CPUS=$(nproc) \
    P_CPU_MODEL=${cpu_model:-unknown} P_MEM=$(free -g | awk '/^Mem:/ {print $2 " GiB"}') P_KERNEL=$(uname -r) \
    P_SIZE=$size P_SIZE_HUMAN=$size_human P_RUNTIME=$runtime P_RBD_CACHE=$rbd_cache P_IDLE=$idle_cores \
    P_CEPH="$(ceph --version 2>&1 | head -1)" P_FIO="$(fio --version 2>&1 | head -1)" P_LEGS="${legs[*]}" \
    P_DAEMONS="${daemon_names[*]}" P_OSD_SIZE=$osd_size P_SETTLE=$settle_max python3 - "$out/params.json" <<'EOF'
import json, os, sys
e = os.environ
json.dump({
    "date": e["P_DATE"], "invocation": e["P_INVOCATION"], "commit": e["P_COMMIT"],
    "cpus": int(e["P_CPUS"]), "cpu_model": e["P_CPU_MODEL"], "mem": e["P_MEM"],
    "kernel": e["P_KERNEL"], "size_bytes": int(e["P_SIZE"]), "size_human": e["P_SIZE_HUMAN"],
    "runtime": int(e["P_RUNTIME"]), "rbd_cache": e["P_RBD_CACHE"],
    "ceph_idle_cores": float(e["P_IDLE"]), "ceph": e["P_CEPH"], "fio": e["P_FIO"],
    "legs": e["P_LEGS"].split(), "daemons": e["P_DAEMONS"].split(),
    "osd_size": e["P_OSD_SIZE"], "settle_max": int(e["P_SETTLE"]),
}, open(sys.argv[1], "w"), indent=2)
EOF

# ---------------------------------------------------------------- fio runs
failures=0
# run_fio LEG WORKLOAD LIMIT_S FIO_ARGS... (engine args come from leg_args)
run_fio() {
    local leg=$1 wl=$2 limit=$3
    shift 3
    local json=$leg.$wl.json status=ok c0 c1 s0 s1 t0 t1 f0 f1 settled
    log "$leg: $wl (${*})"
    read -r -a c0 <<<"$(ceph_ticks)"
    s0=0
    [[ -z $serve_pid ]] || s0=$(ticks "$serve_pid")
    t0=$(date +%s.%N)
    f0=$(child_ticks)
    # In the background so that a signal to this script is handled at once.
    env CEPH_CONF="$fio_conf" timeout -k 10 "$limit" fio --output-format=json --output="$out/$json" \
        --name="$wl" --direct=1 --numjobs=1 --group_reporting "${leg_args[@]}" "$@" \
        >"$out/$leg.$wl.fio.log" 2>&1 &
    fio_pid=$!
    local fio_rc=0
    wait "$fio_pid" || fio_rc=$?
    fio_pid=
    f1=$(child_ticks)
    t1=$(date +%s.%N)
    if ((fio_rc != 0)); then
        status=failed
        log "$leg: fio $wl failed (exit $fio_rc; 124 = timed out after ${limit}s):"
        sed 's/^/  | /' "$out/$leg.$wl.fio.log" >&2 || true
        tail -c 2000 "$out/$json" 2>/dev/null | sed 's/^/  | /' >&2 || true
        failures=$((failures + 1))
    fi
    settled=$(settle)
    read -r -a c1 <<<"$(ceph_ticks)"
    s1=0
    [[ -z $serve_pid ]] || s1=$(ticks "$serve_pid")
    if [[ -n $serve_pid ]] && ! kill -0 "$serve_pid" 2>/dev/null; then
        log "$leg: HLFS SERVE DIED during $wl"
        status=serve-died
        failures=$((failures + 1))
    fi
    if ! check_daemons; then
        status=ceph-died
        failures=$((failures + 1))
    fi
    local per=() i total=0 d
    for i in "${!daemon_names[@]}"; do
        d=$((c1[i] - c0[i]))
        total=$((total + d))
        per+=("${daemon_names[$i]}=$(awk -v d="$d" -v t="$clk_tck" 'BEGIN {printf "%.2f", d / t}')")
    done
    local ceph_s serve_s wall fio_s
    fio_s=$(awk -v d="$((f1 - f0))" -v t="$clk_tck" 'BEGIN {printf "%.2f", d / t}')
    ceph_s=$(awk -v d="$total" -v t="$clk_tck" 'BEGIN {printf "%.2f", d / t}')
    serve_s=-
    [[ $leg == rbd ]] || serve_s=$(awk -v d="$((s1 - s0))" -v t="$clk_tck" 'BEGIN {printf "%.2f", d / t}')
    wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}')
    log "$leg: $wl: fio ${wall}s + settle ${settled}s; Ceph CPU ${ceph_s}s (${per[*]}); hlfs serve CPU ${serve_s}s; fio CPU ${fio_s}s"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$leg" "$wl" "$status" "$ceph_s" "$serve_s" "$wall" "$settled" \
        "${per[*]}" "$json" "$fio_s" >>"$out/runs.tsv"
    [[ $status == ok ]]
}

run_workloads() { # run_workloads LEG
    local leg=$1 timed=(--time_based --runtime="$runtime")
    local limit=$((runtime + 120))
    run_fio "$leg" precondition "$precond_timeout" --rw=write --bs=1M --iodepth=8 || return 1
    run_fio "$leg" randwrite "$limit" --rw=randwrite --bs=4k --iodepth=32 "${timed[@]}" || true
    run_fio "$leg" randread "$limit" --rw=randread --bs=4k --iodepth=32 "${timed[@]}" || true
    run_fio "$leg" seqwrite "$limit" --rw=write --bs=1M --iodepth=8 "${timed[@]}" || true
    run_fio "$leg" seqread "$limit" --rw=read --bs=1M --iodepth=8 "${timed[@]}" || true
    run_fio "$leg" randwrite-fsync "$limit" --rw=randwrite --bs=4k --iodepth=1 --fsync=1 "${timed[@]}" || true
}

# ---------------------------------------------------------------- RBD leg
leg_rbd() {
    leg_args=(--ioengine=rbd --clientname=admin --pool="$pool" --rbdname="$image")
    local note="fio ioengine=rbd clientname=admin pool=$pool rbdname=$image (librbd, rbd cache: $rbd_cache), CEPH_CONF=$conf"
    echo >&2
    log "== RBD leg: $note"
    local st=ok
    run_workloads rbd || st=failed
    # librbd keeps no cache across processes: each fio run starts cold.
    run_fio rbd seqread-cold "$precond_timeout" --rw=read --bs=1M --iodepth=8 || true
    log "rbd: removing the image (frees the OSD for the HLFS leg)"
    "${RBD[@]}" rm --no-progress "$pool/$image" >&2 || log "WARNING: rbd rm failed"
    printf 'rbd\t%s\t%s\n' "$st" "$note" >>"$out/legs.tsv"
}

# ---------------------------------------------------------------- HLFS legs
# start_serve LEG CMD...: starts hlfs serve in the background (serve_pid)
# and sets serve_uri to the URI it prints; fails if it prints none within
# 60 s. (Not in a subshell: serve_pid must reach stop_serve.)
start_serve() {
    local leg=$1
    shift
    log "starting: HLFS_CACHE_DIR=$HLFS_CACHE_DIR $*"
    "${pdeath[@]}" "$@" >"$work/serve.stdout" 2>>"$out/$leg.serve.log" &
    serve_pid=$!
    local uri= i
    for ((i = 0; i < 600; i++)); do
        [[ -s $work/serve.stdout ]] && uri=$(head -1 "$work/serve.stdout")
        [[ -n $uri ]] && break
        kill -0 "$serve_pid" 2>/dev/null || break
        sleep 0.1
    done
    if [[ -z $uri ]]; then
        log "hlfs serve printed no URI within 60 s (or exited); its log:"
        sed 's/^/  | /' "$out/$leg.serve.log" >&2
        stop_serve
        return 1
    fi
    serve_uri=$uri
}

# hlfs_leg LEG VOLUME: create VOLUME, serve it, run the workloads, delete it.
hlfs_leg() {
    local leg=$1 vol=$2 sock=$work/hlfs.sock cache=$work/hlfs-cache
    rm -rf "$cache"
    mkdir -p "$cache"
    export HLFS_CACHE_DIR=$cache
    # shellcheck disable=SC2206
    local sargs=() cargs=(${HLFS_CREATE_ARGS:-}) extra=(${HLFS_SERVE_ARGS:-})
    if "$hlfs" serve --help 2>&1 | grep -q -- '--cache-dir'; then sargs=(--cache-dir "$cache"); fi
    echo >&2
    log "== HLFS leg $leg: $hlfs create $vol --size $size ${cargs[*]}"
    if ! timeout 300 "$hlfs" create "$vol" --size "$size" "${cargs[@]}" >"$out/$leg.create.log" 2>&1; then
        sed 's/^/  | /' "$out/$leg.create.log" >&2
        printf '%s\tfailed\thlfs create %s failed\n' "$leg" "$vol" >>"$out/legs.tsv"
        failures=$((failures + 1))
        return 0
    fi
    local cmd=("$hlfs" serve "$vol" --socket "$sock" "${sargs[@]}" "${extra[@]}")
    if ! start_serve "$leg" "${cmd[@]}"; then
        printf '%s\tfailed\thlfs serve did not start\n' "$leg" >>"$out/legs.tsv"
        failures=$((failures + 1))
        return 0
    fi
    local uri=$serve_uri got
    got=$(timeout 30 nbdinfo --size "$uri" 2>&1) || got="nbdinfo failed: $got"
    if [[ $got != "$size" ]]; then
        log "hlfs: export size is '$got', expected $size"
        stop_serve
        printf '%s\tfailed\texport size %s, expected %s\n' "$leg" "$got" "$size" >>"$out/legs.tsv"
        failures=$((failures + 1))
        return 0
    fi
    log "hlfs serve (pid $serve_pid) answers on $uri"
    leg_args=(--ioengine=nbd --uri="$uri")
    local st=ok
    run_workloads "$leg" || st=failed
    log "hlfs: cache dir (journal + read cache) holds $(du -sh "$cache" 2>/dev/null | cut -f1); stopping hlfs serve"
    stop_serve
    if [[ $serve_rc != 0 ]]; then
        log "hlfs serve exited with status $serve_rc after SIGTERM; its log:"
        tail -n 30 "$out/$leg.serve.log" | sed 's/^/  | /' >&2
        st=bad-exit
        failures=$((failures + 1))
    fi
    # A cold read: a new server with the read cache emptied (everything was
    # uploaded by the clean stop), so every byte comes from the store.
    rm -rf "$cache/segments"
    if [[ $st != ok ]]; then
        log "$leg: no cold read after a failed leg"
    elif start_serve "$leg" "${cmd[@]}"; then
        leg_args=(--ioengine=nbd --uri="$serve_uri")
        run_fio "$leg" seqread-cold "$precond_timeout" --rw=read --bs=1M --iodepth=8 || true
        stop_serve
        if [[ $serve_rc != 0 ]]; then
            log "hlfs serve exited with status $serve_rc after the cold read"
            st=bad-exit
            failures=$((failures + 1))
        fi
    else
        st=failed
        failures=$((failures + 1))
    fi
    local shown="HLFS_CACHE_DIR=TMP hlfs serve $vol --socket TMP/hlfs.sock${sargs[*]:+ --cache-dir TMP}${extra[*]:+ ${extra[*]}}"
    shown="\`$shown\` (defaults of this hlfs: $("$hlfs" serve --help 2>&1 | grep -oE -- '--(durability|cache-size) <[A-Z]+>.*\[default: [^]]*\]' | sed -E 's/ <[A-Z]+>.*\[default: /=/; s/\]$//' | paste -sd' ' || true))"
    printf '%s\t%s\tfio ioengine=nbd uri=%s; %s\n' "$leg" "$st" "${uri//$work/TMP}" "$shown" >>"$out/legs.tsv"
    unset HLFS_CACHE_DIR
}

leg_hlfs() { hlfs_leg hlfs "s3://$HLFS_S3_BUCKET/bench-$$/vm"; }

rados_pool=hlfsrados
leg_rados() {
    log "creating pool $rados_pool (size 1) for rados:// volumes"
    "${CEPH[@]}" osd pool create "$rados_pool" 8 8 >&2
    "${CEPH[@]}" osd pool set "$rados_pool" size 1 --yes-i-really-mean-it >&2
    "${CEPH[@]}" osd pool application enable "$rados_pool" hlfs >&2
    CEPH_CONF=$conf hlfs_leg rados "rados://$rados_pool/bench-$$/vm"
    "${CEPH[@]}" osd pool delete "$rados_pool" "$rados_pool" --yes-i-really-really-mean-it >&2 || true
}

for leg in "${legs[@]}"; do
    "leg_$leg" || failures=$((failures + 1))
    sync
done

echo >&2
python3 "$repo/scripts/bench_ceph_report.py" "$out" || { log "the report failed"; failures=$((failures + 1)); }
if ((failures)); then
    log "$failures failure(s); see above and $out"
    exit 1
fi
ok=1
