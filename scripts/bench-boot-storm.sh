#!/usr/bin/env bash
# A boot storm on the Ceph gateway: a base volume of SIZE on S3 (random
# data) and CLONES local clones of its snapshot, all served by one `hlfs
# serve` with an empty read cache, each export read sequentially by its
# own nbdcopy at once. Prints the bytes the gateway sent (counted by
# scripts/latency_proxy.py between the server and the gateway, HTTP
# headers included) against the base's size, and the time; then the same
# for one clone read alone, for comparison.
#
# Usage: scripts/bench-boot-storm.sh [--hlfs PATH] [--size SIZE] [--clones N]
#   --hlfs PATH    the hlfs binary (default target/release/hlfs)
#   --size SIZE    the base's size (default 256M)
#   --clones N     clones read at once (default 8)
#
# Each run leaves its base (s3://hlfs-test/storm-PID/base) in the bucket;
# scripts/ceph-down.sh removes the whole cluster.
#
# Needs the cluster of scripts/ceph-up.sh (its s3.env), nbdcopy, python3.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
hlfs=$repo/target/release/hlfs size=256M clones=8
while (($#)); do
    case $1 in
        --hlfs) hlfs=${2:?}; shift 2 ;;
        --size) size=${2:?}; shift 2 ;;
        --clones) clones=${2:?}; shift 2 ;;
        *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
    esac
done
state=${HLFS_CEPH_DIR:-/var/tmp/hlfs-ceph}
[[ -s $state/s3.env ]] || { echo "bench-boot-storm: no cluster: run scripts/ceph-up.sh first" >&2; exit 2; }
command -v nbdcopy >/dev/null || { echo "bench-boot-storm: nbdcopy is not installed (apt-get install libnbd-bin)" >&2; exit 2; }
# shellcheck disable=SC1091
. "$state/s3.env"
work=$(mktemp -d /var/tmp/hlfs-boot-storm.XXXXXX)
pids=()
server=
cleanup() {
    [[ -n $server ]] && { kill -TERM "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; }
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
port=7492
python3 "$repo/scripts/latency_proxy.py" "$port" 127.0.0.1 "${AWS_ENDPOINT_URL##*:}" 0 "$work/received" &
pids+=($!)
sleep 1
export HLFS_CACHE_DIR=$work/cache
bytes=$(python3 -c "import sys; s = sys.argv[1]; u = {'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30}; print(int(s[:-1]) * u[s[-1]] if s[-1] in u else int(s))" "$size")
base=s3://hlfs-test/storm-$$/base
head -c "$bytes" /dev/urandom >"$work/in.img"
"$hlfs" import "$work/in.img" "$base" --create >/dev/null
"$hlfs" snapshot create "$base" gold >/dev/null
vols=()
for ((i = 0; i < clones; i++)); do
    "$hlfs" clone "$base@gold" "$work/c$i" >/dev/null
    vols+=("$work/c$i")
done

storm() { # storm N: serve the first N clones with a cold cache, read them at once
    local n=$1 i t0 t1 before after
    rm -rf "$HLFS_CACHE_DIR"
    rm -f "$work/nbd.sock" "$work/uris"
    AWS_ENDPOINT_URL=http://127.0.0.1:$port "$hlfs" serve "${vols[@]:0:n}" --socket "$work/nbd.sock" \
        --gc-every 0 >"$work/uris" 2>"$work/serve.log" &
    server=$!
    for ((i = 0; i < 300; i++)); do [[ $(wc -l <"$work/uris") -ge $n ]] && break; sleep 0.1; done
    [[ $(wc -l <"$work/uris") -ge $n ]] || { cat "$work/serve.log" >&2; exit 1; }
    before=$(cat "$work/received")
    t0=$(date +%s%N)
    local readers=()
    while read -r uri; do
        nbdcopy "$uri" null: &
        readers+=($!)
    done <"$work/uris"
    for p in "${readers[@]}"; do wait "$p"; done
    t1=$(date +%s%N)
    after=$(cat "$work/received")
    kill -TERM "$server"; wait "$server" || true; server=
    python3 -c "
import sys
n, fetched, size, ns = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
print(f'{n} clone(s) read at once: the gateway sent {fetched / (1 << 20):.1f} MiB for a {size / (1 << 20):.0f} MiB base ({fetched / size:.2f} copies), in {ns / 1e9:.1f} s ({n * size / (1 << 20) / (ns / 1e9):.0f} MiB/s read by the clients)')
" "$n" "$((after - before))" "$bytes" "$((t1 - t0))"
}
echo "base $size on $AWS_ENDPOINT_URL, $clones local clones, one hlfs serve, cold read cache"
storm "$clones"
storm 1
