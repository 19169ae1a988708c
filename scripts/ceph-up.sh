#!/usr/bin/env bash
# ceph-up.sh — bring up a throwaway single-node Ceph cluster on loopback, with
# the RADOS gateway serving S3, for HLFS's tests and benchmarks (issue 4).
#
# Usage:
#   scripts/ceph-up.sh [--install] [--state-dir DIR] [--port PORT] [--bucket NAME]
#   eval "$(scripts/ceph-up.sh)"          # exports go to stdout, logs to stderr
#   . /var/tmp/hlfs-ceph/s3.env           # the same exports, written to a file
#   scripts/ceph-down.sh                  # stop every daemon, delete the state
#
# Environment (flags win): HLFS_CEPH_DIR (default /var/tmp/hlfs-ceph),
# HLFS_CEPH_RGW_PORT (default 7480), HLFS_CEPH_MON_PORT (msgr2, default 3300;
# the v1 port is MON_PORT+3489, i.e. 6789 by default), HLFS_CEPH_BUCKET
# (default hlfs-test), HLFS_CEPH_OSD_SIZE (sparse OSD file size, default 20G),
# HLFS_CEPH_INSTALL=1 (same as --install: apt-get install ceph radosgw first).
#
# What it makes: one monitor (mon.a), one manager (mgr.x), one bluestore OSD
# (osd.0) whose block device is a sparse FILE in the state dir, and radosgw
# (client.rgw.a, beast frontend) on 127.0.0.1:PORT. Everything listens on
# 127.0.0.1 only, every byte of state is under the state dir, no systemd: the
# daemons are started directly with -c STATE_DIR/ceph.conf and write pid files
# to STATE_DIR/run. Pools have size 1. The script creates an S3 user (uid hlfs),
# a bucket, waits (bounded) until the gateway answers signed S3 requests, and
# prints AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
# AWS_REGION exports on stdout (also STATE_DIR/s3.env, mode 600).
#
# If a cluster is already running from the same state dir and the gateway
# answers, it is reused: the exports are printed again and it exits 0. If the
# state dir exists but the cluster is not healthy, it fails: run ceph-down.sh.
set -euo pipefail

STATE_DIR="${HLFS_CEPH_DIR:-/var/tmp/hlfs-ceph}"
RGW_PORT="${HLFS_CEPH_RGW_PORT:-7480}"
MON_PORT="${HLFS_CEPH_MON_PORT:-3300}"
BUCKET="${HLFS_CEPH_BUCKET:-hlfs-test}"
OSD_SIZE="${HLFS_CEPH_OSD_SIZE:-20G}"
INSTALL="${HLFS_CEPH_INSTALL:-0}"
WAIT_SECS=120

die() { echo "ceph-up: ERROR: $*" >&2; exit 1; }
T_START=$(date +%s.%N)
log() { echo "ceph-up: [$(python3 -c "print(f'{$(date +%s.%N) - $T_START:5.1f}s')")] $*" >&2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --install) INSTALL=1 ;;
        --state-dir) STATE_DIR="${2:?--state-dir needs a value}"; shift ;;
        --port) RGW_PORT="${2:?--port needs a value}"; shift ;;
        --bucket) BUCKET="${2:?--bucket needs a value}"; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 0 ;;
        *) die "unknown argument: $1 (try --help)" ;;
    esac
    shift
done
MON_V1_PORT=$((MON_PORT + 3489))
case "$STATE_DIR" in /*) ;; *) die "state dir must be an absolute path: $STATE_DIR" ;; esac

[ "$(id -u)" = 0 ] || die "must run as root (ceph daemons, apt-get)"

if [ "$INSTALL" = 1 ]; then
    log "installing ceph + radosgw from Debian packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    apt-get install -y -q ceph radosgw curl python3 uuid-runtime >&2
fi
for b in ceph ceph-mon ceph-mgr ceph-osd radosgw radosgw-admin ceph-authtool monmaptool curl python3 uuidgen; do
    command -v "$b" >/dev/null || die "$b not found; install with: apt-get install ceph radosgw curl python3 uuid-runtime (or pass --install)"
done

CONF="$STATE_DIR/ceph.conf"
ENDPOINT="http://127.0.0.1:$RGW_PORT"
CEPH=(ceph -c "$CONF" --connect-timeout 15)

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Signed S3 requests with curl --aws-sigv4. RGW insists on x-amz-content-sha256
# (curl 7.88 does not send it): we send the hash of the empty body.
EMPTY_SHA=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
# s3_probe ACCESS SECRET: ListBuckets; prints the HTTP code (000 if no answer).
s3_probe() {
    curl -s -o /dev/null -w '%{http_code}' --max-time 5 -H "x-amz-content-sha256: $EMPTY_SHA" \
        --aws-sigv4 "aws:amz:us-east-1:s3" --user "$1:$2" "$ENDPOINT/" || true
}

print_exports() { cat "$STATE_DIR/s3.env"; }

# ---------------------------------------------------------------- reuse / refuse
if [ -e "$STATE_DIR" ]; then
    if [ -s "$STATE_DIR/s3.env" ] && pid_alive "$STATE_DIR/run/mon.a.pid" \
        && pid_alive "$STATE_DIR/run/osd.0.pid" && pid_alive "$STATE_DIR/run/client.rgw.a.pid"; then
        # shellcheck disable=SC1091
        . "$STATE_DIR/s3.env"
        if [ "$(s3_probe "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY")" = 200 ]; then
            log "cluster already running in $STATE_DIR; reusing it"
            print_exports
            exit 0
        fi
    fi
    die "$STATE_DIR exists but no healthy cluster runs from it; run scripts/ceph-down.sh first"
fi
for p in "$RGW_PORT" "$MON_PORT" "$MON_V1_PORT"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
        die "port 127.0.0.1:$p is already in use (another ceph/radosgw?)"
    fi
done

T0=$(date +%s.%N)
ok=0
on_exit() {
    if [ "$ok" != 1 ]; then
        log "bring-up FAILED; logs are in $STATE_DIR/log (tails below). Clean up with scripts/ceph-down.sh"
        for f in "$STATE_DIR"/log/*.log; do
            [ -s "$f" ] || continue
            echo "----- $f" >&2
            tail -n 8 "$f" >&2
        done
    fi
}
trap on_exit EXIT

# Bounded wait: wait_for SECS DESCRIPTION COMMAND...
wait_for() {
    local secs="$1" what="$2"; shift 2
    local deadline=$(( $(date +%s) + secs ))
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$deadline" ] || die "timed out after ${secs}s waiting for $what"
        sleep 0.5
    done
}

# start_daemon NAME CMD...: run a daemon in the foreground (-f) of its own
# session, in the background of this script; we record its pid ourselves so a
# daemon that dies during start-up is noticed at once.
start_daemon() {
    local name="$1"; shift
    setsid "$@" -f </dev/null >>"$STATE_DIR/log/$name.out" 2>&1 &
    echo $! >"$STATE_DIR/run/$name.pid"
}
# alive NAME: die loudly if the daemon has exited
alive() {
    pid_alive "$STATE_DIR/run/$1.pid" || die "$1 exited during start-up (see $STATE_DIR/log/$1.log and $1.out)"
}

mkdir -p "$STATE_DIR"/{run,log,mon/ceph-a,mgr/ceph-x,osd/ceph-0,rgw/ceph-rgw.a,crash,tmp}
chmod 700 "$STATE_DIR"
FSID=$(uuidgen)

cat >"$CONF" <<EOF
# Generated by scripts/ceph-up.sh — throwaway single-node cluster, loopback only.
[global]
fsid = $FSID
mon_host = [v2:127.0.0.1:$MON_PORT,v1:127.0.0.1:$MON_V1_PORT]
public_addr = 127.0.0.1
public_network = 127.0.0.1/32
cluster_network = 127.0.0.1/32
ms_bind_ipv4 = true
ms_bind_ipv6 = false
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
keyring = $STATE_DIR/keyring
admin_socket = $STATE_DIR/run/\$name.\$pid.asok
pid_file = $STATE_DIR/run/\$name.pid
run_dir = $STATE_DIR/run
log_file = $STATE_DIR/log/\$name.log
crash_dir = $STATE_DIR/crash
log_to_stderr = false
err_to_stderr = true
log_to_syslog = false
mon_cluster_log_to_syslog = false
mon_cluster_log_file = $STATE_DIR/log/cluster.log
# one OSD, no replicas, small PG counts, no warnings that matter here
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
mon_max_pg_per_osd = 1000
mon_warn_on_pool_no_redundancy = false
mon_warn_on_insecure_global_id_reclaim_allowed = false
auth_allow_insecure_global_id_reclaim = false
mon_data_avail_warn = 2
mon_data_avail_crit = 1

[mon]
mon_data = $STATE_DIR/mon/ceph-\$id
keyring = $STATE_DIR/mon/ceph-\$id/keyring
mon_initial_members = a

[mgr]
mgr_data = $STATE_DIR/mgr/ceph-\$id
keyring = $STATE_DIR/mgr/ceph-\$id/keyring
mgr_initial_modules = 

[osd]
osd_data = $STATE_DIR/osd/ceph-\$id
keyring = $STATE_DIR/osd/ceph-\$id/keyring
osd_objectstore = bluestore
bluestore_block_path = $STATE_DIR/osd/osd.\$id.block
bluestore_block_create = true
bluestore_block_size = $(numfmt --from=iec "$OSD_SIZE")
bluestore_block_db_create = false
bluestore_block_wal_create = false
bluestore_fsck_on_mkfs = false
bluestore_fsck_on_mount = false
osd_memory_target = 1073741824
osd_class_update_on_start = false
osd_max_object_name_len = 460
osd_max_object_namespace_len = 256

[client.rgw.a]
rgw_data = $STATE_DIR/rgw/ceph-rgw.a
keyring = $STATE_DIR/rgw/ceph-rgw.a/keyring
rgw_frontends = beast endpoint=127.0.0.1:$RGW_PORT
rgw_dns_name = 127.0.0.1
rgw_enable_usage_log = false
EOF

# ---------------------------------------------------------------- keys + monitor
log "creating keys and monitor (fsid $FSID)"
ceph-authtool --create-keyring "$STATE_DIR/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool --create-keyring "$STATE_DIR/keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
ceph-authtool "$STATE_DIR/mon.keyring" --import-keyring "$STATE_DIR/keyring" >/dev/null
monmaptool --create --fsid "$FSID" --addv a "[v2:127.0.0.1:$MON_PORT,v1:127.0.0.1:$MON_V1_PORT]" \
    "$STATE_DIR/monmap" >/dev/null
ceph-mon -c "$CONF" --mkfs -i a --monmap "$STATE_DIR/monmap" --keyring "$STATE_DIR/mon.keyring"
start_daemon mon.a ceph-mon -c "$CONF" -i a
mon_ready() { alive mon.a; "${CEPH[@]}" quorum_status; }
wait_for 30 "monitor quorum" mon_ready
# silence the size-1 / no-redundancy warnings on the monitor's own view too
"${CEPH[@]}" config set global mon_warn_on_pool_no_redundancy false >/dev/null

# ---------------------------------------------------------------- manager
log "starting manager"
"${CEPH[@]}" auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
    -o "$STATE_DIR/mgr/ceph-x/keyring"
start_daemon mgr.x ceph-mgr -c "$CONF" -i x

# ---------------------------------------------------------------- OSD on a sparse file
log "creating OSD on a sparse $OSD_SIZE file"
OSD_UUID=$(uuidgen)
OSD_SECRET=$(ceph-authtool --gen-print-key)
OSD_ID=$(echo "{\"cephx_secret\": \"$OSD_SECRET\"}" | "${CEPH[@]}" osd new "$OSD_UUID" -i -)
[ "$OSD_ID" = 0 ] || die "expected osd id 0, got '$OSD_ID'"
printf '[osd.0]\n\tkey = %s\n' "$OSD_SECRET" >"$STATE_DIR/osd/ceph-0/keyring"
ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$OSD_UUID" --key "$OSD_SECRET" 2>>"$STATE_DIR/log/osd.0.mkfs.log" \
    || die "ceph-osd --mkfs failed (see $STATE_DIR/log/osd.0.log)"
start_daemon osd.0 ceph-osd -c "$CONF" -i 0
osd_up() { alive osd.0; "${CEPH[@]}" osd dump --format json | python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if any(o["up"] for o in d["osds"]) else 1)'; }
wait_for 60 "osd.0 up" osd_up

# ---------------------------------------------------------------- RADOS gateway
log "starting radosgw on 127.0.0.1:$RGW_PORT"
"${CEPH[@]}" auth get-or-create client.rgw.a mon 'allow rw' osd 'allow rwx' mgr 'allow rw' \
    -o "$STATE_DIR/rgw/ceph-rgw.a/keyring"
start_daemon client.rgw.a radosgw -c "$CONF" -n client.rgw.a --keyring "$STATE_DIR/rgw/ceph-rgw.a/keyring"
rgw_answers() { alive client.rgw.a; curl -s -o /dev/null --max-time 3 "$ENDPOINT/"; }
wait_for "$WAIT_SECS" "radosgw to answer HTTP on $ENDPOINT" rgw_answers

# ---------------------------------------------------------------- S3 user, bucket
log "creating S3 user and bucket $BUCKET"
USER_JSON=$(radosgw-admin -c "$CONF" user create --uid=hlfs --display-name="HLFS tests")
read -r ACCESS SECRET < <(python3 -c 'import json,sys; k=json.load(sys.stdin)["keys"][0]; print(k["access_key"], k["secret_key"])' <<<"$USER_JSON")
[ -n "$ACCESS" ] && [ -n "$SECRET" ] || die "could not read keys from radosgw-admin output"

umask 077
cat >"$STATE_DIR/s3.env" <<EOF
export AWS_ENDPOINT_URL=$ENDPOINT
export AWS_ACCESS_KEY_ID=$ACCESS
export AWS_SECRET_ACCESS_KEY=$SECRET
export AWS_REGION=us-east-1
export AWS_DEFAULT_REGION=us-east-1
export HLFS_S3_BUCKET=$BUCKET
export CEPH_CONF=$CONF
EOF
umask 022

s3_ready() { alive client.rgw.a; [ "$(s3_probe "$ACCESS" "$SECRET")" = 200 ]; }
wait_for "$WAIT_SECS" "the gateway to accept signed S3 requests" s3_ready
code=$(curl -s -o "$STATE_DIR/tmp/mkbucket.out" -w '%{http_code}' --max-time 30 -X PUT \
    -H "x-amz-content-sha256: $EMPTY_SHA" --aws-sigv4 "aws:amz:us-east-1:s3" --user "$ACCESS:$SECRET" "$ENDPOINT/$BUCKET") || true
[ "$code" = 200 ] || die "creating bucket $BUCKET failed: HTTP $code $(cat "$STATE_DIR/tmp/mkbucket.out" 2>/dev/null)"
code=$(s3_probe "$ACCESS" "$SECRET")
[ "$code" = 200 ] || die "gateway stopped answering (HTTP $code)"

ok=1
T1=$(date +%s.%N)
log "cluster up in $(python3 -c "print(f'{$T1 - $T0:.1f}')") s: S3 at $ENDPOINT, bucket $BUCKET, state in $STATE_DIR"
log "exports written to $STATE_DIR/s3.env; tear down with scripts/ceph-down.sh"
print_exports
