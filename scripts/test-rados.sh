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
script=test-rados
# shellcheck source=scripts/remote-scenarios.sh
. scripts/remote-scenarios.sh

[ -e /usr/include/rados/librados.h ] || fail "librados is missing (Debian: apt-get install librados-dev)"

fresh_cluster
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
cli_round_trip "$vol"
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
outage "rados://$pool/outage-$run_id/vm" osd_stop osd_start "the OSD"

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
        flip_middle_byte "$work/seg"
        rados -p "$pool" -N "$ns" put "$object" "$work/seg"
    else
        rados -p "$pool" -N "$ns" rm "$object"
    fi
    check_finds_damage "$vol" "$damage"
done

step "fencing: a second host cannot write while the first does"
fencing "rados://$pool/fence-$run_id/vm"
# The client key is never printed or logged.
never_printed "$(sed -n 's/^[[:space:]]*key = //p' "$state/keyring" | head -1)"
echo "RADOS tests passed"
