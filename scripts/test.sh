#!/usr/bin/env bash
# The project's test command: formatting, lints, and every test.
# PROPTEST_CASES sets the cases per property test (default 2000 here).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
PROPTEST_CASES="${PROPTEST_CASES:-2000}" cargo test --workspace "$@"
