#!/usr/bin/env bash
# Runs HLFS directly on Ceph RADOS (rados:// volumes, librados, no gateway)
# against a single-node Ceph cluster on 127.0.0.1 (scripts/ceph-up.sh),
# torn down afterwards. Builds with the `rados` feature (needs librados:
# Debian's librados-dev).
#  1. lints of the rados code; the blob-store conformance suite on the
#     RADOS store, whole and in pieces;
#  2. the engine's model property test (reduced) with its store on RADOS;
#  3. the NBD interop suite with every volume on RADOS;
#  4. the CLI on a RADOS volume: create, import, snapshot, export, check,
#     with the Ceph settings as flags and from CEPH_ARGS;
#  5. faults: the OSD stopped mid-workload and restarted, segment objects
#     deleted or corrupted behind our back;
#  6. fencing: a second "host" (another cache directory) is refused.
# Usage: scripts/test-rados.sh     (as root; CI runs it from .ci/run)
# Env: MODEL_CASES (default 200) cases of the model test; RADOS_SUITES=0
# skips steps 1-3 (the cargo test suites), to rerun the rest quickly.
set -euo pipefail
cd "$(dirname "$0")/.."
state="${HLFS_CEPH_DIR:-/var/tmp/hlfs-ceph}"
work="$(mktemp -d)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
    scripts/ceph-down.sh >/dev/null 2>&1 || true
}
trap cleanup EXIT
step() { echo "== $*"; }
fail() { echo "test-rados: FAILED: $*" >&2; exit 1; }

[ -e /usr/include/rados/librados.h ] || fail "librados is missing (Debian: apt-get install librados-dev)"

# This script owns the cluster from start to end: whatever an interrupted
# earlier run left is torn down first.
scripts/ceph-down.sh
scripts/ceph-up.sh >/dev/null
export CEPH_CONF="$state/ceph.conf"
pool=hlfs
ceph --connect-timeout 15 osd pool create "$pool" 8 >/dev/null
ceph --connect-timeout 15 osd pool application enable "$pool" hlfs >/dev/null
run_id="$$-$(date +%s)"
export HLFS_CACHE_DIR="$work/cache"

if [ "${RADOS_SUITES:-1}" != 0 ]; then
step "lints with the rados feature"
cargo clippy -q -p hlfs-store -p hlfs-volume -p hlfs --features rados --all-targets -- -D warnings

step "conformance suite against rados://$pool"
HLFS_RADOS_TEST_URI="rados://$pool/conformance-$run_id" \
    cargo test -q -p hlfs-store --features rados --test rados -- --include-ignored

step "model property test, ${MODEL_CASES:-200} cases, store on RADOS"
PROPTEST_CASES="${MODEL_CASES:-200}" HLFS_MODEL_STORE_URI="rados://$pool/model-$run_id" \
    cargo test -q -p hlfs-volume --features rados --test model

step "NBD interop suite with every volume on RADOS"
HLFS_TEST_REMOTE_BASE="rados://$pool/interop-$run_id" CI="${CI:-}" \
    cargo test -q -p hlfs --features rados --test nbd_interop
fi

cargo build -q -p hlfs --features rados
hlfs=target/debug/hlfs

step "a volume on RADOS through the CLI"
vol="rados://$pool/cli-$run_id/vm1"
head -c $((16 << 20)) /dev/urandom > "$work/in.img"
$hlfs create "$vol" --size 64M --segment-size 4M
$hlfs import "$work/in.img" "$vol"
$hlfs snapshot create "$vol" first
$hlfs export "$vol@first" "$work/out.img"
cmp <(head -c $((16 << 20)) "$work/out.img") "$work/in.img"
$hlfs info "$vol" --json | python3 -c 'import json,sys; i=json.load(sys.stdin); assert i["snapshots"]==["first"] and i["allocated_bytes"]==16<<20, i'
$hlfs check "$vol"
# The objects are in the volume's own namespace of the pool.
rados -p "$pool" -N "cli-$run_id/vm1" ls > "$work/objects"
grep -q '^segments/' "$work/objects" || fail "no segment objects in the namespace: $(cat "$work/objects")"
grep -q '^manifest/' "$work/objects" || fail "no manifest objects in the namespace: $(cat "$work/objects")"

step "Ceph settings as flags and from CEPH_ARGS, and a clear refusal"
env -u CEPH_CONF $hlfs info "$vol" --ceph-conf "$state/ceph.conf" --ceph-id admin \
    --ceph-keyring "$state/keyring" --json > /dev/null
# The configuration names the keyring: CEPH_ARGS overrides it.
grep -v '^keyring' "$state/ceph.conf" > "$work/nokeyring.conf"
env -u CEPH_CONF CEPH_ARGS="--id admin --keyring $state/keyring" \
    $hlfs info "$vol" --ceph-conf "$work/nokeyring.conf" --json > /dev/null
if $hlfs info "$vol" --ceph-id nobody > "$work/refused.out" 2>&1; then
    fail "an unknown client id was let in"
fi
grep -qi "keyring\|permission\|denied\|not found\|No such" "$work/refused.out" \
    || fail "unclear refusal of an unknown client: $(cat "$work/refused.out")"
echo "   refused: $(head -1 "$work/refused.out")"
if $hlfs info "rados://no-such-pool/vm" > "$work/nopool.out" 2>&1; then
    fail "a missing pool was not noticed"
fi
grep -q "no-such-pool" "$work/nopool.out" || fail "unclear missing pool: $(cat "$work/nopool.out")"
echo "   refused: $(head -1 "$work/nopool.out")"

step "a segment larger than one RADOS write, stored in pieces"
vol="rados://$pool/big-$run_id/vm"
$hlfs create "$vol" --size 512M --segment-size 200M
head -c $((300 << 20)) /dev/urandom > "$work/big.img"
$hlfs import "$work/big.img" "$vol"
$hlfs check "$vol"
HLFS_CACHE_DIR="$work/other-host" $hlfs export "$vol" "$work/big.out"
cmp <(head -c $((300 << 20)) "$work/big.out") "$work/big.img"
rados -p "$pool" -N "big-$run_id/vm" ls | grep -q '^\.pieces/' || fail "no pieces stored"
rm -f "$work/big.img" "$work/big.out"
echo "   300 MiB in 200 MiB segments written in pieces and read back equal from the store alone"

# serve VOLUME SOCKET [ARGS...]: starts hlfs serve, sets $server and $uri.
serve() {
    local volume="$1" sock="$2"; shift 2
    rm -f "$work/uri"
    $hlfs serve "$volume" --socket "$sock" "$@" > "$work/uri" 2>> "$work/serve.log" &
    server=$!; pids+=("$server")
    for _ in $(seq 200); do [ -s "$work/uri" ] && break; sleep 0.1; done
    [ -s "$work/uri" ] || { cat "$work/serve.log" >&2; fail "serve did not start"; }
    uri="$(head -1 "$work/uri")"
}
stop_server() {
    kill -TERM "$server"
    wait "$server" || fail "serve exited with $? (log: $(tail -5 "$work/serve.log"))"
}

osd_pid="$state/run/osd.0.pid"
osd_stop() {
    kill "$(cat "$osd_pid")"
    for _ in $(seq 300); do
        kill -0 "$(cat "$osd_pid")" 2>/dev/null || return 0
        sleep 0.1
    done
    fail "osd.0 did not stop"
}
osd_start() {
    setsid ceph-osd -c "$state/ceph.conf" -i 0 -f </dev/null >>"$state/log/osd.0.out" 2>&1 &
    echo $! > "$osd_pid"
    # ceph-down.sh stops it; no job-control notice when it does.
    disown
}

step "fault: the OSD stops mid-workload, then returns"
vol="rados://$pool/outage-$run_id/vm"
$hlfs create "$vol" --size 256M --segment-size 1M
# --store-timeout 6: writes and flushes wait at most 6 s for a stalled
# store (each RADOS request gives up after 10 s, its floor).
serve "$vol" "$work/outage.sock" --store-timeout 6 -v
qemu-io -f raw -c "write -P 0x11 0 4M" -c flush "$uri" >/dev/null
osd_stop
# Flushed writes go on while the upload backlog has room: the local
# journal holds them.
qemu-io -f raw -c "write -P 0x22 4M 2M" -c flush "$uri" > "$work/q1" 2>&1 \
    || fail "a flush failed while the backlog had room: $(cat "$work/q1")"
# Past the backlog, writes fail with EIO after the timeout, not forever.
start=$(date +%s)
if qemu-io -f raw -c "write -P 0x33 8M 32M" -c flush "$uri" > "$work/q2" 2>&1 \
    && ! grep -qi "error" "$work/q2"; then
    fail "writes past the backlog succeeded with the OSD down: $(cat "$work/q2")"
fi
took=$(( $(date +%s) - start ))
[ "$took" -lt 120 ] || fail "the I/O error took ${took}s"
grep -qi "input/output error" "$work/q2" || fail "expected EIO: $(cat "$work/q2")"
echo "   writes past the backlog failed with EIO after ${took}s"
osd_start
# Service resumes on the same server, without a restart.
for _ in $(seq 120); do
    qemu-io -f raw -c "write -P 0x44 8M 8M" -c flush "$uri" > "$work/q3" 2>&1 \
        && ! grep -qi "error" "$work/q3" && break
    sleep 1
done
grep -qi "error" "$work/q3" && fail "service did not resume: $(cat "$work/q3")"
qemu-io -f raw -r -c "read -P 0x11 0 4M" -c "read -P 0x22 4M 2M" -c "read -P 0x44 8M 8M" "$uri" > "$work/q4" 2>&1
grep -qi "fail\|error" "$work/q4" && fail "data lost across the outage: $(cat "$work/q4")"
stop_server
$hlfs check "$vol"
# From the store alone (another cache directory sees no journal).
HLFS_CACHE_DIR="$work/elsewhere" $hlfs export "$vol" "$work/outage.img"
python3 - "$work/outage.img" <<'EOF'
import sys
d = open(sys.argv[1], "rb").read()
M = 1 << 20
assert d[:4*M] == b"\x11" * (4*M), "flushed before the outage"
assert d[4*M:6*M] == b"\x22" * (2*M), "flushed during the outage"
assert d[8*M:16*M] == b"\x44" * (8*M), "written after the OSD returned"
EOF
echo "   everything flushed before, during and after the outage is in the store"

step "fault: segment objects deleted or corrupted behind our back"
for damage in corrupt delete; do
    vol="rados://$pool/damage-$damage-$run_id/vm"
    ns="damage-$damage-$run_id/vm"
    $hlfs create "$vol" --size 64M --segment-size 4M
    $hlfs import "$work/in.img" "$vol"
    $hlfs check "$vol" >/dev/null
    object=segments/0000000001
    if [ "$damage" = corrupt ]; then
        rados -p "$pool" -N "$ns" get "$object" "$work/seg"
        python3 -c 'import sys; p=sys.argv[1]; d=bytearray(open(p,"rb").read()); d[len(d)//2]^=0xff; open(p,"wb").write(d)' "$work/seg"
        rados -p "$pool" -N "$ns" put "$object" "$work/seg"
    else
        rados -p "$pool" -N "$ns" rm "$object"
    fi
    if $hlfs check "$vol" > "$work/check.out" 2>&1; then
        fail "check did not notice a $damage segment: $(cat "$work/check.out")"
    fi
    grep -q "damaged:.*0000000001" "$work/check.out" \
        || fail "check did not name the segment: $(cat "$work/check.out")"
    echo "   $damage: $(grep -m1 damaged: "$work/check.out")"
done

step "fencing: a second host cannot write while the first does"
vol="rados://$pool/fence-$run_id/vm"
$hlfs create "$vol" --size 64M
serve "$vol" "$work/fence.sock"
qemu-io -f raw -c "write -P 0x55 0 1M" -c flush "$uri" >/dev/null
# Another cache directory is another host's journal.
if HLFS_CACHE_DIR="$work/host-b" $hlfs snapshot create "$vol" intruder > "$work/fence.out" 2>&1; then
    fail "a second writer was let in: $(cat "$work/fence.out")"
fi
grep -q "open for writing by process" "$work/fence.out" || fail "unclear refusal: $(cat "$work/fence.out")"
echo "   refused: $(cat "$work/fence.out")"
stop_server
HLFS_CACHE_DIR="$work/host-b" $hlfs snapshot create "$vol" after-close
HLFS_CACHE_DIR="$work/host-b" $hlfs export "$vol" "$work/fence.img"
python3 -c 'import sys; d=open(sys.argv[1],"rb").read(); assert d[:1<<20]==b"\x55"*(1<<20)' "$work/fence.img"
# The client key is never printed or logged.
key=$(sed -n 's/^[[:space:]]*key = //p' "$state/keyring" | head -1)
if [ -n "$key" ] && grep -rqF "$key" "$work"/serve.log "$work"/*.out "$work"/q? 2>/dev/null; then
    fail "the Ceph key appears in hlfs output"
fi
echo "RADOS tests passed"
