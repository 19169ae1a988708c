#!/usr/bin/env bash
# What a retention window costs: RUNS alternating runs of uniform random
# 4 KiB writes (fio, QD 32, SECONDS each) through `hlfs serve` into a fresh
# volume, with the window off and with `--retain 1h`. For each run it
# prints the IOPS, the write amplification (`hlfs gc --stats`: bytes
# appended to the log ÷ bytes written), stored ÷ live and what the window
# alone keeps; for the runs with the window, how long `hlfs export` of the
# moment halfway through the writes takes, and of the head.
#
# Usage: scripts/bench-retain.sh [--hlfs PATH] [--size SIZE] [--seconds N] [--runs N]
#   --hlfs PATH    the hlfs binary (default target/release/hlfs)
#   --size SIZE    volume size (default 1G)
#   --seconds N    seconds of writes per run (default 15)
#   --runs N       runs of each kind (default 2)
#
# Needs fio and python3. Works in a directory under /var/tmp, removed at
# the end.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
hlfs=$repo/target/release/hlfs size=1G seconds=15 runs=2
while (($#)); do
    case $1 in
        --hlfs) hlfs=${2:?}; shift 2 ;;
        --size) size=${2:?}; shift 2 ;;
        --seconds) seconds=${2:?}; shift 2 ;;
        --runs) runs=${2:?}; shift 2 ;;
        *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
    esac
done
command -v fio >/dev/null || { echo "bench-retain: fio is not installed (apt-get install fio)" >&2; exit 2; }
work=$(mktemp -d /var/tmp/hlfs-bench-retain.XXXXXX)
server=
cleanup() {
    [[ -n $server ]] && { kill -TERM "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; }
    rm -rf "$work"
}
trap cleanup EXIT
now_ms() { date +%s%3N; }
utc() { python3 -c "import datetime, sys; print(datetime.datetime.fromtimestamp(int(sys.argv[1]) / 1000, datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%S.%f')[:-3] + 'Z')" "$1"; }

one_run() {
    local window=$1 vol=$work/vm.hlfs
    rm -rf "$vol" "$work/nbd.sock" "$work/uri"
    if [[ $window == off ]]; then
        "$hlfs" create "$vol" --size "$size" >/dev/null
    else
        "$hlfs" create "$vol" --size "$size" --retain "$window" >/dev/null
    fi
    "$hlfs" serve "$vol" --socket "$work/nbd.sock" --gc-every 0 >"$work/uri" 2>"$work/serve.log" &
    server=$!
    for ((i = 0; i < 300; i++)); do [[ -s $work/uri ]] && break; sleep 0.1; done
    local uri start end
    uri=$(head -1 "$work/uri")
    [[ -n $uri ]] || { cat "$work/serve.log" >&2; exit 1; }
    start=$(now_ms)
    fio --name=w --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth=32 \
        --time_based --runtime="$seconds" --size="$size" --output-format=json --output="$work/fio.json" >/dev/null
    end=$(now_ms)
    kill -TERM "$server"; wait "$server"; server=
    "$hlfs" gc "$vol" --stats --json >"$work/stats.json"
    local moment_s=- head_s=-
    if [[ $window != off ]]; then
        local t0 t1
        t0=$(now_ms)
        "$hlfs" export "$vol@$(utc $(((start + end) / 2)))" "$work/moment.img" >/dev/null
        t1=$(now_ms)
        moment_s=$(python3 -c "print(f'{($t1 - $t0) / 1000:.1f}')")
        "$hlfs" export "$vol" "$work/head.img" >/dev/null
        head_s=$(python3 -c "print(f'{($(now_ms) - $t1) / 1000:.1f}')")
        rm -f "$work/moment.img" "$work/head.img"
    fi
    python3 - "$work" "$window" "$moment_s" "$head_s" <<'PY'
import json, sys
work, window, moment_s, head_s = sys.argv[1:5]
text = open(f"{work}/fio.json").read()
fio = json.loads(text[text.index("{"):])
stats = json.load(open(f"{work}/stats.json"))
gib = lambda n: n / (1 << 30)
print(f"| {window} | {fio['jobs'][0]['write']['iops']:.0f} | {stats['write_amplification']:.4f} "
      f"| {stats['space_ratio']:.2f} | {gib(stats['retention_bytes']):.2f} GiB | {moment_s} | {head_s} |")
PY
}

echo "| retention | IOPS | write amplification | stored ÷ live | kept by the window | export of the moment halfway, s | export of the head, s |"
echo "|---|---|---|---|---|---|---|"
for ((r = 0; r < runs; r++)); do
    one_run off
    one_run 1h
done
