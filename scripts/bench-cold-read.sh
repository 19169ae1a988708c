#!/usr/bin/env bash
# One cold sequential read of an S3 volume through `hlfs serve`: a volume
# written sequentially, the server restarted with its read cache emptied,
# then fio reading the whole export once (1 MiB, QD 8). Prints fio's MB/s
# and the store's GET count and bytes (from the server's metrics).
#
# Usage: scripts/bench-cold-read.sh [--hlfs PATH] [--size SIZE] [--latency MS]
#   --hlfs PATH    the hlfs binary (default target/release/hlfs)
#   --size SIZE    volume size (default 256M)
#   --latency MS   hold each GET this long before the gateway sees it
#                  (scripts/latency_proxy.py on 127.0.0.1:7491): a far store
#
# Each run leaves its volume (s3://hlfs-test/cold-read-PID/vm) in the
# bucket; scripts/ceph-down.sh removes the whole cluster.
#
# Needs the cluster of scripts/ceph-up.sh (its s3.env), fio, curl, python3.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
hlfs=$repo/target/release/hlfs size=256M latency=0
while (($#)); do
    case $1 in
        --hlfs) hlfs=${2:?}; shift 2 ;;
        --size) size=${2:?}; shift 2 ;;
        --latency) latency=${2:?}; shift 2 ;;
        *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
    esac
done
state=${HLFS_CEPH_DIR:-/var/tmp/hlfs-ceph}
[[ -s $state/s3.env ]] || { echo "bench-cold-read: no cluster: run scripts/ceph-up.sh first" >&2; exit 2; }
# shellcheck disable=SC1091
. "$state/s3.env"
work=$(mktemp -d /var/tmp/hlfs-cold-read.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
if [[ $latency != 0 ]]; then
    python3 "$repo/scripts/latency_proxy.py" 7491 127.0.0.1 "${AWS_ENDPOINT_URL##*:}" "$(awk -v m="$latency" 'BEGIN {print m / 1000}')" &
    pids+=($!)
    sleep 1
    export AWS_ENDPOINT_URL=http://127.0.0.1:7491
fi
export HLFS_CACHE_DIR=$work/cache
vol=s3://hlfs-test/cold-read-$$/vm
serve() { # serve ARGS...: starts hlfs serve, sets uri
    rm -f "$work/uri"
    "$hlfs" serve "$vol" --socket "$work/nbd.sock" "$@" >"$work/uri" 2>>"$work/serve.log" &
    server=$!
    local i
    for ((i = 0; i < 300; i++)); do [[ -s $work/uri ]] && break; sleep 0.1; done
    uri=$(head -1 "$work/uri")
    [[ -n $uri ]] || { cat "$work/serve.log" >&2; exit 1; }
}
"$hlfs" create "$vol" --size "$size" >/dev/null
serve
pids+=("$server")
timeout 600 fio --name=fill --ioengine=nbd --uri="$uri" --rw=write --bs=1M --iodepth=8 --output=/dev/null
kill -TERM "$server"; wait "$server"
unset 'pids[-1]'
rm -rf "$HLFS_CACHE_DIR/segments"
serve --metrics 0
pids+=("$server")
sleep 0.3
metrics=$(grep -o '127.0.0.1:[0-9]*' "$work/serve.log" | tail -1)
timeout 600 fio --name=cold --ioengine=nbd --uri="$uri" --rw=read --bs=1M --iodepth=8 \
    --output-format=json --output="$work/fio.json"
python3 - "$work/fio.json" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
read = json.loads(text[text.find("{"):])["jobs"][0]["read"]
print(f"cold sequential read: {read['bw_bytes'] / 1e6:.1f} MB/s ({read['io_bytes']} bytes)")
PY
curl -s "http://$metrics/metrics" | grep -E '^hlfs_store_(requests_total.*"get"|bytes_total.*"get")'
