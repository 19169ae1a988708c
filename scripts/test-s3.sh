#!/usr/bin/env bash
# Runs the blob-store conformance suite against a real S3 engine: a
# single-node Ceph cluster with the RADOS gateway on 127.0.0.1, brought up
# by scripts/ceph-up.sh and torn down afterwards.
# Usage: scripts/test-s3.sh
set -euo pipefail
cd "$(dirname "$0")/.."
state="${HLFS_CEPH_DIR:-/var/tmp/hlfs-ceph}"
trap 'scripts/ceph-down.sh >/dev/null 2>&1 || true' EXIT
scripts/ceph-up.sh
# shellcheck disable=SC1091
set -a; . "$state/s3.env"; set +a
HLFS_S3_TEST_URI="s3://hlfs-test/conformance-$$" \
    cargo test -p hlfs-store --test s3 -- --include-ignored
