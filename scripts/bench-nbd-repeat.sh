#!/usr/bin/env bash
# Runs scripts/bench-nbd.sh N times (hlfs built once) and reports each
# ratio's median and spread, as docs/BENCHMARKS.md asks of its numbers.
#
# Usage: scripts/bench-nbd-repeat.sh N [bench-nbd.sh arguments...]
#   e.g. scripts/bench-nbd-repeat.sh 3 --size 1G --runtime 5
#
# Each run's Markdown report and JSON go to $HLFS_BENCH_OUT (default
# /var/tmp/hlfs-bench-repeat.XXXXXX, kept); the median table is printed on
# stdout.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
n=${1:?usage: scripts/bench-nbd-repeat.sh N [bench-nbd.sh arguments...]}
shift
[[ $n =~ ^[1-9][0-9]*$ ]] || { echo "bench-nbd-repeat: N must be a positive integer" >&2; exit 2; }
for arg in "$@"; do
    case $arg in --json-out | --json-out=*) echo "bench-nbd-repeat: --json-out is set per run" >&2; exit 2 ;; esac
done
out=${HLFS_BENCH_OUT:-$(mktemp -d /var/tmp/hlfs-bench-repeat.XXXXXX)}
mkdir -p "$out"
jsons=()
for ((i = 1; i <= n; i++)); do
    echo "bench-nbd-repeat: run $i of $n" >&2
    skip=${HLFS_BENCH_SKIP_BUILD:-0}
    ((i > 1)) && skip=1
    HLFS_BENCH_SKIP_BUILD=$skip "$repo/scripts/bench-nbd.sh" "$@" --json-out "$out/run$i.json" >"$out/run$i.md"
    jsons+=("$out/run$i.json")
done
echo "bench-nbd-repeat: each run's report and JSON are in $out" >&2
python3 "$repo/scripts/bench_nbd_median.py" "${jsons[@]}"
