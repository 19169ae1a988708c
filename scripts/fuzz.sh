#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60). Needs cargo-fuzz.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-60}"
for target in record map_page checkpoint manifest pin nbd_messages nbd_server control_messages diff_stream; do
    echo "== fuzzing $target for ${seconds}s"
    RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" -- -max_total_time="$seconds"
done
