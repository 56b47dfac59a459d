#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need, then formatting, lints,
# and every test (unit, in-process multi-node, real processes, real etcd).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh --test
export CARGO_TERM_COLOR=never
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace --no-fail-fast
# The docker compose cluster (deploy/docker): etcd, three nodes, a kill and a partition. It
# reuses the binary the tests just built (release builds are for users, not for this check).
if [ "${MESHNODE_SKIP_DOCKER:-}" = 1 ]; then
  echo "docker compose test skipped (MESHNODE_SKIP_DOCKER=1)"
else
  MESHNODE_BIN="$PWD/target/debug/meshnode" deploy/docker/test.sh
fi
