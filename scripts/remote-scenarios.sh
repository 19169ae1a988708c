# What scripts/test-s3.sh and scripts/test-rados.sh share: a scratch dir
# and a cleanup that stops what they started, a fresh Ceph cluster, and the
# scenarios both run against a remote store. Source it from the repository
# root with `script` set to the caller's name; set `hlfs` (the binary)
# before running a scenario.

state="${HLFS_CEPH_DIR:-/var/tmp/hlfs-ceph}"
work="$(mktemp -d)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
    scripts/ceph-down.sh >/dev/null 2>&1 || true
}
trap cleanup EXIT
step() { echo "== $*"; }
fail() { echo "$script: FAILED: $*" >&2; exit 1; }

# fresh_cluster: the caller owns the cluster from start to end (cleanup
# tears it down), so whatever an interrupted earlier run left in the state
# dir is torn down first instead of failing the run.
fresh_cluster() {
    scripts/ceph-down.sh
    scripts/ceph-up.sh >/dev/null
}

# cli_round_trip VOLUME: create, import 16 MiB, snapshot, export, info and
# check through the CLI. Leaves the image in $work/in.img.
cli_round_trip() {
    local vol=$1
    head -c $((16 << 20)) /dev/urandom > "$work/in.img"
    $hlfs create "$vol" --size 64M --segment-size 4M
    $hlfs import "$work/in.img" "$vol"
    $hlfs snapshot create "$vol" first
    $hlfs export "$vol@first" "$work/out.img"
    cmp <(head -c $((16 << 20)) "$work/out.img") "$work/in.img"
    $hlfs info "$vol" --json | python3 -c 'import json,sys; i=json.load(sys.stdin); assert i["snapshots"]==["first"] and i["allocated_bytes"]==16<<20, i'
    $hlfs check "$vol"
}

# serve VOLUME SOCKET [ARGS...]: starts hlfs serve, sets $server and $uri.
serve() {
    local volume="$1" sock="$2"; shift 2
    rm -f "$work/uri"
    $hlfs serve "$volume" --socket "$sock" "$@" > "$work/uri" 2>> "$work/serve.log" &
    server=$!; pids+=("$server")
    for _ in $(seq 200); do [ -s "$work/uri" ] && break; sleep 0.1; done
    [ -s "$work/uri" ] || { cat "$work/serve.log" >&2; fail "serve did not start"; }
    uri="$(head -1 "$work/uri")"
}

stop_server() {
    kill -TERM "$server"
    wait "$server" || fail "serve exited with $? (log: $(tail -5 "$work/serve.log"))"
}

# outage VOLUME STOP RESUME WHAT: serves VOLUME, and while it writes, runs
# STOP (the store goes away) and later RESUME (it comes back). A flush
# succeeds while the upload backlog has room, writes past it fail with EIO
# after the store timeout, service resumes on the same server, and
# everything flushed before, during and after is in the store.
outage() {
    local vol=$1 stop=$2 resume=$3 what=$4 start took
    $hlfs create "$vol" --size 256M --segment-size 1M
    # --store-timeout 6: writes and flushes wait at most 6 s for a stalled
    # store.
    serve "$vol" "$work/outage.sock" --store-timeout 6 -v
    qemu-io -f raw -c "write -P 0x11 0 4M" -c flush "$uri" >/dev/null
    "$stop"
    # Flushed writes go on while the upload backlog has room: the local
    # journal holds them.
    qemu-io -f raw -c "write -P 0x22 4M 2M" -c flush "$uri" > "$work/q1" 2>&1 \
        || fail "a flush failed while the backlog had room: $(cat "$work/q1")"
    # Past the backlog, writes fail with EIO after the timeout, not forever.
    start=$(date +%s)
    if qemu-io -f raw -c "write -P 0x33 8M 32M" -c flush "$uri" > "$work/q2" 2>&1 \
        && ! grep -qi "error" "$work/q2"; then
        fail "writes past the backlog succeeded with $what down: $(cat "$work/q2")"
    fi
    took=$(( $(date +%s) - start ))
    [ "$took" -lt 120 ] || fail "the I/O error took ${took}s"
    grep -qi "input/output error" "$work/q2" || fail "expected EIO: $(cat "$work/q2")"
    echo "   writes past the backlog failed with EIO after ${took}s"
    "$resume"
    # Service resumes on the same server, without a restart.
    for _ in $(seq 120); do
        qemu-io -f raw -c "write -P 0x44 8M 8M" -c flush "$uri" > "$work/q3" 2>&1 \
            && ! grep -qi "error" "$work/q3" && break
        sleep 1
    done
    grep -qi "error" "$work/q3" && fail "service did not resume: $(cat "$work/q3")"
    qemu-io -f raw -r -c "read -P 0x11 0 4M" -c "read -P 0x22 4M 2M" -c "read -P 0x44 8M 8M" "$uri" > "$work/q4" 2>&1
    grep -qi "fail\|error" "$work/q4" && fail "data lost across the outage: $(cat "$work/q4")"
    stop_server
    $hlfs check "$vol"
    # From the store alone (another cache directory sees no journal).
    HLFS_CACHE_DIR="$work/elsewhere" $hlfs export "$vol" "$work/outage.img"
    python3 - "$work/outage.img" <<'EOF'
import sys
d = open(sys.argv[1], "rb").read()
M = 1 << 20
assert d[:4*M] == b"\x11" * (4*M), "flushed before the outage"
assert d[4*M:6*M] == b"\x22" * (2*M), "flushed during the outage"
assert d[8*M:16*M] == b"\x44" * (8*M), "written after the store returned"
EOF
    echo "   everything flushed before, during and after the outage is in the store"
}

# check_finds_damage VOLUME HOW: `hlfs check` must fail on VOLUME, whose
# first segment was damaged (HOW: corrupt or delete), and name it.
check_finds_damage() {
    local vol=$1 how=$2
    if $hlfs check "$vol" > "$work/check.out" 2>&1; then
        fail "check did not notice a $how segment: $(cat "$work/check.out")"
    fi
    grep -q "damaged:.*0000000001" "$work/check.out" \
        || fail "check did not name the segment: $(cat "$work/check.out")"
    echo "   $how: $(grep -m1 damaged: "$work/check.out")"
}

# flip_middle_byte FILE: corrupts one byte of FILE in place.
flip_middle_byte() {
    python3 -c 'import sys; p=sys.argv[1]; d=bytearray(open(p,"rb").read()); d[len(d)//2]^=0xff; open(p,"wb").write(d)' "$1"
}

# fencing VOLUME: while one host serves VOLUME, another (another cache
# directory, which is another journal) is refused by name; once the first
# stops, the other gets in and sees what the first flushed.
fencing() {
    local vol=$1
    $hlfs create "$vol" --size 64M
    serve "$vol" "$work/fence.sock"
    qemu-io -f raw -c "write -P 0x55 0 1M" -c flush "$uri" >/dev/null
    if HLFS_CACHE_DIR="$work/host-b" $hlfs snapshot create "$vol" intruder > "$work/fence.out" 2>&1; then
        fail "a second writer was let in: $(cat "$work/fence.out")"
    fi
    grep -q "open for writing by process" "$work/fence.out" || fail "unclear refusal: $(cat "$work/fence.out")"
    echo "   refused: $(cat "$work/fence.out")"
    stop_server
    HLFS_CACHE_DIR="$work/host-b" $hlfs snapshot create "$vol" after-close
    HLFS_CACHE_DIR="$work/host-b" $hlfs export "$vol" "$work/fence.img"
    python3 -c 'import sys; d=open(sys.argv[1],"rb").read(); assert d[:1<<20]==b"\x55"*(1<<20)' "$work/fence.img"
}

# never_printed SECRET: fails if SECRET appears in anything hlfs printed.
never_printed() {
    if [ -n "$1" ] && grep -rqF -- "$1" "$work"/serve.log "$work"/*.out "$work"/q? 2>/dev/null; then
        fail "a secret appears in hlfs output"
    fi
}
