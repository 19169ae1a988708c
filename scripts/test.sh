#!/usr/bin/env bash
# The project's test command: formatting, lints, and every test.
# PROPTEST_CASES sets the cases per property test (default 2000 here).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The HDFS store builds behind a feature: lint it and run its unit tests
# (its conformance suite needs a cluster: HLFS_HDFS_TEST_URI).
cargo clippy -p hlfs-volume --features hdfs --all-targets -- -D warnings
cargo test -p hlfs-store --features hdfs --lib --test hdfs
PROPTEST_CASES="${PROPTEST_CASES:-2000}" cargo test --workspace "$@"
