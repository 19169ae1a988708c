#!/usr/bin/env bash
# Runs the engine's reference-model property test with many cases (default
# one million) in release mode. Usage: scripts/model-soak.sh [CASES]
set -euo pipefail
cd "$(dirname "$0")/.."
cases="${1:-1000000}"
PROPTEST_CASES="$cases" cargo test --release -p hlfs-volume --test model -- --nocapture
