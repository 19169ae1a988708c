#!/usr/bin/env bash
# Builds hlfs in release mode and runs the engine benchmark (`hlfs bench
# --mode engine`) on a scratch volume, after a note of the machine it ran on.
#
# Usage:
#   scripts/bench-engine.sh [--dir DIR] [hlfs bench options...]
#
# Examples:
#   scripts/bench-engine.sh                         # 4 GiB volume in $TMPDIR, 15 s per phase
#   scripts/bench-engine.sh --dir /mnt/nvme --size 16G --seconds 30
#   scripts/bench-engine.sh --size 1G --seconds 3 --json > result.json
#   scripts/bench-engine.sh --mode scatter --writes 200000   # other modes work too
#
# Every argument is passed to `hlfs bench` (see `hlfs bench --help`); a
# --mode given here replaces the default engine mode. --dir is also used for the disk
# note, so put it where you want to measure. The machine note goes to stderr,
# so --json output on stdout stays one JSON object.
#
# Environment: CARGO (default: cargo), HLFS_BENCH_SKIP_BUILD=1 to reuse an
# existing target/release/hlfs.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

# The directory the benchmark will use, for the disk note.
dir=${TMPDIR:-/tmp}
mode=(--mode engine)
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case ${args[i]} in
        --dir) if ((i + 1 < ${#args[@]})); then dir=${args[i + 1]}; fi ;;
        --dir=*) dir=${args[i]#--dir=} ;;
        --mode | --mode=*) mode=() ;;
    esac
done

if [[ ${HLFS_BENCH_SKIP_BUILD:-0} != 1 ]]; then
    "${CARGO:-cargo}" build --release -p hlfs >&2
fi
hlfs=$repo/target/release/hlfs
if [[ ! -x $hlfs ]]; then
    echo "bench-engine.sh: $hlfs not found; build it with cargo build --release -p hlfs" >&2
    exit 1
fi

{
    echo "== machine =="
    echo "date:    $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host:    $(uname -n) ($(uname -srm))"
    echo "cpus:    $(nproc) ($(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//' || echo unknown))"
    echo "commit:  $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (modified)')"
    echo "memory (free -g):"
    free -g | sed 's/^/  /'
    mkdir -p "$dir"
    echo "disk of $dir (df -h):"
    df -h "$dir" | sed 's/^/  /'
    echo "== hlfs bench ${mode[*]} $* =="
} >&2

exec "$hlfs" bench "${mode[@]}" "$@"
