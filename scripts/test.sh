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

# --- VM test (deploy/systemd/vm-test.sh): the .deb and its unit under a real systemd ----------
# About 4-8 minutes with the cached image in target/vm/ (the first run builds it: 6-9 more).
if [ "${MESHNODE_SKIP_VM:-}" = 1 ]; then
  echo "VM test skipped (MESHNODE_SKIP_VM=1)"
elif ! command -v qemu-system-x86_64 >/dev/null || ! command -v debootstrap >/dev/null; then
  echo "VM test skipped: qemu-system-x86_64 or debootstrap not installed (Debian: qemu-system-x86, debootstrap)"
elif [ "$(id -u)" != 0 ]; then
  echo "VM test skipped: it needs root (debootstrap, chroot)"
else
  deploy/systemd/vm-test.sh "$PWD/target/debug/meshnode"
fi
