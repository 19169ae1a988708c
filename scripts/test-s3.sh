#!/usr/bin/env bash
# Runs HLFS against a real S3 engine: a single-node Ceph cluster with the
# RADOS gateway on 127.0.0.1 (scripts/ceph-up.sh), torn down afterwards.
#  1. the blob-store conformance suite on the S3 store;
#  2. a volume at s3://... through the CLI: create, import, export,
#     snapshot, check, and serving it over NBD to qemu-img.
# Usage: scripts/test-s3.sh
set -euo pipefail
cd "$(dirname "$0")/.."
state="${HLFS_CEPH_DIR:-/var/tmp/hlfs-ceph}"
work="$(mktemp -d)"
server=""
cleanup() {
    [ -n "$server" ] && kill "$server" 2>/dev/null || true
    rm -rf "$work"
    scripts/ceph-down.sh >/dev/null 2>&1 || true
}
trap cleanup EXIT
scripts/ceph-up.sh >/dev/null
# shellcheck disable=SC1091
set -a; . "$state/s3.env"; set +a

echo "== conformance suite against $AWS_ENDPOINT_URL"
HLFS_S3_TEST_URI="s3://hlfs-test/conformance-$$" \
    cargo test -p hlfs-store --test s3 -- --include-ignored

echo "== a volume on S3 through the CLI"
cargo build -q -p hlfs
hlfs=target/debug/hlfs
export HLFS_CACHE_DIR="$work/cache"
vol="s3://hlfs-test/volumes-$$/vm1"
head -c $((16 << 20)) /dev/urandom > "$work/in.img"
$hlfs create "$vol" --size 64M --segment-size 4M
$hlfs import "$work/in.img" "$vol"
$hlfs snapshot create "$vol" first
$hlfs export "$vol@first" "$work/out.img"
cmp <(head -c $((16 << 20)) "$work/out.img") "$work/in.img"
$hlfs info "$vol" --json | python3 -c 'import json,sys; i=json.load(sys.stdin); assert i["snapshots"]==["first"] and i["allocated_bytes"]==16<<20, i'
$hlfs check "$vol"

echo "== serving it over NBD"
$hlfs serve "$vol" --socket "$work/nbd.sock" > "$work/uri" 2> "$work/serve.log" &
server=$!
for _ in $(seq 100); do [ -s "$work/uri" ] && break; sleep 0.1; done
uri="$(head -1 "$work/uri")"
qemu-img convert -n -f raw -O raw "$work/in.img" "$uri"
qemu-img convert -f raw -O raw "$uri" "$work/back.img"
cmp <(head -c $((16 << 20)) "$work/back.img") "$work/in.img"
kill -TERM "$server"; wait "$server"; server=""
$hlfs check "$vol"
echo "S3 tests passed"
