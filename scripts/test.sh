#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need (system packages, and the
# Python test clients into target/test-venv), then formatting, lints, every test (unit,
# in-process multi-node, real processes, real etcd), the fresh-machine check of that install
# step, the docker compose cluster test and the Debian package test (skipped where docker is absent).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh --test
# The interpreter of the Python test clients (node/tests/h3_interop.rs and others).
export MESHNODE_TEST_PYTHON="${MESHNODE_TEST_VENV:-$PWD/target/test-venv}/bin/python"
# promtool for the alert rules' tests: on PATH, else unpacked by deps.sh into target/tools.
command -v promtool >/dev/null 2>&1 || export MESHNODE_PROMTOOL="$PWD/target/tools/promtool"
export CARGO_TERM_COLOR=never
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace --no-fail-fast

have_docker() { command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; }
if [ "${MESHNODE_SKIP_DOCKER:-}" = 1 ]; then
  echo "fresh-machine check and docker compose test skipped (MESHNODE_SKIP_DOCKER=1)"
elif ! have_docker; then
  echo "fresh-machine check and docker compose test SKIPPED: docker is not available here"
else
  # deps.sh in a bare Debian 12 container: every tool and Python module the suite needs.
  scripts/fresh-machine-check.sh
  # The docker compose cluster (deploy/docker): etcd, three nodes, a kill and a partition. It
  # reuses the binary the tests just built (release builds are for users, not for this check).
  MESHNODE_BIN="$PWD/target/debug/meshnode" deploy/docker/test.sh
  # The Debian package (of the same binary): install, upgrade keeping the config, remove, purge.
  deploy/debian/test.sh "$PWD/target/debug/meshnode"
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
