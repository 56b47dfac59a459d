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
