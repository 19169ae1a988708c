#!/usr/bin/env bash
# What a read through a chain of clones costs. A local volume of SIZE
# filled with random data, its snapshot, and a chain of clones DEPTH deep
# (each a clone of a snapshot of the one before, none written). For the
# parent's snapshot and for the clones at depths 1, 4, 8 and DEPTH it
# prints the best of RUNS `hlfs export` (a sequential read of every byte,
# each block found through every level above it; the data itself is in
# the host's page cache after the first run), and random 4 KiB reads
# through `hlfs serve` (fio, QD 32, SECONDS), each against the parent's
# snapshot read the same way.
#
# Usage: scripts/bench-clones.sh [--hlfs PATH] [--size SIZE] [--depth N] [--runs N] [--seconds N]
#   --hlfs PATH    the hlfs binary (default target/release/hlfs)
#   --size SIZE    volume size (default 512M)
#   --depth N      clones in the chain (default 16, the most allowed)
#   --runs N       exports of each, the best counts (default 3)
#   --seconds N    seconds of random reads of each (default 10)
#
# Needs fio and python3. Works in a directory under /var/tmp, removed at
# the end.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
hlfs=$repo/target/release/hlfs size=512M depth=16 runs=3 seconds=10
while (($#)); do
    case $1 in
        --hlfs) hlfs=${2:?}; shift 2 ;;
        --size) size=${2:?}; shift 2 ;;
        --depth) depth=${2:?}; shift 2 ;;
        --runs) runs=${2:?}; shift 2 ;;
        --seconds) seconds=${2:?}; shift 2 ;;
        *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
    esac
done
command -v fio >/dev/null || { echo "bench-clones: fio is not installed (apt-get install fio)" >&2; exit 2; }
[[ -x $hlfs ]] || { echo "bench-clones: no $hlfs (cargo build --release -p hlfs)" >&2; exit 2; }
work=$(mktemp -d /var/tmp/hlfs-bench-clones.XXXXXX)
server=
cleanup() {
    [[ -n $server ]] && { kill -TERM "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; }
    rm -rf "$work"
}
trap cleanup EXIT

bytes=$(python3 -c "import sys; s = sys.argv[1]; u = {'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30}; print(int(s[:-1]) * u[s[-1]] if s[-1] in u else int(s))" "$size")
head -c "$bytes" /dev/urandom >"$work/in.img"
"$hlfs" import "$work/in.img" "$work/d0" --create >/dev/null
"$hlfs" snapshot create "$work/d0" s >/dev/null
for ((d = 1; d <= depth; d++)); do
    "$hlfs" clone "$work/d$((d - 1))@s" "$work/d$d" >/dev/null
    "$hlfs" snapshot create "$work/d$d" s >/dev/null
done

export_secs() { # best of RUNS exports of $1, in seconds
    local best= t0 t1 s
    for ((r = 0; r < runs; r++)); do
        t0=$(date +%s%N)
        "$hlfs" export "$1" "$work/out.img" >/dev/null 2>&1
        t1=$(date +%s%N)
        s=$(( (t1 - t0) / 1000 ))
        [[ -z $best || $s -lt $best ]] && best=$s
    done
    cmp -s "$work/out.img" "$work/in.img" || { echo "bench-clones: $1 does not read as the parent" >&2; exit 1; }
    echo "$best"
}

read_iops() { # random 4 KiB reads of export $1 of `hlfs serve`
    rm -f "$work/nbd.sock" "$work/uri"
    "$hlfs" serve "$1" --socket "$work/nbd.sock" --gc-every 0 >"$work/uri" 2>"$work/serve.log" &
    server=$!
    for ((i = 0; i < 300; i++)); do [[ -s $work/uri ]] && break; sleep 0.1; done
    local uri
    uri=$(head -1 "$work/uri")
    [[ -n $uri ]] || { cat "$work/serve.log" >&2; exit 1; }
    fio --name=r --ioengine=nbd --uri="$uri" --rw=randread --bs=4k --iodepth=32 \
        --time_based --runtime="$seconds" --size="$bytes" --output-format=json --output="$work/fio.json" >/dev/null
    kill -TERM "$server"; wait "$server" || true; server=
    python3 -c "import json, sys; print(int(json.load(open(sys.argv[1]))['jobs'][0]['read']['iops']))" "$work/fio.json"
}

echo "size $size, chain of $depth clones, $(nproc) cores; best of $runs exports, $seconds s of random reads"
printf '%-22s %12s %10s %8s %12s %8s\n' "read of" "export (s)" "MiB/s" "÷ base" "4K IOPS" "÷ base"
base_us= base_iops=
for d in 0 1 4 8 "$depth"; do
    ((d <= depth)) || continue
    if ((d == 0)); then what="$work/d0@s"; label="the parent's snapshot"; else what="$work/d$d"; label="clone, depth $d"; fi
    us=$(export_secs "$what")
    iops=$(read_iops "$what")
    [[ -z $base_us ]] && { base_us=$us; base_iops=$iops; }
    python3 -c "
import sys
label, us, base_us, iops, base_iops, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
print(f'{label:<22} {us / 1e6:12.3f} {size / (1 << 20) / (us / 1e6):10.0f} {us / base_us:8.2f} {iops:12d} {iops / base_iops:8.2f}')
" "$label" "$us" "$base_us" "$iops" "$base_iops" "$bytes"
done
