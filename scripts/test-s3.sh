#!/usr/bin/env bash
# Runs HLFS against a real S3 engine: a single-node Ceph cluster with the
# RADOS gateway on 127.0.0.1 (scripts/ceph-up.sh), torn down afterwards.
#  1. the blob-store conformance suite on the S3 store;
#  2. the engine's model property test (reduced) with its store on S3;
#  3. the NBD interop suite (qemu-img, qemu-io, nbdinfo, nbdcopy, fio) with
#     every volume on S3;
#  4. the CLI on an S3 volume: create, import, snapshot, export, check;
#  5. faults: the gateway stopped mid-workload and restarted, a slow
#     gateway, segment objects deleted or corrupted behind our back;
#  6. cleaning: deleted segments leave the bucket, an orphan is swept;
#  7. a clone on S3 of a local volume's snapshot: served, written, read
#     back and flattened while served;
#  8. fencing: a second "host" (another cache directory) is refused.
# Usage: scripts/test-s3.sh     (as root; CI runs it from .ci/run)
# Env: MODEL_CASES (default 30) cases of the model test; S3_SUITES=0 skips
# steps 1-3 (the cargo test suites), to rerun the rest quickly.
set -euo pipefail
cd "$(dirname "$0")/.."
script=test-s3
# shellcheck source=scripts/remote-scenarios.sh
. scripts/remote-scenarios.sh

fresh_cluster
# shellcheck disable=SC1091
set -a; . "$state/s3.env"; set +a
run_id="$$-$(date +%s)"
export HLFS_CACHE_DIR="$work/cache"

if [ "${S3_SUITES:-1}" != 0 ]; then
step "conformance suite against $AWS_ENDPOINT_URL"
HLFS_S3_TEST_URI="s3://hlfs-test/conformance-$run_id" \
    cargo test -q -p hlfs-store --test s3 -- --include-ignored

step "model property test, ${MODEL_CASES:-30} cases, store on S3"
PROPTEST_CASES="${MODEL_CASES:-30}" HLFS_MODEL_STORE_URI="s3://hlfs-test/model-$run_id" \
    cargo test -q -p hlfs-volume --test model

step "NBD interop suite with every volume on S3"
HLFS_TEST_REMOTE_BASE="s3://hlfs-test/interop-$run_id" CI="${CI:-}" \
    cargo test -q -p hlfs --test nbd_interop
fi

cargo build -q -p hlfs
hlfs=target/debug/hlfs

step "a volume on S3 through the CLI"
vol="s3://hlfs-test/cli-$run_id/vm1"
cli_round_trip "$vol"

step "credentials from the AWS shared files instead of the environment"
printf '[hlfs]\naws_access_key_id = %s\naws_secret_access_key = %s\n' \
    "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" > "$work/credentials"
printf '[profile hlfs]\nregion = %s\nendpoint_url = %s\n' \
    "$AWS_REGION" "$AWS_ENDPOINT_URL" > "$work/config"
env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_REGION -u AWS_ENDPOINT_URL \
    AWS_PROFILE=hlfs AWS_SHARED_CREDENTIALS_FILE="$work/credentials" AWS_CONFIG_FILE="$work/config" \
    $hlfs info "$vol" --json > "$work/info.json"
python3 -c 'import json,sys; assert json.load(open(sys.argv[1]))["snapshots"]==["first"]' "$work/info.json"

rgw_pid="$state/run/client.rgw.a.pid"
rgw_stop() {
    kill "$(cat "$rgw_pid")"
    for _ in $(seq 100); do
        if ! kill -0 "$(cat "$rgw_pid")" 2>/dev/null; then
            curl -s -o /dev/null "$AWS_ENDPOINT_URL" && fail "the gateway still answers"
            return 0
        fi
        sleep 0.1
    done
    fail "radosgw did not stop"
}
rgw_start() {
    setsid radosgw -c "$state/ceph.conf" -n client.rgw.a \
        --keyring "$state/rgw/ceph-rgw.a/keyring" -f </dev/null >>"$state/log/client.rgw.a.out" 2>&1 &
    echo $! > "$rgw_pid"
    # ceph-down.sh stops it; no job-control notice when it does.
    disown
    for _ in $(seq 300); do
        curl -s -o /dev/null "$AWS_ENDPOINT_URL" && return 0
        sleep 0.1
    done
    fail "radosgw did not come back"
}

step "fault: the gateway stops mid-workload, then returns"
outage "s3://hlfs-test/outage-$run_id/vm" rgw_stop rgw_start "the gateway"

step "fault: a slow gateway (250 ms added to every response)"
proxy_port=7490
python3 - "$proxy_port" 127.0.0.1 7480 0.25 > "$work/proxy.log" 2>&1 <<'EOF' &
import asyncio, sys
port, host, target, delay = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
async def pipe(r, w, slow):
    try:
        while data := await r.read(65536):
            if slow:
                await asyncio.sleep(delay)
            w.write(data)
            await w.drain()
    except Exception:
        pass
    finally:
        w.close()
async def handle(cr, cw):
    ur, uw = await asyncio.open_connection(host, target)
    await asyncio.gather(pipe(cr, uw, False), pipe(ur, cw, True))
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()
asyncio.run(main())
EOF
pids+=("$!")
sleep 1
slow_vol="s3://hlfs-test/slow-$run_id/vm"
AWS_ENDPOINT_URL="http://127.0.0.1:$proxy_port" $hlfs create "$slow_vol" --size 64M --segment-size 1M
AWS_ENDPOINT_URL="http://127.0.0.1:$proxy_port" serve "$slow_vol" "$work/slow.sock"
start=$(date +%s%N)
qemu-img convert -n -f raw -O raw "$work/in.img" "$uri"
ms=$(( ($(date +%s%N) - start) / 1000000 ))
qemu-img convert -f raw -O raw "$uri" "$work/slow.img"
cmp <(head -c $((16 << 20)) "$work/slow.img") "$work/in.img"
stop_server
$hlfs check "$slow_vol"
echo "   16 MiB written through a slow gateway in ${ms} ms, read back equal"

step "fault: segment objects deleted or corrupted behind our back"
s3curl() {
    curl -sS -f --aws-sigv4 "aws:amz:${AWS_REGION}:s3" \
        --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" \
        -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "$@"
}
for damage in corrupt delete; do
    vol="s3://hlfs-test/damage-$damage-$run_id/vm"
    $hlfs create "$vol" --size 64M --segment-size 4M
    $hlfs import "$work/in.img" "$vol"
    $hlfs check "$vol" >/dev/null
    object="$AWS_ENDPOINT_URL/hlfs-test/damage-$damage-$run_id/vm/segments/0000000001"
    if [ "$damage" = corrupt ]; then
        s3curl -o "$work/seg" "$object"
        flip_middle_byte "$work/seg"
        s3curl -X PUT --data-binary @"$work/seg" "$object" >/dev/null
    else
        s3curl -X DELETE "$object" >/dev/null
    fi
    check_finds_damage "$vol" "$damage"
done

step "cleaning on S3: what it frees leaves the bucket, and an orphan object is swept"
vol="s3://hlfs-test/gc-$run_id/vm"
prefix="$AWS_ENDPOINT_URL/hlfs-test/gc-$run_id/vm/segments"
$hlfs create "$vol" --size 64M --segment-size 1M
# The second import overwrites the first: its segments hold nothing now.
$hlfs import "$work/in.img" "$vol"
$hlfs import "$work/in.img" "$vol"
segment_ids() {
    $hlfs gc "$vol" --stats --json |
        python3 -c 'import json, sys; print(" ".join(str(s["id"]) for s in json.load(sys.stdin)["segments"]))'
}
object_of() { printf '%s/%010d' "$prefix" "$1"; }
before=$(segment_ids)
$hlfs gc "$vol" --grace 0 --json > "$work/gc.json"
after=$(segment_ids)
gone=()
for id in $before; do
    [[ " $after " == *" $id "* ]] || gone+=("$id")
done
# The first import's segments (4 MiB records, one to a segment): 4 at least.
python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); assert r["deleted_segments"] == int(sys.argv[2]) >= 4, r' \
    "$work/gc.json" "${#gone[@]}" || fail "cleaning deleted ${#gone[@]} segments: $(cat "$work/gc.json")"
for id in "${gone[@]}"; do
    if s3curl -o /dev/null -I "$(object_of "$id")" 2>/dev/null; then
        fail "segment $id is still in the bucket"
    fi
done
# An orphan: a segment object no manifest names (as an upload a crash
# left, or a delete that did not land), here a live one's bytes.
s3curl -o "$work/seg" "$(object_of "${after%% *}")"
s3curl -X PUT --data-binary @"$work/seg" "$(object_of "${gone[0]}")" >/dev/null
$hlfs gc "$vol" --grace 0 --target 100 --json > "$work/sweep.json"
python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); assert r["passes"] == 0 and r["deleted_segments"] == 1, r' \
    "$work/sweep.json"
if s3curl -o /dev/null -I "$(object_of "${gone[0]}")" 2>/dev/null; then
    fail "the orphan segment ${gone[0]} is still in the bucket"
fi
$hlfs export "$vol" "$work/gc.img"
cmp <(head -c $((16 << 20)) "$work/gc.img") "$work/in.img"
$hlfs check "$vol"
echo "   ${#gone[@]} segments cleaned out of the bucket, and an orphan swept"

step "a clone on S3 of a local golden image: served, written, read back, flattened while served"
golden="$work/golden"
$hlfs import "$work/in.img" "$golden" --create
$hlfs snapshot create "$golden" base
clone="s3://hlfs-test/clone-$run_id/vm"
$hlfs clone "$golden@base" "$clone"
serve "$clone" "$work/clone.sock"
qemu-io -f raw -c "write -P 0x5a 1M 64k" -c flush "$uri" >/dev/null
cp "$work/in.img" "$work/clone.expected"
python3 -c 'import sys; f = open(sys.argv[1], "r+b"); f.seek(1 << 20); f.write(b"\x5a" * (64 << 10))' \
    "$work/clone.expected"
qemu-img convert -f raw -O raw "$uri" "$work/clone.img"
cmp "$work/clone.img" "$work/clone.expected" || fail "the clone does not read its parent and its writes"
if $hlfs snapshot delete "$golden" base 2>/dev/null; then
    fail "the snapshot a clone reads was deleted"
fi
$hlfs flatten "$clone" --json > "$work/flatten.json"
python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); assert r["copied_bytes"] == (16 << 20) - (64 << 10), r' \
    "$work/flatten.json"
qemu-img convert -f raw -O raw "$uri" "$work/clone.img"
cmp "$work/clone.img" "$work/clone.expected" || fail "the clone changed when flattened"
stop_server
$hlfs snapshot delete "$golden" base
rm -rf "$golden"
$hlfs export "$clone" "$work/clone.img"
cmp "$work/clone.img" "$work/clone.expected" || fail "the flattened clone needs its parent"
$hlfs check "$clone"
echo "   a clone on S3 of a local volume read, written and flattened while served"

step "fencing: a second host cannot write while the first does"
fencing "s3://hlfs-test/fence-$run_id/vm"
# Credentials are never printed or logged.
never_printed "$AWS_SECRET_ACCESS_KEY"
echo "S3 tests passed"
