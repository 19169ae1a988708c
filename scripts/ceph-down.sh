#!/usr/bin/env bash
# ceph-down.sh — stop the single-node Ceph cluster started by scripts/ceph-up.sh
# and delete its state directory.
#
# Usage:
#   scripts/ceph-down.sh [--state-dir DIR] [--keep]
#
# HLFS_CEPH_DIR (default /var/tmp/hlfs-ceph) or --state-dir names the state dir;
# --keep stops the daemons but leaves the directory (logs) in place.
# Only the processes named by the pid files in STATE_DIR/run are signalled:
# TERM first, then KILL after a bounded wait (20 s). Safe to run twice.
set -euo pipefail

STATE_DIR="${HLFS_CEPH_DIR:-/var/tmp/hlfs-ceph}"
KEEP=0
die() { echo "ceph-down: ERROR: $*" >&2; exit 1; }
log() { echo "ceph-down: $*" >&2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --state-dir) STATE_DIR="${2:?--state-dir needs a value}"; shift ;;
        --keep) KEEP=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 0 ;;
        *) die "unknown argument: $1 (try --help)" ;;
    esac
    shift
done
case "$STATE_DIR" in /*) ;; *) die "state dir must be an absolute path: $STATE_DIR" ;; esac
[ "$STATE_DIR" != / ] || die "refusing to use / as the state dir"

if [ ! -d "$STATE_DIR" ]; then
    log "$STATE_DIR does not exist; nothing to do"
    exit 0
fi
if [ ! -e "$STATE_DIR/ceph.conf" ] && [ -n "$(ls -A "$STATE_DIR")" ]; then
    die "$STATE_DIR has no ceph.conf: not a ceph-up.sh state dir, refusing to delete it"
fi

# Is PID a ceph daemon of ours (its command line names our config file)?
ours() {
    local pid="$1"
    [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$STATE_DIR/ceph.conf"
}

pids=()
# gateway first, then mgr and osd, the monitor last
for name in client.rgw.a mgr.x osd.0 mon.a; do
    f="$STATE_DIR/run/$name.pid"
    [ -s "$f" ] || continue
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null && ours "$pid"; then
        log "stopping $name (pid $pid)"
        kill -TERM "$pid" || true
        pids+=("$pid")
    fi
done

deadline=$(( $(date +%s) + 20 ))
for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            log "pid $pid did not exit after TERM; sending KILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.2
    done
done
for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then die "pid $pid still alive after KILL"; fi
done

if [ "$KEEP" = 1 ]; then
    log "daemons stopped; state kept in $STATE_DIR"
else
    rm -rf -- "$STATE_DIR"
    log "daemons stopped; $STATE_DIR removed"
fi
