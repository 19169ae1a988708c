#!/usr/bin/env bash
# What the automatic cleaner costs clients, and what it keeps: a local
# volume served by `hlfs serve`, filled sequentially, then overwritten by
# uniform random 4 KiB writes (fio, QD32) for RUNTIME seconds; once with
# the automatic cleaner off, once on (yielding to busy clients, as by
# default), once on without yielding (`--gc-busy-rate 0`). Prints fio's
# IOPS and p99 latency, and the volume's stored ÷ live at the end, for
# each, with the cleaning runs finished and what they freed and copied.
#
# With --reads, the clients read instead: the volume is filled, then
# overwritten once over (one volume's worth of random 4 KiB writes, with
# the cleaner off), which leaves stored about twice live, above the
# cleaner's start mark and below where it stops yielding; then it is
# served again, and random 4 KiB reads (QD32) run for RUNTIME seconds,
# with the cleaner off, on, and on without yielding.
#
# Usage: scripts/bench-gc-online.sh [--hlfs PATH] [--size SIZE] [--runtime SECS] [--target R] [--reads]
#   --hlfs PATH     the hlfs binary (default target/release/hlfs)
#   --size SIZE     volume size (default 512M)
#   --runtime SECS  random overwrites (or reads) for this long (default 60)
#   --target R      the cleaner's --gc-target (default 1.5)
#   --reads         measure reads while the cleaner works, as above
#
# Needs fio and python3. Works in a directory under /var/tmp, removed at
# the end.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
hlfs=$repo/target/release/hlfs size=512M runtime=60 target=1.5 reads=0
while (($#)); do
    case $1 in
        --hlfs) hlfs=${2:?}; shift 2 ;;
        --size) size=${2:?}; shift 2 ;;
        --runtime) runtime=${2:?}; shift 2 ;;
        --target) target=${2:?}; shift 2 ;;
        --reads) reads=1; shift ;;
        *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
    esac
done
command -v fio >/dev/null || { echo "bench-gc-online: fio is not installed (apt-get install fio)" >&2; exit 2; }
work=$(mktemp -d /var/tmp/hlfs-bench-gc-online.XXXXXX)
server=
cleanup() {
    [[ -n $server ]] && { kill -TERM "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; }
    rm -rf "$work"
}
trap cleanup EXIT
run() { # run NAME SERVE-ARGS...: one measurement, as a JSON line in $work/results
    local name=$1; shift
    local vol=$work/$name.hlfs
    "$hlfs" create "$vol" --size "$size" >/dev/null
    rm -f "$work/uri"
    local first=("$@")
    ((reads)) && first=(--gc-every 0)
    "$hlfs" serve "$vol" --socket "$work/$name.sock" "${first[@]}" >"$work/uri" 2>"$work/$name.log" &
    server=$!
    local i
    for ((i = 0; i < 300; i++)); do [[ -s $work/uri ]] && break; sleep 0.1; done
    local uri
    uri=$(head -1 "$work/uri")
    [[ -n $uri ]] || { cat "$work/$name.log" >&2; exit 1; }
    fio --name=fill --ioengine=nbd --uri="$uri" --rw=write --bs=1M --iodepth=8 --output=/dev/null
    if ((reads)); then
        fio --name=overwrite --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth=32 \
            --norandommap --randrepeat=0 --io_size="$size" --output=/dev/null
        kill -TERM "$server"; wait "$server"; server=
        rm -f "$work/uri"
        "$hlfs" serve "$vol" --socket "$work/$name.sock" "$@" >"$work/uri" 2>>"$work/$name.log" &
        server=$!
        for ((i = 0; i < 300; i++)); do [[ -s $work/uri ]] && break; sleep 0.1; done
        uri=$(head -1 "$work/uri")
        [[ -n $uri ]] || { cat "$work/$name.log" >&2; exit 1; }
    fi
    local rw=randwrite
    ((reads)) && rw=randread
    fio --name=clients --ioengine=nbd --uri="$uri" --rw=$rw --bs=4k --iodepth=32 \
        --norandommap --randrepeat=0 --time_based --runtime="$runtime" \
        --output-format=json --output="$work/$name.fio.json"
    "$hlfs" info "$vol" --json >"$work/$name.info.json"
    kill -TERM "$server"; wait "$server"; server=
    "$hlfs" gc "$vol" --stats --json >"$work/$name.stats.json"
    python3 - "$work" "$name" "$rw" >>"$work/results" <<'PY'
import json, sys
work, name, rw = sys.argv[1], sys.argv[2], sys.argv[3]
fio = json.load(open(f"{work}/{name}.fio.json"))["jobs"][0]["read" if rw == "randread" else "write"]
info = json.load(open(f"{work}/{name}.info.json"))
stats = json.load(open(f"{work}/{name}.stats.json"))
live = (info.get("live") or {}).get("figures") or {}
print(json.dumps({
    "name": name,
    "iops": fio["iops"],
    "p99_ms": fio["clat_ns"]["percentile"]["99.000000"] / 1e6,
    "ratio": stats["space_ratio"],
    "gc_runs": live.get("gc_runs", 0),
    "freed_mib": live.get("gc_freed_bytes", 0) / 2**20,
    "copied_mib": live.get("gc_copied_bytes", 0) / 2**20,
}))
PY
}
run off --gc-every 0
run on --gc-every 5 --gc-grace 5 --gc-target "$target"
run eager --gc-every 5 --gc-grace 5 --gc-target "$target" --gc-busy-rate 0
python3 - "$work/results" "$runtime" "$target" "$reads" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
what = "reads after one volume of overwrites" if sys.argv[4] == "1" else "overwrites"
print(f"random 4 KiB {what} for {sys.argv[2]} s, automatic cleaner off, on, and on without yielding (--gc-target {sys.argv[3]}):")
print(f"{'cleaner':8} {'IOPS':>9} {'p99 ms':>8} {'stored/live':>12} {'runs':>5} {'freed MiB':>10} {'copied MiB':>11}")
for r in rows:
    print(f"{r['name']:8} {r['iops']:9.0f} {r['p99_ms']:8.2f} {r['ratio']:12.2f} {r['gc_runs']:5d} {r['freed_mib']:10.1f} {r['copied_mib']:11.1f}")
PY
