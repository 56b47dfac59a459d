#!/usr/bin/env bash
# Installs the system packages meshnode's build and tests need, if they are missing:
#   protoc and its well-known types (etcd-client's build script), etcd (registry tests). Debian/Ubuntu, apt.
set -euo pipefail

want=()
command -v protoc >/dev/null 2>&1 || want+=(protobuf-compiler)
# protoc's well-known types (google/protobuf/descriptor.proto, imported by etcd's protos) come
# from libprotobuf-dev, which protobuf-compiler only recommends: without it the build fails.
[ -e /usr/include/google/protobuf/descriptor.proto ] || want+=(libprotobuf-dev)
if [ "${1:-}" = "--test" ]; then
  command -v etcd >/dev/null 2>&1 || want+=(etcd-server)
  command -v ip >/dev/null 2>&1 || want+=(iproute2)
  command -v nft >/dev/null 2>&1 || want+=(nftables)
  command -v systemd-analyze >/dev/null 2>&1 || want+=(systemd)
fi
if [ "${1:-}" = "--test" ] && ! python3 -c "import aioquic" >/dev/null 2>&1; then
  # An independent HTTP/3 implementation for the CONNECT interop test.
  echo "installing: aioquic (pip)" >&2
  python3 -m pip install --quiet aioquic >/dev/null
fi
[ ${#want[@]} -eq 0 ] && exit 0

sudo=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "need root (or sudo) to install: ${want[*]}" >&2; exit 1; }
  sudo=sudo
fi
echo "installing: ${want[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
