#!/usr/bin/env bash
# Write amplification of the automatic cleaner, measured from outside, as
# issue 9 asks: a fresh local volume served by `hlfs serve`, filled with
# 1 MiB sequential writes, then overwritten by random 4 KiB writes (fio,
# QD 32) for PASSES times its size. Runs: the cleaner off; on with
# `--gc-target` 1.5; on with 1.25; and on with 1.25 under 80/20 skew
# (fio --random_distribution=zoned:80/20:20/80: 80 % of the writes to 20 %
# of the volume). After the writes, the cleaner is given until stored ≤
# target × live (or SETTLE seconds). For each run it prints:
#   - IOPS of the overwrites (and, for the runs with the cleaner, over the
#     IOPS without it in the same script: the target is ≥ 0.7);
#   - write amplification from outside: the bytes the server made the
#     kernel write (write_bytes in /proc/PID/io, from the end of the fill to
#     the end of the settling) over the bytes fio overwrote;
#   - over the same span, from the server's metrics, what it appended to
#     the log per byte clients wrote, split into cleaning's copies
#     (hlfs_gc_copied_bytes) and the rest beside the data (map pages,
#     checkpoint records, headers);
#   - stored ÷ live during the writes (the segments' bytes in the volume's
#     directory, sampled every 2 s, over live at the end): the median of
#     the second half, where the cleaner holds it, and the highest; and at
#     the end (`hlfs gc --stats`). Stored counts the segments the cleaner
#     emptied that wait out their grace (`--gc-grace 5` here), which the
#     cleaner does not count against its target.
#
# Usage: scripts/bench-wa.sh [--hlfs PATH] [--size SIZE] [--passes N] [--settle SECS] [--only NAMES]
#                            [--rate R] [--segment-size S]
#   --hlfs PATH     the hlfs binary (default target/release/hlfs)
#   --size SIZE     volume size (default 1G)
#   --passes N      random overwrites of the whole volume (default 3)
#   --settle SECS   the most the cleaner gets after the writes (default 120)
#   --only NAMES    comma-separated runs among off,1.5,1.25,skew-1.25
#   --rate R        hold the overwrites to R bytes a second (fio --rate,
#                   such as 12m), below what the cleaner can follow, to
#                   measure it at its target rather than catching up
#   --segment-size S  the volume's segment size (default hlfs's, 64M)
#
# Needs fio and python3. Works in a directory under /var/tmp, removed at
# the end.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
hlfs=$repo/target/release/hlfs size=1G passes=3 settle=120 only=off,1.5,1.25,skew-1.25 rate=() segment=()
while (($#)); do
    case $1 in
        --hlfs) hlfs=${2:?}; shift 2 ;;
        --size) size=${2:?}; shift 2 ;;
        --passes) passes=${2:?}; shift 2 ;;
        --settle) settle=${2:?}; shift 2 ;;
        --only) only=${2:?}; shift 2 ;;
        --rate) rate=(--rate="${2:?}"); shift 2 ;;
        --segment-size) segment=(--segment-size "${2:?}"); shift 2 ;;
        *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
    esac
done
command -v fio >/dev/null || { echo "bench-wa: fio is not installed (apt-get install fio)" >&2; exit 2; }
work=$(mktemp -d /var/tmp/hlfs-bench-wa.XXXXXX)
server=
cleanup() {
    [[ -n $server ]] && { kill -TERM "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; }
    rm -rf "$work"
}
trap cleanup EXIT
written() { awk '/^write_bytes/ {print $2}' "/proc/$server/io"; }
metrics_port=$((20000 + RANDOM % 20000))
# A counter of the server's metrics (summed over its labels).
counter() {
    curl -s "127.0.0.1:$metrics_port/metrics" |
        awk -v k="$1" 'index($1, k "{") == 1 || $1 == k { sum += $2 } END { printf "%.0f\n", sum }'
}
counters() { echo "$(counter hlfs_volume_written_bytes_total) $(counter hlfs_log_appended_bytes_total) $(counter hlfs_gc_copied_bytes_total)"; }
ratio() { "$hlfs" gc "$1" --stats --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["space_ratio"])'; }

run() { # run NAME TARGET DISTRIBUTION
    local name=$1 target=$2 dist=$3 vol=$work/$1.hlfs
    "$hlfs" create "$vol" --size "$size" "${segment[@]}" >/dev/null
    local gc=(--gc-every 0)
    [[ $target != - ]] && gc=(--gc-every 2 --gc-grace 5 --gc-target "$target")
    rm -f "$work/uri"
    "$hlfs" serve "$vol" --socket "$work/$name.sock" --metrics "$metrics_port" "${gc[@]}" >"$work/uri" 2>"$work/$name.log" &
    server=$!
    local i uri
    for ((i = 0; i < 300; i++)); do [[ -s $work/uri ]] && break; sleep 0.1; done
    uri=$(head -1 "$work/uri")
    [[ -n $uri ]] || { cat "$work/$name.log" >&2; exit 1; }
    fio --name=fill --ioengine=nbd --uri="$uri" --rw=write --bs=1M --iodepth=8 --output=/dev/null
    local bytes before start
    bytes=$("$hlfs" info "$vol" --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["size"])')
    before=$(written)
    local counted_before counted_after
    counted_before=$(counters)
    local skew=()
    [[ $dist != uniform ]] && skew=(--random_distribution="$dist")
    # Stored bytes every 2 s during the writes, from the directory itself:
    # over live at the end, the highest stored ÷ live (the volume is
    # written whole before, so live hardly moves).
    (while sleep 2; do du -sb --apparent-size "$vol/segments" 2>/dev/null | cut -f1; done) >"$work/$name.stored" &
    local sampler=$!
    fio --name=overwrite --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth=32 \
        --norandommap --randrepeat=0 --io_size=$((bytes * passes)) "${skew[@]}" "${rate[@]}" \
        --output-format=json --output="$work/$name.fio.json"
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    start=$(date +%s)
    if [[ $target != - ]]; then
        # The cleaner's last run may still be going: give it until the
        # target holds (as of the last checkpoint), or SETTLE seconds.
        while (($(date +%s) - start < settle)); do
            python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) <= float(sys.argv[2]) else 1)" \
                "$(ratio "$vol")" "$target" && break
            sleep 2
        done
    fi
    local after settled
    after=$(written)
    counted_after=$(counters)
    settled=$(($(date +%s) - start))
    kill -TERM "$server"; wait "$server"; server=
    "$hlfs" gc "$vol" --stats --json >"$work/$name.stats.json"
    python3 - "$work" "$name" "$before" "$after" "$settled" "$counted_before" "$counted_after" >>"$work/results" <<'PY'
import json, sys
work, name, before, after, settled = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
c0, c1 = ([int(x) for x in a.split()] for a in sys.argv[6:8])
client, appended, copies = (c1[i] - c0[i] for i in range(3))
text = open(f"{work}/{name}.fio.json").read()
fio = json.loads(text[text.index("{"):])["jobs"][0]["write"]
stats = json.load(open(f"{work}/{name}.stats.json"))
stored = [int(l) for l in open(f"{work}/{name}.stored") if l.strip()]
held = sorted(stored[len(stored) // 2:]) or [0]
print(json.dumps({
    "peak": max(stored, default=0) / stats["live_bytes"],
    "held": held[len(held) // 2] / stats["live_bytes"],
    "name": name,
    "iops": fio["iops"],
    "fio_bytes": fio["io_bytes"],
    "server_bytes": after - before,
    "ratio": stats["space_ratio"],
    "settled_s": int(settled),
    "inside_wa": stats["write_amplification"],
    "copies": copies / max(client, 1),
    "beside": (appended - client - copies) / max(client, 1),
}))
PY
    rm -rf "$vol"
}
for name in ${only//,/ }; do
    case $name in
        off) run off - uniform ;;
        1.5) run 1.5 1.5 uniform ;;
        1.25) run 1.25 1.25 uniform ;;
        skew-1.25) run skew-1.25 1.25 zoned:80/20:20/80 ;;
        *) echo "bench-wa: no run named $name" >&2; exit 2 ;;
    esac
done
python3 - "$work/results" "$size" "$passes" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
off = next((r["iops"] for r in rows if r["name"] == "off"), None)
print(f"{sys.argv[2]} volume filled, then {sys.argv[3]} volumes of random 4 KiB overwrites (QD 32):")
print("| run | IOPS | ÷ cleaner off | write amplification (from /proc) | of which copies (metrics) | map pages, checkpoints, headers (metrics) | stored ÷ live during the writes: median of the second half | highest | at the end | settling after the writes, s | write amplification (hlfs gc --stats, since creation) |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    rel = f"{r['iops'] / off:.2f}" if off and r["name"] != "off" else "-"
    print(f"| {r['name']} | {r['iops']:.0f} | {rel} | {r['server_bytes'] / r['fio_bytes']:.2f} | {r['copies']:.2f} | {r['beside']:.2f} | {r['held']:.2f} | {r['peak']:.2f} | {r['ratio']:.2f} | {r['settled_s']} | {r['inside_wa']:.2f} |")
PY
