#!/usr/bin/env bash
# Zero set-up: installs what the build needs, builds meshnode, and runs `meshnode demo`
# (three nodes on loopback with a throw-away CA). Extra arguments go to `meshnode demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo build --release --quiet -p meshnode
exec target/release/meshnode demo "$@"
