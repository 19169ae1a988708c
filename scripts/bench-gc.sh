#!/usr/bin/env bash
# What cleaning gives back and what it costs: a local volume filled
# sequentially, a snapshot taken, the whole volume overwritten PASSES times
# by uniform random 4 KiB writes (fio through `hlfs serve`), the snapshot
# deleted (or kept); then `hlfs gc` down to the default space target.
# Prints stored ÷ live before and after, what the run copied, and how long
# it took.
#
# Usage: scripts/bench-gc.sh [--hlfs PATH] [--size SIZE] [--passes N] [--target R]
#                            [--keep-snapshot | --snapshot-last]
#   --hlfs PATH    the hlfs binary (default target/release/hlfs)
#   --size SIZE    volume size (default 512M)
#   --passes N     random overwrites of the whole volume (default 3)
#   --target R     the space target given to hlfs gc (default its own)
#   --keep-snapshot  clean with the snapshot still there: what only it holds
#                  is copied and stays live
#   --snapshot-last  take the snapshot after the overwrites instead, as a
#                  backup would, and keep it: it holds every live block
#
# Needs fio and python3. Works in a directory under /var/tmp, removed at
# the end.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
hlfs=$repo/target/release/hlfs size=512M passes=3 target=() keep= last=
while (($#)); do
    case $1 in
        --hlfs) hlfs=${2:?}; shift 2 ;;
        --size) size=${2:?}; shift 2 ;;
        --passes) passes=${2:?}; shift 2 ;;
        --target) target=(--target "${2:?}"); shift 2 ;;
        --keep-snapshot) keep=1; shift ;;
        --snapshot-last) keep=1 last=1; shift ;;
        *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
    esac
done
command -v fio >/dev/null || { echo "bench-gc: fio is not installed (apt-get install fio)" >&2; exit 2; }
work=$(mktemp -d /var/tmp/hlfs-bench-gc.XXXXXX)
server=
cleanup() {
    [[ -n $server ]] && { kill -TERM "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; }
    rm -rf "$work"
}
trap cleanup EXIT
vol=$work/vm.hlfs
"$hlfs" create "$vol" --size "$size" >/dev/null
"$hlfs" serve "$vol" --socket "$work/nbd.sock" >"$work/uri" 2>"$work/serve.log" &
server=$!
for ((i = 0; i < 300; i++)); do [[ -s $work/uri ]] && break; sleep 0.1; done
uri=$(head -1 "$work/uri")
[[ -n $uri ]] || { cat "$work/serve.log" >&2; exit 1; }
fio --name=fill --ioengine=nbd --uri="$uri" --rw=write --bs=1M --iodepth=8 --output=/dev/null
[[ -n $last ]] || "$hlfs" snapshot create "$vol" filled >/dev/null
bytes=$("$hlfs" info "$vol" --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["size"])')
fio --name=overwrite --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth=32 \
    --norandommap --randrepeat=0 --io_size=$((bytes * passes)) --output=/dev/null
[[ -z $last ]] || "$hlfs" snapshot create "$vol" overwritten >/dev/null
[[ -n $keep ]] || "$hlfs" snapshot delete "$vol" filled >/dev/null
kill -TERM "$server"; wait "$server"; server=
"$hlfs" gc "$vol" --stats --json >"$work/before.json"
start=$(date +%s.%N)
"$hlfs" gc "$vol" --grace 0 --json "${target[@]}" >"$work/gc.json"
end=$(date +%s.%N)
"$hlfs" gc "$vol" --stats --json >"$work/after.json"
"$hlfs" check "$vol" >/dev/null
label=deleted
[[ -z $keep ]] || label=kept
[[ -z $last ]] || label="taken last and kept"
python3 - "$work" "$start" "$end" "$passes" "$label" <<'PY'
import json, sys
work, start, end, passes = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
snapshot = sys.argv[5]
before = json.load(open(f"{work}/before.json"))
gc = json.load(open(f"{work}/gc.json"))
after = json.load(open(f"{work}/after.json"))
mib = lambda n: n / (1 << 20)
secs = end - start
print(f"after {passes} random overwrite passes, snapshot {snapshot}:")
print(f"  before gc: stored {mib(before['stored_bytes']):.1f} MiB, live {mib(before['live_bytes']):.1f} MiB, ratio {before['space_ratio']:.2f}")
print(f"  after gc:  stored {mib(after['stored_bytes']):.1f} MiB, live {mib(after['live_bytes']):.1f} MiB, ratio {after['space_ratio']:.2f}")
print(f"  gc: {gc['passes']} passes, {gc['deleted_segments']} segments deleted, "
      f"{mib(gc['freed_bytes']):.1f} MiB freed, {mib(gc['copied_bytes']):.1f} MiB copied, "
      f"{secs:.1f} s ({mib(gc['freed_bytes']) / secs:.0f} MiB freed per second), stopped: {gc['stopped']}")
PY
