#!/usr/bin/env bash
# build-image.sh [TAG]: builds the meshnode runtime image (default meshnode:local) around the
# release binary on this host. Run from anywhere inside the repository; builds the binary with
# `cargo build --release -p meshnode` when it is missing (set MESHNODE_BIN to use another one).
# The base image must exist or be pullable: without a registry, run build-base.sh first.
set -euo pipefail
tag=${1:-meshnode:local}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin=${MESHNODE_BIN:-$root/target/release/meshnode}
if [[ ! -x $bin ]]; then
    echo "[build-image] $bin missing: cargo build --release -p meshnode" >&2
    (cd "$root" && cargo build --release -p meshnode)
fi
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
# Debug sections are of no use in the image; keep the symbols.
if command -v strip >/dev/null; then
    strip --strip-debug -o "$ctx/meshnode" "$bin"
else
    cp "$bin" "$ctx/meshnode"
fi
cp "$here/healthcheck.sh" "$ctx/healthcheck.sh"
chmod 0755 "$ctx/meshnode" "$ctx/healthcheck.sh"
if ! docker build -t "$tag" -f "$here/Dockerfile" "$ctx" >"$ctx/build.log" 2>&1; then
    cat "$ctx/build.log" >&2
    exit 1
fi
echo "[build-image] $tag built from $bin" >&2
