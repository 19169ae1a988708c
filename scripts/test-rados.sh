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
#  6. fencing: a second "host" (another cache directory) is refused;
#  7. RBD diff streams both ways between an RBD image and HLFS volumes.
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

step "RBD diff streams both ways: rbd export-diff into HLFS, hlfs export-diff into RBD"
rbd_pool=rbd
ceph --connect-timeout 15 osd pool create "$rbd_pool" 8 >/dev/null
rbd pool init "$rbd_pool"
sha() { sha256sum | cut -d' ' -f1; }
# An RBD image with two snapshots: s1 holds an image, s2 random 4K writes
# over it and a discarded range.
head -c $((6 << 20)) /dev/urandom > "$work/rbd-a.img"
rbd import --no-progress "$work/rbd-a.img" "$rbd_pool/img"
rbd resize --no-progress --size 8M "$rbd_pool/img"
rbd snap create --no-progress "$rbd_pool/img@s1"
rbd bench --io-type write --io-size 4K --io-pattern rand --io-total 512K "$rbd_pool/img" >/dev/null
rbd bench --io-type write --io-size 64K --io-pattern seq --io-total 128K "$rbd_pool/img" >/dev/null
rbd snap create --no-progress "$rbd_pool/img@s2"
rbd export-diff --no-progress "$rbd_pool/img@s1" "$work/rbd-s1.diff"
rbd export-diff --no-progress --from-snap s1 "$rbd_pool/img@s2" "$work/rbd-s2.diff"
vol="$work/from-rbd.hlfs"
$hlfs create "$vol" --size 8M
$hlfs import-diff "$work/rbd-s1.diff" "$vol"
$hlfs import-diff "$work/rbd-s2.diff" "$vol"
for s in s1 s2; do
    want=$(rbd export --no-progress "$rbd_pool/img@$s" - | sha)
    got=$($hlfs export "$vol@$s" - | sha)
    [ "$want" = "$got" ] || fail "$s imported from rbd export-diff differs: rbd $want, hlfs $got"
done
got=$($hlfs export "$vol" - | sha)
[ "$want" = "$got" ] || fail "the head after rbd's diffs is not s2"
# The reverse: HLFS's diffs applied by rbd import-diff.
$hlfs create "$work/src.hlfs" --size 8M
$hlfs import "$work/rbd-a.img" "$work/src.hlfs"
$hlfs snapshot create "$work/src.hlfs" s1
# New data, then zeros over old data: data and zero records.
{ head -c $((1 << 20)) /dev/urandom; head -c $((256 << 10)) /dev/zero; } > "$work/rbd-b.img"
$hlfs import "$work/rbd-b.img" "$work/src.hlfs"
$hlfs snapshot create "$work/src.hlfs" s2
$hlfs export-diff "$work/src.hlfs@s1" "$work/hlfs-s1.diff"
$hlfs export-diff "$work/src.hlfs@s2" "$work/hlfs-s2.diff" --from s1 --json > "$work/hlfs-s2.json"
grep -q '"zero_bytes": 262144' "$work/hlfs-s2.json" || fail "no zero records: $(cat "$work/hlfs-s2.json")"
rbd create --size 1M "$rbd_pool/img2"
rbd import-diff --no-progress "$work/hlfs-s1.diff" "$rbd_pool/img2"
rbd import-diff --no-progress "$work/hlfs-s2.diff" "$rbd_pool/img2"
for s in s1 s2; do
    want=$($hlfs export "$work/src.hlfs@$s" - | sha)
    got=$(rbd export --no-progress "$rbd_pool/img2@$s" - | sha)
    [ "$want" = "$got" ] || fail "$s applied by rbd import-diff differs: hlfs $want, rbd $got"
done
echo "   rbd's diffs rebuild both snapshots in HLFS, and HLFS's rebuild them in RBD (sha256 equal)"

step "RBD images with their snapshots both ways: rbd export --export-format 2 into HLFS, and back"
# img (s1, s2, and a head written after s2) as one file, imported whole.
rbd bench --io-type write --io-size 4K --io-pattern rand --io-total 256K "$rbd_pool/img" >/dev/null
rbd export --no-progress --export-format 2 "$rbd_pool/img" "$work/img.v2"
vol="$work/from-rbd-image.hlfs"
$hlfs create "$vol" --size 1M
$hlfs import-diff "$work/img.v2" "$vol" --json > "$work/img-import.json"
grep -q '"diffs": 3' "$work/img-import.json" || fail "not three diffs: $(cat "$work/img-import.json")"
for s in @s1 @s2 ""; do
    want=$(rbd export --no-progress "$rbd_pool/img$s" - | sha)
    got=$($hlfs export "$vol$s" - | sha)
    [ "$want" = "$got" ] || fail "img$s imported from rbd export --export-format 2 differs: rbd $want, hlfs $got"
done
# The reverse: src.hlfs (s1, s2, and a head past s2) made an RBD image.
head -c $((512 << 10)) /dev/urandom > "$work/rbd-c.img"
$hlfs import "$work/rbd-c.img" "$work/src.hlfs"
$hlfs export-diff "$work/src.hlfs" "$work/src.v2" --all-snapshots
rbd import --no-progress --export-format 2 "$work/src.v2" "$rbd_pool/img3"
for s in @s1 @s2 ""; do
    want=$($hlfs export "$work/src.hlfs$s" - | sha)
    got=$(rbd export --no-progress "$rbd_pool/img3$s" - | sha)
    [ "$want" = "$got" ] || fail "src.hlfs$s imported by rbd import --export-format 2 differs: hlfs $want, rbd $got"
done
[ "$(rbd snap ls "$rbd_pool/img3" | grep -cE ' s[12] ')" = 2 ] || fail "img3 lacks s1 or s2: $(rbd snap ls "$rbd_pool/img3")"
echo "   an RBD image with two snapshots moves into HLFS whole, and an HLFS volume into RBD (sha256 of each snapshot and head equal)"

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
